"""Gradient compressors: top-k, rand-k, threshold, lognormal and N:M.

A :class:`Compressor` is a small NamedTuple of pure functions that act on ONE
array (one pytree leaf):

* ``compress(x, key) -> Compressed(values, indices)`` (``key``: an int
  seed, a typed key or raw key data, as everywhere in the library). The two arrays have
  STATIC shapes that depend only on ``x.shape`` (never on the data), so the
  compressed form works under ``jit``, ``vmap`` and can be exchanged with
  ``jax.lax.all_gather`` inside ``jax.shard_map``.
* ``flat_indices(indices, shape) -> int32`` turns ``Compressed.indices`` into
  flat indices into ``x.ravel()`` (one per value). An index equal to the size
  of ``x`` marks an unused buffer slot: its value is 0 and a scatter with
  ``mode="drop"`` ignores it.

Decompression is then always the same scatter-ADD
(:meth:`Compressor.decompress`), which is also what sums the compressed
tensors of several workers (duplicate indices add up).

Every compressor keeps at least one entry per tensor. Magnitude ties are
broken towards the lower index; a NaN counts as the largest magnitude (so it
is sent, and the model visibly diverges instead of hiding it in a residual).
When the sparse buffer (values + int32 indices) would be at least as large as
the dense tensor, the compressors send the masked dense tensor instead, with
an empty index array (the structured form ``flat_indices`` expands).
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax._core import keys
from sparse_jax.compression import lognormal_model as lognormal_math
from sparse_jax.compression import selection

_INDEX_DTYPE = jnp.int32
_MAX_SIZE = np.iinfo(np.int32).max


class Compressed(NamedTuple):
  """The compressed form of one array: what goes on the wire."""
  values: jax.Array   # kept values (unused slots hold 0)
  indices: jax.Array  # encoded positions; see Compressor.flat_indices


class Compressor(NamedTuple):
  """A gradient compressor: pure functions acting on one array.

  Attributes:
    compress: ``(x, key) -> Compressed``; output shapes depend on ``x.shape``
      only. ``key`` is a PRNG key (used by the random compressors).
    flat_indices: ``(indices, shape) -> int32 array`` of flat indices into
      ``x.ravel()``, one per entry of ``values``; an index equal to
      ``prod(shape)`` marks an unused slot.
    name: a short description, e.g. ``"top_k(0.001)"``.
  """
  compress: Callable[[jax.Array, jax.Array], Compressed]
  flat_indices: Callable[[jax.Array, Sequence[int]], jax.Array]
  name: str

  def decompress(self, compressed: Compressed, shape: Sequence[int],
                 dtype=None) -> jax.Array:
    """Scatter-adds ``compressed`` into a dense zero array of ``shape``.

    Leading axes of ``compressed`` (e.g. a worker axis from ``all_gather``)
    are summed over: duplicate indices ADD.
    """
    dtype = jnp.asarray(compressed.values).dtype if dtype is None else dtype
    return self.add_to(jnp.zeros(tuple(shape), dtype), compressed)

  def add_to(self, target: jax.Array, compressed: Compressed,
             scale: float | jax.Array = 1.0) -> jax.Array:
    """``target + scale * decompress(compressed)``, without a dense temporary.

    Args:
      target: the dense array (its shape is the decompressed shape).
      compressed: one ``Compressed`` or several stacked on leading axes
        (summed over; duplicate indices add up).
      scale: multiplies the values before they are added.

    Returns:
      An array like ``target``.
    """
    values = jnp.asarray(compressed.values)
    shape, size = target.shape, target.size
    values = values * jnp.asarray(scale, values.dtype)
    if compressed.indices.shape[-1] == 0:    # dense form
      lead = tuple(range(values.ndim - 1))
      total = values.sum(lead) if lead else values
      return target + total.reshape(shape).astype(target.dtype)
    flat = self.flat_indices
    for _ in range(values.ndim - 1):
      flat = jax.vmap(flat, in_axes=(0, None))
    index = flat(compressed.indices, shape).reshape(-1)
    values = values.reshape(-1).astype(target.dtype)
    if len(shape) <= 1:
      return target.reshape(size).at[index].add(values, mode="drop").reshape(
          shape)
    # Scatter in the target's own shape (no reshape around the scatter):
    # then XLA rewrites ``x + add_to(zeros, c)`` (e.g. optax.apply_updates
    # of a compressed step) into one scatter into ``x``, with no dense zero
    # buffer and no extra pass.
    return target.at[_unravel(index, shape)].add(values, mode="drop")

  def zero_where_sent(self, target: jax.Array,
                      compressed: Compressed) -> jax.Array:
    """``target`` with the entries that ``compressed`` sends non-zero set to 0."""
    values = jnp.asarray(compressed.values)
    keep = (values == 0).astype(target.dtype)
    if compressed.indices.shape[-1] == 0:    # dense form
      return target * keep.reshape(target.shape)
    index = self.flat_indices(compressed.indices, target.shape)
    out = target.reshape(-1).at[index].multiply(keep, mode="drop")
    return out.reshape(target.shape)

  def wire_bytes(self, shape: Sequence[int], dtype=jnp.float32) -> int:
    """Bytes of one compressed array of ``shape``/``dtype`` (values + indices)."""
    out = jax.eval_shape(self.compress, jax.ShapeDtypeStruct(tuple(shape), dtype),
                         jax.ShapeDtypeStruct((2,), jnp.uint32))
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize
               for a in jax.tree.leaves(out))


# ----------------------------------------------------------------- helpers --


def _check_fraction(fraction, name: str, *, what: str = "fraction") -> float:
  if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real):
    raise ValueError(f"{name}: {what} must be a number in (0, 1], got "
                     f"{fraction!r}")
  fraction = float(fraction)
  if not (0.0 < fraction <= 1.0):
    raise ValueError(f"{name}: {what} must be in (0, 1], got {fraction!r}")
  return fraction


def kept_count(fraction: float, size: int) -> int:
  """The static number of entries a fraction keeps: ``max(1, round(f * size))``."""
  return int(min(size, max(1, round(fraction * size))))


def _flatten(x: jax.Array, name: str) -> jax.Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name}: expects a floating-point array, got dtype "
                     f"{x.dtype} of shape {x.shape}")
  if x.size == 0:
    raise ValueError(f"{name}: cannot compress an empty array of shape "
                     f"{x.shape} (leave it dense with a mask)")
  if x.size > _MAX_SIZE:
    raise ValueError(f"{name}: arrays of more than 2**31 - 1 entries are not "
                     f"supported (shape {x.shape})")
  return jnp.ravel(x)


def _dense_is_cheaper(size: int, capacity: int, itemsize: int) -> bool:
  return capacity * (itemsize + np.dtype(_INDEX_DTYPE).itemsize) >= (
      size * itemsize)


def _pack(flat: jax.Array, source: jax.Array, index: jax.Array) -> Compressed:
  """Values of ``source`` at ``index`` (padding = size) in the cheaper form."""
  size = flat.shape[0]
  capacity = index.shape[0]
  values = source.at[index].get(mode="fill", fill_value=0)
  if _dense_is_cheaper(size, capacity, np.dtype(flat.dtype).itemsize):
    dense = jnp.zeros_like(flat).at[index].set(values, mode="drop")
    return Compressed(dense, jnp.zeros((0,), _INDEX_DTYPE))
  return Compressed(values, index.astype(_INDEX_DTYPE))


def _unravel(index: jax.Array, shape: Sequence[int]) -> tuple[jax.Array, ...]:
  """Row-major coordinates of flat indices; ``prod(shape)`` (padding) maps to
  an out-of-bounds first coordinate, which a ``mode="drop"`` scatter drops."""
  coords = []
  for dim in reversed(tuple(shape)[1:]):
    coords.append(index % dim)
    index = index // dim
  coords.append(index)
  return tuple(reversed(coords))


def _flat_identity(indices: jax.Array, shape: Sequence[int]) -> jax.Array:
  if indices.shape[-1] == 0:   # dense form: every position, in order
    return jnp.arange(math.prod(tuple(shape)), dtype=_INDEX_DTYPE)
  return indices.astype(_INDEX_DTYPE)


# ------------------------------------------------------------- compressors --


def top_k(fraction: float) -> Compressor:
  """Exact top-k: keeps the ``k = max(1, round(fraction * size))`` largest |x|.

  Contractive: ``||C(x) - x||^2 <= (1 - k/d) ||x||^2``. The selection is exact
  (ties to the lower index) and, for small fractions of large tensors, several
  times faster than ``lax.top_k`` (see :mod:`sparse_jax.compression.selection`).

  Args:
    fraction: the fraction of entries kept per tensor, in ``(0, 1]``.

  Returns:
    A :class:`Compressor`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> c = top_k(0.5)
    >>> out = c.compress(jnp.array([0.1, -3.0, 2.0, 0.2]), jax.random.key(0))
    >>> c.decompress(out, (4,)).tolist()
    [0.0, -3.0, 2.0, 0.0]

  References:
    Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS 2018,
    https://arxiv.org/abs/1809.07599
  """
  name = f"top_k({fraction!r})"
  fraction = _check_fraction(fraction, "top_k")

  def compress(x, key):
    del key
    flat = _flatten(x, name)
    index = selection.top_k_indices(flat, kept_count(fraction, flat.shape[0]))
    return _pack(flat, flat, index)

  return Compressor(compress, _flat_identity, name)


def rand_k(fraction: float, *, rescale: bool = False) -> Compressor:
  """Random-k: keeps ``k = max(1, round(fraction * size))`` uniformly random entries.

  The ``k`` positions are a uniformly random ``k``-subset (no repeats), drawn
  from the key; under :func:`~sparse_jax.compression.error_feedback` every
  worker and every step gets its own key.

  Args:
    fraction: the fraction of entries kept per tensor, in ``(0, 1]``.
    rescale: multiply the kept values by ``size / k`` (unbiased,
      ``E[C(x)] = x``, but not contractive: do not use it with error
      feedback). The default keeps them unscaled (contractive, biased).

  Returns:
    A :class:`Compressor`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> out = rand_k(0.25).compress(jnp.arange(8.0), jax.random.key(0))
    >>> out.values.shape, out.indices.shape
    ((2,), (2,))

  References:
    Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS 2018,
    https://arxiv.org/abs/1809.07599
  """
  name = f"rand_k({fraction!r}{', rescale=True' if rescale else ''})"
  fraction = _check_fraction(fraction, "rand_k")

  def compress(x, key):
    flat = _flatten(x, name)
    size = flat.shape[0]
    k = kept_count(fraction, size)
    if k == size:
      index = jnp.arange(size, dtype=_INDEX_DTYPE)
    else:
      noise = jax.random.uniform(keys.as_key(key, who=name), (size,),
                                 jnp.float32)
      index = selection.top_k_indices(noise, k)
    source = flat * jnp.asarray(size / k, flat.dtype) if rescale else flat
    return _pack(flat, source, index)

  return Compressor(compress, _flat_identity, name)


def _capacity(max_fraction: float, size: int) -> int:
  return kept_count(max_fraction, size)


def threshold(tau: float, *, max_fraction: float = 1.0) -> Compressor:
  """Keeps every entry with ``|x| >= tau`` (at least the largest one).

  The wire buffer has a static size of ``max(1, round(max_fraction * size))``
  slots; if more entries pass, the ``max_fraction * size`` largest are kept
  (exact), the rest stays in the error-feedback residual.

  Args:
    tau: the magnitude threshold, ``>= 0``.
    max_fraction: the buffer size as a fraction of the tensor, in ``(0, 1]``.
      It sets the bytes on the wire (whatever the data), so keep it close to
      the density you expect.

  Returns:
    A :class:`Compressor`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> c = threshold(1.0)
    >>> out = c.compress(jnp.array([0.1, -3.0, 2.0, 0.2]), jax.random.key(0))
    >>> c.decompress(out, (4,)).tolist()
    [0.0, -3.0, 2.0, 0.0]

  References:
    Lin et al., "Deep Gradient Compression", ICLR 2018,
    https://arxiv.org/abs/1712.01887
  """
  name = f"threshold({tau!r}, max_fraction={max_fraction!r})"
  if (isinstance(tau, bool) or not isinstance(tau, numbers.Real)
      or not math.isfinite(tau) or tau < 0):
    raise ValueError(f"threshold: tau must be a finite number >= 0, got {tau!r}")
  max_fraction = _check_fraction(max_fraction, "threshold", what="max_fraction")
  tau = float(tau)

  def compress(x, key):
    del key
    flat = _flatten(x, name)
    index = selection.select_above(flat, tau,
                                   _capacity(max_fraction, flat.shape[0]))
    return _pack(flat, flat, index)

  return Compressor(compress, _flat_identity, name)


def lognormal(sparsity: float, *, stochastic: bool = False,
              capacity_factor: float = 1.5,
              sample_size: int = 1 << 16) -> Compressor:
  """Prunes to a target sparsity with the closed-form lognormal threshold.

  Fits ``mu, sigma`` of ``ln|x|`` over the non-zero entries of a strided
  sample of ``sample_size`` entries (the whole tensor if smaller), corrects the
  target for entries already zero and computes the threshold ``tau`` in one
  shot (see :mod:`sparse_jax.compression.lognormal_model`): no sort and no
  top-k, one pass over the tensor. Deterministic: keeps ``|x| >= tau``.
  Stochastic (``stochastic=True``): additionally an entry with ``|x| < tau``
  is sent as ``tau * sign(x)`` with probability ``|x| / tau`` (unbiased,
  ``E[C(x)] = x``), and ``tau`` is solved so that the EXPECTED sparsity after
  this is the target.

  How close it gets: on lognormal data the kept fraction is within a few
  percent (relative) of ``1 - sparsity`` (the tests check 10%); on other
  distributions it is only as good as the lognormal fit.

  The wire buffer holds ``ceil(capacity_factor * (1 - sparsity) * size)``
  entries; if more pass, the largest ones are kept (exactly) and the rest
  stays in the error-feedback residual.

  Args:
    sparsity: target fraction of zeros, in ``[0, 1)``.
    stochastic: unbiased stochastic pruning below the threshold.
    capacity_factor: buffer slots per expected kept entry, ``>= 1``.
    sample_size: entries used for the fit.

  Returns:
    A :class:`Compressor`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> g = jnp.exp(jax.random.normal(jax.random.key(0), (10_000,)))
    >>> c = lognormal(0.99)
    >>> dense = c.decompress(c.compress(g, jax.random.key(1)), g.shape)
    >>> 0.008 < float(jnp.mean(dense != 0)) < 0.012
    True

  References:
    Chmiel et al., "Neural gradients are near-lognormal: improved quantized
    and sparse training", ICLR 2021, https://arxiv.org/abs/2006.08173
  """
  name = f"lognormal({sparsity!r}{', stochastic=True' if stochastic else ''})"
  if (isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real)
      or not 0.0 <= sparsity < 1.0):
    raise ValueError(f"lognormal: sparsity must be in [0, 1), got {sparsity!r}")
  if not capacity_factor >= 1.0:
    raise ValueError(f"lognormal: capacity_factor must be >= 1, got "
                     f"{capacity_factor!r}")
  if int(sample_size) < 2:
    raise ValueError(f"lognormal: sample_size must be >= 2, got {sample_size!r}")
  sparsity = float(sparsity)
  density = 1.0 - sparsity

  def compress(x, key):
    flat = _flatten(x, name)
    size = flat.shape[0]
    stride = max(1, size // int(sample_size))
    fit = lognormal_math.fit_lognormal(flat[::stride])
    tau = lognormal_math.lognormal_threshold(fit, sparsity,
                                             stochastic=stochastic)
    capacity = min(size, max(1, math.ceil(capacity_factor * density * size)))
    source = flat
    if stochastic:
      mag = jnp.abs(flat).astype(jnp.float32)
      u = jax.random.uniform(keys.as_key(key, who=name), (size,), jnp.float32)
      keep = (mag >= tau) | jnp.isnan(mag)
      promote = ~keep & (u * tau < mag)
      source = jnp.where(keep, flat,
                         jnp.where(promote, jnp.sign(flat) * tau.astype(
                             flat.dtype), jnp.zeros((), flat.dtype)))
      # Everything non-zero in `source` now has |source| >= tau.
    index = selection.select_above(source, tau, capacity)
    return _pack(flat, source, index)

  return Compressor(compress, _flat_identity, name)


def nm(n: int, m: int, *, axis: int = -2) -> Compressor:
  """Structured N:M sparsification: keeps the ``n`` largest |x| of every ``m``.

  Groups are ``m`` consecutive entries along ``axis`` (default ``-2``, the
  input axis of Flax ``Dense``/``Conv`` kernels; see
  :func:`sparse_jax.masks.nm_mask`, whose tie rule it inherits: the lower
  index wins, NaN ranks lowest). ``n`` is the number KEPT. The compressed
  form is structured: the kept values, ``n`` per group, and their offsets
  inside the group as ``uint8`` (1 byte instead of a 4-byte index).

  Args:
    n: entries kept per group, ``1 <= n <= m``.
    m: group size, ``m <= 256``.
    axis: the grouping axis; its size must be divisible by ``m``.

  Returns:
    A :class:`Compressor`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> c = nm(2, 4, axis=0)
    >>> out = c.compress(jnp.array([0.1, -3.0, 2.0, 0.2]), jax.random.key(0))
    >>> c.decompress(out, (4,)).tolist()
    [0.0, -3.0, 2.0, 0.0]

  References:
    Zhou et al., "Learning N:M Fine-grained Structured Sparse Neural Networks
    From Scratch", ICLR 2021, https://arxiv.org/abs/2102.04010
  """
  from sparse_jax.masks import nm_mask  # pylint: disable=g-import-not-at-top

  if isinstance(n, bool) or isinstance(m, bool) or not (
      isinstance(n, numbers.Integral) and isinstance(m, numbers.Integral)):
    raise ValueError(f"nm: n and m must be ints, got n={n!r}, m={m!r}")
  n, m = int(n), int(m)
  if not 1 <= n <= m:
    raise ValueError(f"nm: need 1 <= n <= m (n is the number KEPT), got n={n}, "
                     f"m={m}")
  if m > 256:
    raise ValueError(f"nm: m must be <= 256 (offsets are sent as uint8), got "
                     f"m={m}")
  name = f"nm({n}, {m}, axis={axis})"

  def _moved_shape(shape):
    ax = axis % len(shape)
    return ax, tuple(s for i, s in enumerate(shape) if i != ax) + (shape[ax],)

  def compress(x, key):
    del key
    x = jnp.asarray(x)
    if x.ndim == 0 or not -x.ndim <= axis < x.ndim:
      raise ValueError(f"{name}: axis {axis} is invalid for shape {x.shape}")
    if x.shape[axis] % m:
      raise ValueError(f"{name}: the size along axis {axis} of shape "
                       f"{x.shape} is not divisible by m={m}")
    _flatten(x, name)
    keep = nm_mask(x, n, m, axis=axis)
    groups = jnp.moveaxis(x, axis, -1).reshape(-1, m)
    kept = jnp.moveaxis(keep, axis, -1).reshape(-1, m)
    offsets = jnp.arange(m, dtype=jnp.int32)
    # Kept positions in increasing order: largest key = smallest offset.
    pos = jax.lax.top_k(jnp.where(kept, m - offsets, -1 - offsets), n)[1]
    values = jnp.take_along_axis(groups, pos, axis=-1)
    return Compressed(values.reshape(-1), pos.astype(jnp.uint8).reshape(-1))

  def flat_indices(indices, shape):
    shape = tuple(shape)
    ax, moved = _moved_shape(shape)
    group = jnp.arange(indices.shape[0], dtype=_INDEX_DTYPE) // n
    moved_flat = group * m + indices.astype(_INDEX_DTYPE)
    coords = list(jnp.unravel_index(moved_flat, moved))
    coords.insert(ax, coords.pop())     # move the group axis back in place
    return jnp.ravel_multi_index(tuple(coords), shape,
                                 mode="clip").astype(_INDEX_DTYPE)

  return Compressor(compress, flat_indices, name)
