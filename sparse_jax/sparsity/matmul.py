"""An N:M-sparse matmul whose forward AND backward products are N:M sparse.

A training step of a Dense layer ``y = x @ W`` does two products with the
weight: the forward ``x @ W`` (contracting W's input axis) and the data
gradient ``dx = dy @ W^T`` (contracting its output axis). A plain N:M mask
(groups along the input axis) makes only the first one N:M sparse; a
*transposable* N:M mask (Hubara et al. 2021) makes both, so both could run on
a 2:4 sparse-tensor-core kernel. :func:`nm_matmul` is that product with an
explicit ``custom_vjp``: forward ``backend(x, W, M)``, backward
``backend(dy, W^T, M^T)``, and the weight gradient ``x^T dy`` (dense, for
straight-through training, or masked).

Backends. ``backend(a, b, mask)`` must return ``a @ (b * mask)`` with ``a`` of
shape ``(..., k)`` and ``b``, ``mask`` of shape ``(k, n)``. The only built-in
backend is ``"masked_dense"`` (multiply by the mask, then a dense matmul): it
runs everywhere and is what ``"auto"`` picks. JAX 0.10 has no N:M sparse
matmul (the GPU-only ``jax.experimental.sparse.nm.nm_spmm`` of 2024 is not in
it), so a 2:4 kernel (e.g. cuSPARSELt through an FFI call) plugs in as a
callable ``backend``.
"""

from __future__ import annotations

from collections.abc import Callable
import functools

import jax
import jax.numpy as jnp

from sparse_jax._core import checks

Backend = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def masked_dense(a: jax.Array, b: jax.Array, mask: jax.Array) -> jax.Array:
  """``a @ (b * mask)`` as a dense matmul (the backend that runs everywhere)."""
  return jnp.matmul(a, jnp.where(mask, b, jnp.zeros((), b.dtype)))


BACKENDS: dict[str, Backend] = {"masked_dense": masked_dense}
"""Built-in :func:`nm_matmul` backends by name (``"auto"`` picks one)."""

WEIGHT_GRADS = ("ste", "masked")


def _resolve_backend(backend) -> Backend:
  if callable(backend):
    return backend
  if backend == "auto":
    return masked_dense  # no N:M sparse kernel exists in JAX yet
  checks.check_choice(backend, "backend", ("auto", *BACKENDS), who="nm_matmul")
  return BACKENDS[backend]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _nm_matmul(x, w, mask, backend, weight_grad):
  return backend(x, w, mask)


def _fwd(x, w, mask, backend, weight_grad):
  return backend(x, w, mask), (x, w, mask)


def _bwd(backend, weight_grad, res, g):
  x, w, mask = res
  dx = backend(g, w.T, mask.T).astype(x.dtype)  # dy @ (W * M)^T
  x2 = x.reshape(-1, x.shape[-1])
  dw = jnp.matmul(x2.T, g.reshape(-1, g.shape[-1])).astype(w.dtype)
  if weight_grad == "masked":
    dw = jnp.where(mask, dw, jnp.zeros((), dw.dtype))
  return dx, dw, None


_nm_matmul.defvjp(_fwd, _bwd)


def nm_matmul(x: jax.typing.ArrayLike, w: jax.typing.ArrayLike,
              mask: jax.typing.ArrayLike, *, weight_grad: str = "ste",
              backend: str | Backend = "auto") -> jax.Array:
  """``x @ (w * mask)`` with both training products routed through ``backend``.

  The forward is ``backend(x, w, mask)``; the gradient with respect to ``x``
  is ``backend(dy, w.T, mask.T)``, an N:M-sparse product too when ``mask`` is
  a transposable N:M mask (see ``sj.masks.transposable_nm_mask``). The
  gradient with respect to ``w`` is ``x^T dy``: dense (straight through to
  the dense weights, as :func:`nm_ste`) with ``weight_grad="ste"``, or the
  exact gradient of the masked product, ``(x^T dy) * mask``, with
  ``weight_grad="masked"``. ``mask`` gets no gradient.

  Args:
    x: inputs, shape ``(..., in)``.
    w: kernel, shape ``(in, out)`` (the Flax Dense layout).
    mask: bool array of ``w``'s shape (e.g. ``transposable_nm_mask(w, 2, 4)``).
    weight_grad: ``"ste"`` (dense gradient for the dense weights) or
      ``"masked"``.
    backend: ``"auto"`` or ``"masked_dense"`` (the only built-in backend: a
      dense matmul of the masked kernel, on every platform), or a callable
      ``(a, b, mask) -> a @ (b * mask)``, e.g. a sparse-tensor-core kernel.

  Returns:
    ``x @ (w * mask)``, shape ``(..., out)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sparse_jax.masks import transposable_nm_mask
    >>> from sparse_jax.sparsity import nm_matmul
    >>> w = jax.random.normal(jax.random.key(0), (8, 8))
    >>> mask = transposable_nm_mask(w, 2, 4)
    >>> x = jnp.ones((3, 8))
    >>> bool(jnp.allclose(nm_matmul(x, w, mask), x @ (w * mask)))
    True

  References:
    Hubara et al., "Accelerated Sparse Neural Training: A Provable and
    Efficient Method to Find N:M Transposable Masks", NeurIPS 2021,
    https://arxiv.org/abs/2102.08124.
  """
  checks.check_choice(weight_grad, "weight_grad", WEIGHT_GRADS,
                      who="nm_matmul")
  fn = _resolve_backend(backend)
  x, w, mask = jnp.asarray(x), jnp.asarray(w), jnp.asarray(mask)
  if w.ndim != 2:
    raise ValueError(f"nm_matmul: w must be a 2-D (in, out) kernel, got shape "
                     f"{w.shape}.")
  if mask.shape != w.shape or mask.dtype != jnp.bool_:
    raise ValueError(f"nm_matmul: mask must be a bool array of w's shape "
                     f"{w.shape}, got {mask.dtype} {mask.shape}.")
  if x.ndim < 1 or x.shape[-1] != w.shape[0]:
    raise ValueError(f"nm_matmul: x must have shape (..., {w.shape[0]}) to "
                     f"multiply a {w.shape} kernel, got {x.shape}.")
  return _nm_matmul(x, w, mask, fn, weight_grad)
