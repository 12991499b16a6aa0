"""N:M fine-grained structured sparsity masks: keep n of every m consecutive.

``n`` is the number of entries KEPT in each group of ``m`` consecutive entries
along one axis (2:4 keeps 2 of every 4, i.e. 50% sparsity). Groups run along the
input-feature (GEMM reduction) axis by default, which for Flax kernels -- Dense
``(in, out)`` and Conv ``(..., in, out)`` -- is axis ``-2``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_jax._core import sharding as _sharding
from sparse_jax.masks import _checks


def _grouped(w: jax.Array, m: int, axis: int) -> jax.Array:
  """Reshapes ``w`` so that ``axis`` becomes ``(size // m, m)``."""
  shape = w.shape
  return w.reshape(shape[:axis] + (shape[axis] // m, m) + shape[axis + 1:])


def _check_axis_size(w: jax.Array, m: int, axis: int) -> None:
  if w.shape[axis] % m:
    raise ValueError(
        f"The size along axis {axis} of an array of shape {tuple(w.shape)} is "
        f"{w.shape[axis]}, which is not divisible by m={m}; N:M groups of m "
        "consecutive entries need it to be (skip this array with a filter, or "
        "pick another axis).")


def nm_mask(w: jax.typing.ArrayLike, n, m: int, *, axis: int = -2) -> jax.Array:
  """Mask keeping the ``n`` largest ``|w|`` in every ``m`` consecutive entries.

  ``n`` is the number KEPT per group (2:4 keeps 2 of 4; the Hubara et al. text
  counts zeros instead -- for 2:4 and 4:8 both readings agree). The groups are
  ``m`` consecutive entries along ``axis``; the default ``axis=-2`` is the
  input-feature (reduction) axis of Flax ``Dense`` ``(in, out)`` and ``Conv``
  ``(..., in, out)`` kernels, which is where sparse tensor cores need them. A
  3-D ``DenseGeneral`` kernel ``(in, heads, head_dim)`` needs ``axis=0``.

  Ties are broken deterministically: among equal magnitudes the LOWER index
  along ``axis`` wins. NaN ranks below every number (it is kept only when a
  group has fewer than ``n`` non-NaN entries); +-inf ranks highest.

  The kernel is fused and sort-free: ``rank_i = #{j : |w_j| > |w_i| or
  (|w_j| == |w_i| and j < i)}`` over the ``m^2`` pairs of each group, and entry
  ``i`` is kept iff ``rank_i < n``; it costs about one elementwise pass.

  Args:
    w: real array (bf16, f16, f32, f64 or integer), any shape.
    n: entries kept per group, ``1 <= n <= m``. May be a traced integer scalar
      (e.g. a sparsity schedule under jit); it is then not range-checked.
    m: group size (a Python int).
    axis: the axis along which groups of ``m`` consecutive entries are formed;
      its size must be divisible by ``m``.

  Returns:
    A boolean array of ``w``'s shape, True where the entry is kept. Exactly
    ``n`` entries per group are True.

  Raises:
    ValueError: if ``n``/``m`` are out of range, ``axis`` is invalid or the
      size along ``axis`` is not divisible by ``m``.

  Example:
    >>> import jax.numpy as jnp
    >>> from sparse_jax.masks import nm_mask
    >>> w = jnp.array([[1., -4.], [3., 2.], [-2., 1.], [0., 3.]])  # (in, out)
    >>> nm_mask(w, 2, 4).astype(int).T          # groups run down each column
    Array([[0, 1, 1, 0],
           [1, 0, 0, 1]], dtype=int32)

  References:
    Zhou et al., "Learning N:M Fine-grained Structured Sparse Neural Networks
    From Scratch", ICLR 2021, https://arxiv.org/abs/2102.04010.
    Mishra et al., "Accelerating Sparse Deep Neural Networks",
    https://arxiv.org/abs/2104.08378.
  """
  w = jnp.asarray(w)
  n, m, axis = _validate(w, n, m, axis)
  if isinstance(n, int) and n == m:
    return jnp.ones(w.shape, dtype=bool)
  # n may be traced: it is an argument, not a closure (auto_axes retypes args).
  return _sharding.auto_sharded(
      lambda w, n: _keep(w, n, m, axis).reshape(w.shape), w, n,
      out_specs=_sharding.spec_of(w))


def _validate(w: jax.Array, n, m, axis) -> tuple:
  _checks.check_float_like(w)
  if w.ndim == 0:
    raise ValueError("N:M masks need an array with at least one dimension, "
                     "got a scalar.")
  if _checks.is_static_int(n):
    n, m = _checks.check_nm(n, m)
  else:
    m = _checks.check_m(m)
    n = _checks.check_traced_n(n)
  axis = _checks.normalize_axis(axis, w.ndim)
  _check_axis_size(w, m, axis)
  return n, m, axis


def _keep(w: jax.Array, n, m: int, axis: int) -> jax.Array:
  """The kept-entry mask in the grouped layout ``(..., size // m, m, ...)``."""
  key = _grouped(_checks.magnitude_key(w), m, axis)
  g = axis + 1  # the within-group index
  k_other = jnp.expand_dims(key, g + 1)  # entry j along axis g
  k_self = jnp.expand_dims(key, g)       # entry i along axis g + 1
  tail = (1,) * (key.ndim - g - 1)
  j = jnp.arange(m).reshape((m, 1) + tail)
  i = jnp.arange(m).reshape((1, m) + tail)
  # j ranks above i: larger |w|, or equal |w| and a lower index.
  above = (k_other > k_self) | ((k_other == k_self) & (j < i))
  # Ranks are < m: int8 when it holds them. XLA:CPU materialises the ranks
  # (the mask and the projection both read them), and a quarter of the
  # bytes made the 2:4 MLP train step ~2% faster (benchmarks/nm_train_step).
  rank = jnp.sum(above, axis=g, dtype=jnp.int8 if m <= 127 else jnp.int32)
  return rank < n


def nm_prune(w: jax.typing.ArrayLike, n, m: int, *,
             axis: int = -2) -> jax.Array:
  """Projects ``w`` onto N:M sparsity: zeroes all but the kept entries.

  Args:
    w: real array.
    n: entries KEPT per group of ``m`` (see :func:`nm_mask`).
    m: group size.
    axis: grouping axis (default ``-2``, the input axis of Flax kernels).

  Returns:
    ``where(nm_mask(w, n, m, axis=axis), w, 0)`` with ``w``'s dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> from sparse_jax.masks import nm_prune
    >>> nm_prune(jnp.array([3., -1., 0.5, -4.]), 2, 4, axis=0)
    Array([ 3.,  0.,  0., -4.], dtype=float32)

  References:
    Zhou et al., ICLR 2021, https://arxiv.org/abs/2102.04010.
  """
  w = jnp.asarray(w)
  n, m, axis = _validate(w, n, m, axis)
  if isinstance(n, int) and n == m:
    return w
  # select in the grouped layout: XLA fuses it all into one pass.
  def prune(w, n):
    out = jnp.where(_keep(w, n, m, axis), _grouped(w, m, axis),
                    jnp.zeros((), w.dtype))
    return out.reshape(w.shape)
  return _sharding.auto_sharded(prune, w, n, out_specs=_sharding.spec_of(w))


def is_nm_sparse(x: jax.typing.ArrayLike, n, m: int, *,
                 axis: int = -2) -> jax.Array:
  """Whether every group of ``m`` consecutive entries has <= ``n`` nonzeros.

  Works on boolean masks (True counts as nonzero) and on pruned arrays.

  Args:
    x: array (or boolean mask).
    n: maximum nonzeros per group.
    m: group size.
    axis: grouping axis.

  Returns:
    A boolean scalar array.

  Example:
    >>> import jax.numpy as jnp
    >>> from sparse_jax.masks import is_nm_sparse
    >>> bool(is_nm_sparse(jnp.array([1., 0., 0., 2.]), 2, 4, axis=0))
    True

  References:
    Zhou et al., ICLR 2021, https://arxiv.org/abs/2102.04010.
  """
  x = jnp.asarray(x)
  m = _checks.check_m(m)
  axis = _checks.normalize_axis(axis, x.ndim)
  _check_axis_size(x, m, axis)
  def check(x, n):
    return jnp.all(jnp.sum(_grouped(x != 0, m, axis), axis=axis + 1) <= n)
  return _sharding.auto_sharded(check, x, n, out_specs=jax.P())
