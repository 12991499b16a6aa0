"""Post-training conversion to N:M: layer-wise AdaPrune reconstruction.

Layer-wise reconstruction of the kept weights on a small calibration set
(AdaPrune); the one-shot masks (magnitude, Wanda, SparseGPT) and
``nm_convert`` are in :mod:`sparse_jax.sparsity.oneshot`.

The model plumbing (caching each layer's inputs, BatchNorm re-estimation)
belongs to the training code; everything here is a pure function of arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
import optax


ApplyFn = Callable[[jax.Array, jax.Array], jax.Array]


def dense_apply(w: jax.Array, x: jax.Array) -> jax.Array:
  """``x @ w`` for a Dense kernel ``(in, out)`` and inputs ``(..., in)``.

  A DenseGeneral kernel (e.g. attention's ``(in, heads, head_dim)`` or
  ``(heads, head_dim, out)``) is read as the matrix ``(in_total, -1)`` its
  flattened inputs ``(..., in_total)`` multiply (outputs come flat too).
  """
  return x @ (w if w.ndim == 2 else w.reshape(x.shape[-1], -1))


def conv_apply(*, strides: int | Sequence[int] = 1,
               padding: str | int | Sequence[int | tuple[int, int]] = "SAME",
               feature_group_count: int = 1,
               kernel_dilation: int | Sequence[int] = 1) -> ApplyFn:
  """``apply(w, x)`` of a Flax-style Conv: HWIO kernel, NHWC inputs.

  Args:
    strides: window strides.
    padding: ``"SAME"``, ``"VALID"``, an int (same on every side), or one int
      or ``(low, high)`` pair per spatial axis (as Flax's Conv takes it).
    feature_group_count: grouped convolution.
    kernel_dilation: kernel (rhs) dilation.

  Returns:
    A function ``(w, x) -> y`` for :func:`reconstruct_layer`.

  Example:
    >>> import jax.numpy as jnp
    >>> from sparse_jax.sparsity import conv_apply
    >>> apply = conv_apply(strides=2)
    >>> apply(jnp.ones((3, 3, 4, 8)), jnp.ones((1, 8, 8, 4))).shape
    (1, 4, 4, 8)

  References:
    Hubara et al., "Accelerated Sparse Neural Training", NeurIPS 2021,
    https://arxiv.org/abs/2102.08124 (AdaPrune on conv layers).
  """

  def apply(w, x):
    nd = w.ndim - 2
    if not 1 <= nd <= 3:
      raise ValueError(f"conv_apply: need a 1-3-D conv kernel (..., in, out), "
                       f"got shape {w.shape}.")
    st = (strides,) * nd if isinstance(strides, int) else tuple(strides)
    dil = ((kernel_dilation,) * nd if isinstance(kernel_dilation, int)
           else tuple(kernel_dilation))
    spatial = "DHW"[-nd:]
    dims = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
    return lax.conv_general_dilated(
        x, w, window_strides=st, padding=_padding(padding, nd),
        rhs_dilation=dil,
        dimension_numbers=dims, feature_group_count=feature_group_count)

  return apply


def _padding(padding, nd: int):
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      raise ValueError(f"conv_apply: padding {padding!r} is not supported "
                       "(use 'SAME', 'VALID' or explicit sizes).")
    return padding.upper()
  if isinstance(padding, int):
    return [(padding, padding)] * nd
  pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
  if len(pads) != nd:
    raise ValueError(f"conv_apply: {len(pads)} paddings for {nd} spatial axes.")
  return pads


def reconstruction_error(x: jax.typing.ArrayLike, w: jax.typing.ArrayLike,
                         w_new: jax.typing.ArrayLike, *,
                         apply_fn: ApplyFn = dense_apply) -> jax.Array:
  """Mean squared output error ``mean (apply(w, x) - apply(w_new, x))^2``."""
  x, w, w_new = jnp.asarray(x), jnp.asarray(w), jnp.asarray(w_new)
  return jnp.mean((apply_fn(w, x) - apply_fn(w_new, x)) ** 2)


def reconstruct_layer(x: jax.typing.ArrayLike, w: jax.typing.ArrayLike,
                      mask: jax.typing.ArrayLike, *,
                      apply_fn: ApplyFn = dense_apply,
                      num_steps: int = 1000, learning_rate: float = 1e-3,
                      batch_size: int = 50, key: jax.Array | None = None,
                      optimizer: optax.GradientTransformation | None = None,
                      init: jax.typing.ArrayLike | None = None) -> jax.Array:
  """AdaPrune: refit a layer's kept weights to reproduce its dense outputs.

  Minimises ``|| apply(W, X) - apply(S * W', X) ||^2`` over ``W'`` with the mask
  ``S`` fixed, by Adam on random mini-batches of the cached calibration inputs
  ``X`` (``lax.scan``; pure and jittable). Starts from ``S * W`` (or
  ``init``).

  Args:
    x: calibration inputs of this layer, batch first (``(N, in)`` for Dense,
      ``(N, H, W, C)`` for Conv with :func:`conv_apply`).
    w: the dense kernel.
    mask: the fixed boolean N:M mask of ``w``'s shape.
    apply_fn: ``(kernel, inputs) -> outputs``; default ``inputs @ kernel``.
    num_steps: optimizer steps (~1000 in the paper).
    learning_rate: Adam step size (~1e-3 in the paper).
    batch_size: calibration samples per step (~50), drawn with replacement.
    key: PRNG key for the batches (default ``jax.random.key(0)``).
    optimizer: an optax optimizer replacing ``optax.adam(learning_rate)``.
    init: starting point instead of ``w`` (it is masked).

  Returns:
    The refitted kernel ``S * W'`` (exactly zero outside the mask), in ``w``'s
    dtype.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sparse_jax.masks import nm_mask
    >>> from sparse_jax.sparsity import reconstruct_layer, reconstruction_error
    >>> x = jax.random.normal(jax.random.key(0), (256, 16))
    >>> w = jax.random.normal(jax.random.key(1), (16, 8))
    >>> s = nm_mask(w, 2, 4)
    >>> w2 = reconstruct_layer(x, w, s, num_steps=200, learning_rate=1e-2)
    >>> bool(reconstruction_error(x, w, w2) < reconstruction_error(x, w, s * w))
    True

  References:
    Hubara et al., "Accelerated Sparse Neural Training", NeurIPS 2021,
    https://arxiv.org/abs/2102.08124 (AdaPrune); Hubara et al., "Accurate
    Post Training Quantization With Small Calibration Sets", ICML 2021,
    https://arxiv.org/abs/2006.10518.
  """
  x = jnp.asarray(x)
  w = jnp.asarray(w)
  mask = jnp.asarray(mask)
  if mask.shape != w.shape:
    raise ValueError(f"reconstruct_layer: mask shape {mask.shape} differs from "
                     f"the kernel shape {w.shape}.")
  if x.ndim < 1 or x.shape[0] < 1:
    raise ValueError("reconstruct_layer: x needs a leading batch axis with at "
                     f"least one sample, got shape {x.shape}.")
  for name, v in (("num_steps", num_steps), ("batch_size", batch_size)):
    if not isinstance(v, int) or v < 1:
      raise ValueError(f"reconstruct_layer: {name} must be a positive int, "
                       f"got {v!r}.")
  key = jax.random.key(0) if key is None else key
  opt = optax.adam(learning_rate) if optimizer is None else optimizer
  mask = mask.astype(bool)
  w32 = w.astype(jnp.float32)
  start = w32 if init is None else jnp.asarray(init, jnp.float32)
  start = jnp.where(mask, start, 0.0)

  def loss_fn(v, xb):
    target = lax.stop_gradient(apply_fn(w32, xb))
    return jnp.mean((apply_fn(jnp.where(mask, v, 0.0), xb) - target) ** 2)

  def step(carry, k):
    v, opt_state = carry
    idx = jax.random.randint(k, (batch_size,), 0, x.shape[0])
    grads = jax.grad(loss_fn)(v, x[idx].astype(jnp.float32))
    updates, opt_state = opt.update(grads, opt_state, v)
    return (optax.apply_updates(v, updates), opt_state), None

  (v, _), _ = lax.scan(step, (start, opt.init(start)),
                       jax.random.split(key, num_steps))
  return jnp.where(mask, v, 0.0).astype(w.dtype)


def reconstruct_dense_lstsq(x: jax.typing.ArrayLike, w: jax.typing.ArrayLike,
                            mask: jax.typing.ArrayLike, *,
                            ridge: float = 1e-6) -> jax.Array:
  """The exact minimiser of ``||X W - X (S * W')||^2`` for a Dense kernel.

  For each output column ``j`` with kept inputs ``K``: solve the normal
  equations ``(X_K^T X_K + ridge I) w'_K = X_K^T X w_j`` -- the closed form
  AdaPrune approximates (used to check it; fine for moderate ``in``).

  Args:
    x: calibration inputs ``(N, in)``.
    w: dense kernel ``(in, out)``.
    mask: boolean mask ``(in, out)``.
    ridge: Tikhonov term, relative to ``trace(X^T X) / in``.

  Returns:
    The refitted kernel ``(in, out)``, zero outside the mask.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sparse_jax.sparsity import reconstruct_dense_lstsq
    >>> x = jax.random.normal(jax.random.key(0), (64, 4))
    >>> w = jnp.ones((4, 2))
    >>> reconstruct_dense_lstsq(x, w, jnp.ones((4, 2), bool)).round(4).tolist()
    [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]

  References:
    Hubara et al., NeurIPS 2021, https://arxiv.org/abs/2102.08124 (the
    layer-wise objective); Frantar & Alistarh, "SparseGPT",
    https://arxiv.org/abs/2301.00774 (its closed form per output).
  """
  x = jnp.asarray(x, jnp.float32)
  w = jnp.asarray(w, jnp.float32)
  mask = jnp.asarray(mask, bool)
  if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0] or \
      mask.shape != w.shape:
    raise ValueError("reconstruct_dense_lstsq: need x (N, in), w (in, out) and "
                     f"mask (in, out); got {x.shape}, {w.shape}, {mask.shape}.")
  g = x.T @ x
  rhs = (x.T @ (x @ w)).T  # (out, in): X^T X w_j per output column
  g = g + ridge * jnp.trace(g) / g.shape[0] * jnp.eye(g.shape[0])

  def solve(col):
    mk, bj = col
    mf = mk.astype(jnp.float32)
    a = mf[:, None] * g * mf[None, :] + jnp.diag(1.0 - mf)
    return jnp.linalg.solve(a, mf * bj)

  out = lax.map(solve, (mask.T, rhs))
  return jnp.where(mask, out.T, 0.0)
