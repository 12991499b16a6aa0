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
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax._core import keys
from sparse_jax.compression import formats
from sparse_jax.compression import lognormal_model as lognormal_math
from sparse_jax.compression import selection

_INDEX_DTYPE = jnp.int32
_MAX_SIZE = np.iinfo(np.int32).max


class Compressed(NamedTuple):
  """The compressed form of one array: what goes on the wire.

  Attributes:
    values: the kept values (unused slots hold 0); for the low-precision
      compressors, their uint8 codes (see ``Compressor.decode``).
    indices: encoded positions, see ``Compressor.flat_indices``; an empty
      last axis means the dense form (every position, in order).
    scale: ``None``, or the float32 side information a decoder needs (the
      per-tensor scale of a low-precision format, and the format chosen).
  """
  values: jax.Array
  indices: jax.Array
  scale: Any = None


class Compressor(NamedTuple):
  """A gradient compressor: pure functions acting on one array.

  Attributes:
    compress: ``(x, key) -> Compressed``; output shapes depend on ``x.shape``
      only. ``key`` is a PRNG key (used by the random compressors).
    flat_indices: ``(indices, shape) -> int32 array`` of flat indices into
      ``x.ravel()``, one per entry of ``values``; an index equal to
      ``prod(shape)`` marks an unused slot.
    name: a short description, e.g. ``"top_k(0.001)"``.
    decode: ``None`` when ``values`` are the values themselves; otherwise
      ``Compressed -> float32 values`` (leading axes kept; possibly longer
      than the number of values, e.g. packed 4-bit codes: the extra tail is
      ignored).
    fixed_layout: the message puts the same positions in the same places
      on every worker (a dense low-precision tensor), so workers' messages
      can be summed chunk by chunk (a reduce-scatter) instead of gathered.
    format_of: low-precision formats: ``Compressed -> float32`` exponent
      width of the message's format (what :func:`lognormal_fp` chose; error
      feedback keeps it in ``local.exponent_bits`` for logging).
  """
  compress: Callable[[jax.Array, jax.Array], Compressed]
  flat_indices: Callable[[jax.Array, Sequence[int]], jax.Array]
  name: str
  decode: Callable[[Compressed], jax.Array] | None = None
  fixed_layout: bool = False
  format_of: Callable[[Compressed], jax.Array] | None = None

  def values_of(self, compressed: Compressed, count: int) -> jax.Array:
    """The (decoded) values of ``compressed``: ``count`` on the last axis."""
    if self.decode is None:
      return jnp.asarray(compressed.values)
    return self.decode(compressed)[..., :count]

  def decompress(self, compressed: Compressed, shape: Sequence[int],
                 dtype=None) -> jax.Array:
    """Scatter-adds ``compressed`` into a dense zero array of ``shape``.

    Leading axes of ``compressed`` (e.g. a worker axis from ``all_gather``)
    are summed over: duplicate indices ADD.
    """
    if dtype is None:
      dtype = (jnp.float32 if self.decode is not None
               else jnp.asarray(compressed.values).dtype)
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
    shape, size = target.shape, target.size
    dense_form = compressed.indices.shape[-1] == 0
    values = self.values_of(compressed, size if dense_form
                            else compressed.indices.shape[-1])
    values = values * jnp.asarray(scale, values.dtype)
    if dense_form:
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
    dense_form = compressed.indices.shape[-1] == 0
    values = self.values_of(compressed, target.size if dense_form
                            else compressed.indices.shape[-1])
    keep = (values == 0).astype(target.dtype)
    if dense_form:
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


def _check_sample_size(sample_size, name: str) -> int:
  if int(sample_size) < 2:
    raise ValueError(f"{name}: sample_size must be >= 2, got {sample_size!r}")
  return int(sample_size)


def _sampled_fit(flat: jax.Array, sample_size: int):
  """The lognormal fit of a strided sample of about ``sample_size`` entries."""
  stride = max(1, flat.shape[0] // sample_size)
  return lognormal_math.fit_lognormal(flat[::stride])


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


def threshold(tau: float, *, max_fraction: float = 0.01) -> Compressor:
  """Keeps every entry with ``|x| >= tau`` (at least the largest one).

  The wire buffer has a static size of ``max(1, round(max_fraction * size))``
  slots; if more entries pass, the ``max_fraction * size`` largest are kept
  (exact), the rest stays in the error-feedback residual.

  Args:
    tau: the magnitude threshold, ``>= 0``.
    max_fraction: the buffer size as a fraction of the tensor, in ``(0, 1]``
      (default 1%). It sets the bytes on the wire (whatever the data), so
      keep it close to the density you expect. (Before 0.2 the default was
      1.0, a buffer as large as the tensor: the EF step then cost ~10x a
      dense SGD step; at 1%, with ``tau`` passing about 1% of the entries,
      it costs 1.4-1.6x the dense step of a 1.9M-parameter MLP at batch 256
      on a 2-core CPU, ``python -m benchmarks.compression``; 0.5% and 2%
      were slower.)

  Returns:
    A :class:`Compressor`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> c = threshold(1.0, max_fraction=0.5)
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
  sample_size = _check_sample_size(sample_size, "lognormal")
  sparsity = float(sparsity)
  density = 1.0 - sparsity

  def compress(x, key):
    flat = _flatten(x, name)
    size = flat.shape[0]
    fit = _sampled_fit(flat, sample_size)
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


# ------------------------------------------------- low-precision formats --


def _codes_message(y, e, m, radix, rounding, key, name, packed=None):
  """uint8 codes of ``y`` (float32, already scaled); 4-bit codes packed."""
  rkey = keys.as_key(key, who=name) if rounding == "stochastic" else None
  codes = formats.encode(y, e, m, radix=radix, rounding=rounding, key=rkey)
  if packed is None:
    packed = 1 + e + m <= 4
  return formats.pack4(codes) if packed else codes


def _codes_values(values, e, m, radix, packed: bool):
  codes = formats.unpack4(values) if packed else values
  return formats.decode(codes, e, m, radix=radix)


def _check_rounding(rounding, name):
  if rounding not in formats.ROUNDINGS:
    raise ValueError(f"{name}: rounding must be one of {formats.ROUNDINGS}, "
                     f"got {rounding!r}")


def _amax(flat):
  return jnp.max(jnp.abs(flat)).astype(jnp.float32)


def _max_scale(amax, top):
  """Per-tensor scale mapping ``amax`` onto the format's max ``top`` (1 for 0)."""
  return jnp.where(amax > 0, amax / top, 1.0).astype(jnp.float32)


def fp_quantize(exponent_bits: int, mantissa_bits: int, *,
                rounding: str = "nearest", scale: Any = "max",
                radix: int = 2) -> Compressor:
  """Sends every value in a low-precision float format (sign, e, m bits).

  The tensor is divided by a per-tensor scale, rounded onto the format's grid
  (:mod:`sparse_jax.compression.formats`: subnormals, saturation at the max,
  every code finite) and sent as one byte per value (two per byte for 4-bit
  formats) plus the float32 scale. ``(4, 3)`` and ``(5, 2)`` round exactly as
  ml_dtypes' ``float8_e4m3fn`` / ``float8_e5m2`` (same bit patterns). Dense
  and position-wise (``fixed_layout``): under data parallelism the workers'
  messages are summed by a reduce-scatter (see
  :func:`~sparse_jax.compression.error_feedback`), 1/4 of fp32's bytes for
  8-bit formats.

  Args:
    exponent_bits: ``e >= 1``.
    mantissa_bits: ``m >= 0``; ``1 + e + m <= 8``.
    rounding: ``"nearest"`` (ties to even; contractive, the choice with
      error feedback) or ``"stochastic"`` (unbiased within the range, the
      choice without error feedback; needs the key error feedback passes).
    scale: ``"max"`` (default: max |x| maps to the format's largest value,
      nothing saturates), a positive float (fixed: ``x / scale`` is rounded,
      nothing extra is sent) or ``None`` (no scaling).
    radix: 2, or 4 for radix-4 formats (no mantissa; see :func:`fp4`).

  Returns:
    A :class:`Compressor` with ``decode`` and ``fixed_layout=True``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> c = fp_quantize(4, 3, scale=None)
    >>> out = c.compress(jnp.array([0.3, -1.0, 2.0, 100.0]), jax.random.key(0))
    >>> out.values.dtype, c.decompress(out, (4,)).tolist()
    (dtype('uint8'), [0.3125, -1.0, 2.0, 96.0])

  References:
    Micikevicius et al., "FP8 Formats for Deep Learning", 2022,
    https://arxiv.org/abs/2209.05433;
    Chmiel et al., "Neural gradients are near-lognormal: improved quantized
    and sparse training", ICLR 2021, https://arxiv.org/abs/2006.08173
  """
  e, m = formats.check_format(exponent_bits, mantissa_bits, radix,
                              "fp_quantize")
  _check_rounding(rounding, "fp_quantize")
  fixed = None
  if scale is not None and not (isinstance(scale, str) and scale == "max"):
    if (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
        or not math.isfinite(scale) or scale <= 0):
      raise ValueError(f"fp_quantize: scale must be 'max', None or a positive "
                       f"float, got {scale!r}")
    fixed = float(scale)
  elif scale is None:
    fixed = 1.0
  label = formats.describe(e, m, radix)
  name = (f"fp_quantize({label}"
          + (", stochastic" if rounding == "stochastic" else "")
          + ("" if fixed is None else f", scale={scale!r}") + ")")
  top = float(formats.max_value(e, m, radix))
  packed = 1 + e + m <= 4

  def compress(x, key):
    flat = _flatten(x, name).astype(jnp.float32)
    s = _max_scale(_amax(flat), top) if fixed is None else jnp.float32(fixed)
    codes = _codes_message(flat / s, e, m, radix, rounding, key, name)
    return Compressed(codes, jnp.zeros((0,), _INDEX_DTYPE),
                      s if fixed is None else None)

  def decode(c):
    values = _codes_values(c.values, e, m, radix, packed)
    s = jnp.float32(fixed) if fixed is not None else c.scale[..., None]
    return values * s

  return Compressor(compress, _flat_identity, name, decode, True,
                    lambda c: jnp.float32(e))


def fp4(*, rounding: str = "stochastic") -> Compressor:
  """Radix-4 FP4 (1 sign, 3 exponent bits, no mantissa), per-tensor scaling.

  Sun et al.'s 4-bit gradient format: the levels are ``s * 4**-j``,
  ``j = 0..6``, and 0, with ``s = max |x|`` per tensor (the adaptive
  per-layer gradient scale). Stochastic rounding by default (unbiased between
  neighbouring levels), as the paper uses for gradients; two codes per byte.
  Stochastic rounding is unbiased but not contractive (a value far below the
  smallest level becomes that level with a small probability: an error much
  larger than the value), while error feedback's analysis assumes a
  contractive compressor; ``rounding="nearest"`` is the contractive choice.
  On compress_digits both train, with and without error feedback
  (docs/RESULTS.md, compress_formats).
  (The paper's two-phase rounding, which shifts the grid by a factor 2 for
  the two backward GEMMs, is about the backward pass's matmuls, not a message
  format, and is not modelled.)

  Args:
    rounding: ``"stochastic"`` (default) or ``"nearest"``.

  Returns:
    ``fp_quantize(3, 0, radix=4, rounding=rounding)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> c = fp4(rounding="nearest")
    >>> out = c.compress(jnp.array([1.0, 0.3, -0.06, 0.0]), jax.random.key(0))
    >>> out.values.shape, c.decompress(out, (4,)).tolist()
    ((2,), [1.0, 0.25, -0.0625, 0.0])

  References:
    Sun et al., "Ultra-Low Precision 4-bit Training of Deep Neural
    Networks", NeurIPS 2020
  """
  return fp_quantize(3, 0, radix=4, rounding=rounding)._replace(
      name=f"fp4({rounding})")


def lognormal_fp(bits: int = 8, *, rounding: str = "nearest",
                 sample_size: int = 1 << 16) -> Compressor:
  """A ``bits``-bit float format chosen per tensor from its lognormal fit.

  Chmiel et al.'s rule: fit ``ln|x| ~ N(mu, sigma^2)`` (strided sample of
  ``sample_size`` entries, non-zeros only), then pick the exponent/mantissa
  split ``(e, bits - 1 - e)``, ``e = 1 .. bits - 1``, whose expected
  squared relative rounding error under that lognormal is smallest
  (:func:`~sparse_jax.compression.formats.expected_relative_mse`: each value's
  error relative to itself; the per-tensor scale
  maps max |x| to the format's max, as in :func:`fp_quantize`). Wide
  distributions (large ``sigma``) get more exponent bits. The message is the
  codes, the scale and the chosen ``e`` (8 bytes of side information);
  ``Compressed.scale[..., 1]`` is the exponent width, for logging.

  Args:
    bits: total bits per value, 3 to 8.
    rounding: ``"nearest"`` or ``"stochastic"``.
    sample_size: entries used for the fit.

  Returns:
    A :class:`Compressor` with ``decode`` and ``fixed_layout=True``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> c = lognormal_fp(8)
    >>> g = jnp.exp(3.0 * jax.random.normal(jax.random.key(0), (4096,)))
    >>> int(c.compress(g, jax.random.key(1)).scale[1])   # sigma 3: wide
    5

  References:
    Chmiel et al., "Neural gradients are near-lognormal: improved quantized
    and sparse training", ICLR 2021, https://arxiv.org/abs/2006.08173
  """
  if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not (
      3 <= bits <= 8):
    raise ValueError(f"lognormal_fp: bits must be an int in [3, 8], got "
                     f"{bits!r}")
  bits = int(bits)
  _check_rounding(rounding, "lognormal_fp")
  sample_size = _check_sample_size(sample_size, "lognormal_fp")
  name = f"lognormal_fp({bits}" + (", stochastic" if rounding == "stochastic"
                                   else "") + ")"
  packed = bits <= 4

  def compress(x, key):
    flat = _flatten(x, name).astype(jnp.float32)
    fit = _sampled_fit(flat, sample_size)
    amax = _amax(flat)
    e, m = formats.choose_split(fit.mu, fit.sigma,
                                jnp.log(jnp.maximum(amax, 1e-38)), bits)
    # One encode with the chosen (traced) split: no branch per format, so it
    # also vectorises (a reduce-scatter encodes chunks under vmap).
    s = _max_scale(amax, formats.max_value(e, m))
    codes = _codes_message(flat / s, e, m, 2, rounding, key, name, packed)
    return Compressed(codes, jnp.zeros((0,), _INDEX_DTYPE),
                      jnp.stack([s, e.astype(jnp.float32)]))

  def decode(c):
    e = c.scale[..., 1:2].astype(jnp.int32)
    values = _codes_values(c.values, e, bits - 1 - e, 2, packed)
    return values * c.scale[..., 0:1]

  return Compressor(compress, _flat_identity, name, decode, True,
                    lambda c: jnp.mean(c.scale[..., 1]))


def compose(sparsifier: Compressor, quantizer: Compressor) -> Compressor:
  """Sparsify, then send the kept values in a low-precision format.

  E.g. ``compose(top_k(0.01), fp_quantize(4, 3))``: the top 1% as FP8 codes
  plus their int32 indices (5 bytes per kept value instead of 8). The
  quantizer sees the vector of kept values (its scale is theirs).

  Args:
    sparsifier: a compressor whose values are floats (top_k, rand_k,
      threshold, lognormal, nm).
    quantizer: a low-precision compressor (:func:`fp_quantize`,
      :func:`fp4`, :func:`lognormal_fp`).

  Returns:
    A :class:`Compressor` (positions from ``sparsifier``, values decoded by
    ``quantizer``).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> c = compose(top_k(0.5), fp_quantize(4, 3, scale=None))
    >>> out = c.compress(jnp.array([0.3, -1.1, 2.0, 0.01]), jax.random.key(0))
    >>> c.decompress(out, (4,)).tolist()
    [0.0, -1.125, 2.0, 0.0]
  """
  for role, comp in (("sparsifier", sparsifier), ("quantizer", quantizer)):
    if not isinstance(comp, Compressor):
      raise ValueError(f"compose: {role} must be a Compressor, got {comp!r}")
  if sparsifier.decode is not None or quantizer.decode is None:
    raise ValueError(f"compose: expects (a sparsifier with float values, a "
                     f"low-precision quantizer), got ({sparsifier.name}, "
                     f"{quantizer.name})")
  name = f"compose({sparsifier.name}, {quantizer.name})"

  def compress(x, key):
    key = keys.as_key(key, who=name)
    c = sparsifier.compress(x, jax.random.fold_in(key, 0))
    q = quantizer.compress(c.values, jax.random.fold_in(key, 1))
    return Compressed(q.values, c.indices, q.scale)

  return Compressor(compress, sparsifier.flat_indices, name, quantizer.decode,
                    False, quantizer.format_of)
