"""Layers for N:M-sparse models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_jax._core import checks
from sparse_jax.masks import nm_mask, transposable_nm_mask
from sparse_jax.sparsity.matmul import WEIGHT_GRADS, Backend, nm_matmul


class NMMask(nnx.Variable):
  """The N:M mask of an :class:`NMDense` kernel: state, not a trainable param.

  ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` leaves it alone; it changes only
  through :meth:`NMDense.update_mask`.
  """


class NMDense(nnx.Module):
  """Dense layer ``x @ (kernel * mask) + bias`` with N:M-sparse products.

  The mask is held in an :class:`NMMask` variable, computed from ``|kernel|``
  at initialisation and again by :meth:`update_mask` (call it on the schedule
  you want, e.g. every step for SR-STE-style training, or never after a
  one-shot conversion). The product is :func:`sparse_jax.sparsity.nm_matmul`:
  with ``transposable=True`` (the default) both the forward ``x @ W`` and the
  data gradient ``dy @ W^T`` are N:M-sparse products, so a 2:4 sparse kernel
  passed as ``backend`` would serve both. On every platform today the
  ``"auto"`` backend is a masked dense matmul (JAX has no N:M kernel).

  Args:
    in_features: input width (divisible by ``m``).
    out_features: output width (divisible by ``m`` when transposable).
    n: entries kept per group of ``m``.
    m: group size.
    transposable: transposable N:M mask (n kept per row AND column of every
      ``m x m`` tile) instead of groups along the input axis only.
    use_bias: add a bias.
    weight_grad: ``"ste"`` (the dense kernel gets the dense gradient
      ``x^T dy``; pruned weights keep learning and may re-enter at the next
      :meth:`update_mask`) or ``"masked"`` (the exact gradient of the masked
      product).
    backend: see :func:`sparse_jax.sparsity.nm_matmul`.
    method: transposable solver (see ``sj.masks.transposable_nm_mask``).
    kernel_init: initializer of the ``(in, out)`` kernel.
    dtype: dtype of the kernel and bias.
    rngs: ``nnx.Rngs`` for initialisation.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = NMDense(8, 16, n=2, m=4, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((3, 8))).shape
    (3, 16)
    >>> float(layer.mask[...].mean())
    0.5

  References:
    Hubara et al., "Accelerated Sparse Neural Training: A Provable and
    Efficient Method to Find N:M Transposable Masks", NeurIPS 2021,
    https://arxiv.org/abs/2102.08124.
  """

  def __init__(self, in_features: int, out_features: int, *, n: int = 2,
               m: int = 4, transposable: bool = True, use_bias: bool = True,
               weight_grad: str = "ste", backend: str | Backend = "auto",
               method: str = "exact",
               kernel_init=nnx.initializers.lecun_normal(),
               dtype=jnp.float32, rngs: nnx.Rngs):
    who = "NMDense"
    self.n, self.m = checks.check_nm(n, m, who=who)
    self.transposable = checks.check_bool(transposable, "transposable", who=who)
    checks.check_choice(weight_grad, "weight_grad", WEIGHT_GRADS, who=who)
    in_features = checks.check_int(in_features, "in_features", who=who)
    out_features = checks.check_int(out_features, "out_features", who=who)
    if in_features % self.m or (self.transposable and out_features % self.m):
      what = ("in_features and out_features" if self.transposable
              else "in_features")
      raise ValueError(
          f"{who}: {what} must be divisible by m={self.m}, got in_features="
          f"{in_features}, out_features={out_features}.")
    self.weight_grad, self.backend, self.method = weight_grad, backend, method
    self.kernel = nnx.Param(kernel_init(rngs.params(),
                                        (in_features, out_features), dtype))
    self.bias = (nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias
                 else None)
    self.mask = NMMask(self._mask_of(self.kernel[...]))

  def _mask_of(self, w: jax.Array) -> jax.Array:
    if self.transposable:
      return transposable_nm_mask(w, self.n, self.m, method=self.method)
    return nm_mask(w, self.n, self.m, axis=0)

  def update_mask(self) -> None:
    """Recomputes the mask from the current ``|kernel|`` (jittable)."""
    self.mask[...] = self._mask_of(self.kernel[...])

  def __call__(self, x: jax.Array) -> jax.Array:
    y = nm_matmul(x, self.kernel[...], self.mask[...],
                  weight_grad=self.weight_grad, backend=self.backend)
    if self.bias is not None:
      y = y + self.bias[...]
    return y
