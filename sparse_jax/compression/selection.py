"""Exact magnitude selection kernels on flat arrays (pure math, no optax).

Two primitives that the compressors are built on:

* :func:`top_k_indices` - the ``k`` entries of largest ``|x|``, exactly the set
  and order that ``jax.lax.top_k(jnp.abs(x), k)`` returns (descending ``|x|``,
  lower index first on ties, NaN ranked largest), but for small ``k / d``
  several times faster than ``lax.top_k`` on CPU.
* :func:`select_above` - every entry with ``|x| >= tau`` compacted into a
  buffer of static size ``capacity`` (index order), with exact fallbacks when
  nothing or too much passes.

Both return static shapes, so they work under ``jit``, ``vmap`` and inside
``jax.shard_map``; unused buffer slots carry the index ``d`` (one past the
end), so a scatter with ``mode="drop"`` ignores them.

How the fast top-k works: the ``k``-th largest ``|x|`` is estimated from a
strided sample; a threshold ``t`` a little below it (the sample quantile for
``margin * k`` entries) makes a few candidates, ``~margin * k``. Blocks of
``block`` consecutive entries holding a candidate are flagged in one fused
read of ``x`` (a block-wise ``any``), their indices compacted
(:func:`compact` over ``d / block`` flags only), the flagged blocks gathered,
the candidates among them compacted again, and ``lax.top_k`` runs on that
small buffer. Every entry that is not gathered
is ``< t``; when at least ``k`` gathered entries are ``>= t`` the answer is
therefore exact. Otherwise (bad sample, many ties, too many flagged blocks)
``lax.cond`` falls back to the full ``lax.top_k``, so the result is always
exact; only the speed depends on the data.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Below this size lax.top_k / compact() on the whole array are cheap enough.
_MIN_FAST_SIZE = 1 << 15
# Strided sample used to estimate the k-th largest magnitude.
_SAMPLE_SIZE = 1 << 16
# Candidates aimed for, as a multiple of k (the threshold sits this far below
# the estimated k-th largest magnitude).
_MARGIN = 1.5
# Flagged blocks the compaction buffer holds, as a multiple of k.
_BLOCK_CAPACITY = 2.0


def _not_below(a: jax.Array, t: jax.Array) -> jax.Array:
  """``a >= t`` that is also True where ``a`` is NaN (NaN ranks largest)."""
  return jnp.logical_not(a < t)


def _block_size(d: int, slots: int) -> int:
  """Largest block in {16, 8, 4} whose gathered buffer stays <= d / 8."""
  for block in (16, 8, 4):
    if slots * block * 8 <= d:
      return block
  return 0


def _fast_path_ok(d: int, k: int) -> bool:
  if d < _MIN_FAST_SIZE:
    return False
  slots = math.ceil(_BLOCK_CAPACITY * k)
  stride = max(1, d // _SAMPLE_SIZE)
  sample = -(-d // stride)
  rank = math.ceil(_MARGIN * k * sample / d)
  return _block_size(d, slots) > 0 and rank < sample


_ROW = 256   # row length of the two-level prefix sum in compact()


def _prefix_count(mask: jax.Array) -> jax.Array:
  """Inclusive prefix sum of a 1-D bool array, as int32.

  Rows of 256 are summed with a matmul against a triangular matrix (exact:
  at most 256 ones per row, and much faster on CPU than ``jnp.cumsum``),
  then the row totals with an ordinary ``cumsum`` over ``n / 256`` rows.
  """
  n = mask.shape[0]
  if n < 4 * _ROW:
    return jnp.cumsum(mask, dtype=jnp.int32)
  rows = -(-n // _ROW)
  padded = jnp.pad(mask, (0, rows * _ROW - n)).reshape(rows, _ROW)
  tri = jnp.triu(jnp.ones((_ROW, _ROW), jnp.float32))
  within = jnp.matmul(padded.astype(jnp.float32), tri,
                      precision=jax.lax.Precision.HIGHEST).astype(jnp.int32)
  offset = jnp.cumsum(within[:, -1]) - within[:, -1]
  return (within + offset[:, None]).reshape(-1)[:n]


def compact(mask: jax.typing.ArrayLike, size: int) -> jax.Array:
  """Indices of the first ``size`` True entries of ``mask``, in order.

  Same as ``jnp.nonzero(mask, size=size, fill_value=len(mask))[0]``, several
  times faster on CPU: a prefix count, then a binary search for the position
  where the count reaches ``1, 2, ..., size``.

  Args:
    mask: a 1-D bool array of length ``n``.
    size: a static int.

  Returns:
    An int32 array of shape ``(size,)``; slots past the number of True
    entries hold ``n``.

  Example:
    >>> import jax.numpy as jnp
    >>> compact(jnp.array([False, True, False, True]), 3).tolist()
    [1, 3, 4]
  """
  mask = jnp.asarray(mask, bool)
  counts = _prefix_count(mask)
  targets = jnp.arange(1, size + 1, dtype=jnp.int32)
  return jnp.searchsorted(counts, targets, side="left").astype(jnp.int32)


def _gather_flagged(x: jax.Array, t: jax.Array, slots: int, block: int):
  """Gathers the (at most ``slots``) blocks holding an entry with |x| >= t.

  Returns:
    ``(values, indices, valid, num_flagged)``: the gathered entries and their
    flat indices as 1-D arrays of size ``slots * block + tail``, a bool array
    marking gathered entries with ``|x| >= t`` (NaN included), and the number
    of flagged blocks (the gather is complete iff it is ``<= slots``).
  """
  d = x.shape[0]
  nb = d // block
  main = x[:nb * block].reshape(nb, block)
  flags = jnp.any(_not_below(jnp.abs(main), t), axis=1)
  num_flagged = jnp.sum(flags, dtype=jnp.int32)
  rows = compact(flags, slots)
  gathered = main.at[rows].get(mode="fill", fill_value=0).reshape(-1)
  index = (rows[:, None] * block
           + jnp.arange(block, dtype=jnp.int32)[None, :]).reshape(-1)
  row_used = jnp.repeat(jnp.arange(slots) < num_flagged, block)
  tail = d - nb * block
  if tail:
    gathered = jnp.concatenate([gathered, x[nb * block:]])
    index = jnp.concatenate(
        [index, jnp.arange(nb * block, d, dtype=jnp.int32)])
    row_used = jnp.concatenate([row_used, jnp.ones((tail,), bool)])
  valid = row_used & _not_below(jnp.abs(gathered), t)
  return gathered, index.astype(jnp.int32), valid, num_flagged


def top_k_indices(x: jax.typing.ArrayLike, k: int) -> jax.Array:
  """Indices of the ``k`` entries of largest magnitude of a 1-D array, exact.

  Same result as ``jax.lax.top_k(jnp.abs(x), k)[1]``: sorted by descending
  ``|x|``, the lower index first among equal magnitudes, NaN ranked largest.

  Args:
    x: a 1-D array of size ``d``.
    k: a static int, ``1 <= k <= d``.

  Returns:
    An int32 array of shape ``(k,)``.

  Example:
    >>> import jax.numpy as jnp
    >>> top_k_indices(jnp.array([0.5, -3.0, 2.0, 0.1]), 2).tolist()
    [1, 2]
  """
  x = jnp.asarray(x)
  if x.ndim != 1:
    raise ValueError(f"top_k_indices expects a 1-D array, got shape {x.shape}")
  d = x.shape[0]
  if not 1 <= k <= d:
    raise ValueError(f"top_k_indices needs 1 <= k <= d, got k={k}, d={d}")

  def full(x):
    return jax.lax.top_k(jnp.abs(x), k)[1].astype(jnp.int32)

  if not _fast_path_ok(d, k):
    return full(x)
  fast, ok = _sampled_top_k(x, k)
  return jax.lax.cond(ok, lambda x: fast, full, x)


def _sampled_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The fast path alone: ``(indices, ok)``; the indices are exact iff ``ok``."""
  d = x.shape[0]
  slots = math.ceil(_BLOCK_CAPACITY * k)
  block = _block_size(d, slots)
  stride = max(1, d // _SAMPLE_SIZE)
  sample = jnp.abs(x[::stride])
  rank = math.ceil(_MARGIN * k * sample.shape[0] / d)
  # The rank-th largest sampled magnitude. (min, not [rank - 1]: XLA rewrites
  # a slice of the top_k values into a full sort of the sample.)
  t = jnp.min(jax.lax.top_k(sample, rank)[0])
  gathered, index, valid, num_flagged = _gather_flagged(x, t, slots, block)
  # Second compaction: the ~margin * k candidates, in index order.
  room = math.ceil(_BLOCK_CAPACITY * k)
  count = jnp.sum(valid, dtype=jnp.int32)
  pos = compact(valid, room)
  cand = gathered.at[pos].get(mode="fill", fill_value=0)
  # Magnitudes are >= 0, so -1 can never beat a candidate; NaN stays NaN.
  keys = jnp.where(jnp.arange(room) < count, jnp.abs(cand), -1.0)
  best = jax.lax.top_k(keys, k)[1]
  ok = (num_flagged <= slots) & (count >= k) & (count <= room)
  return index.at[pos[best]].get(mode="fill", fill_value=d), ok


def select_above(x: jax.typing.ArrayLike, tau: jax.typing.ArrayLike,
                 capacity: int) -> jax.Array:
  """Indices of the entries with ``|x| >= tau``, in a buffer of ``capacity``.

  Exact in every case:

  * if ``1 <= count <= capacity`` entries pass, all of them, in increasing
    index order, then padding;
  * if none passes, the single entry of largest ``|x|`` (at least one entry
    is always kept);
  * if more than ``capacity`` pass, the ``capacity`` entries of largest
    ``|x|`` (:func:`top_k_indices`).

  NaN entries count as passing.

  Args:
    x: a 1-D array of size ``d``.
    tau: a scalar threshold (may be traced).
    capacity: a static int, ``1 <= capacity <= d``.

  Returns:
    An int32 array of shape ``(capacity,)``; unused slots hold ``d``.

  Example:
    >>> import jax.numpy as jnp
    >>> select_above(jnp.array([0.5, -3.0, 2.0, 0.1]), 1.0, 3).tolist()
    [1, 2, 4]
  """
  x = jnp.asarray(x)
  if x.ndim != 1:
    raise ValueError(f"select_above expects a 1-D array, got shape {x.shape}")
  d = x.shape[0]
  if not 1 <= capacity <= d:
    raise ValueError(
        f"select_above needs 1 <= capacity <= d, got capacity={capacity}, d={d}")
  tau = jnp.asarray(tau, x.dtype if jnp.issubdtype(x.dtype, jnp.floating)
                    else jnp.float32)

  def argmax_branch(x):
    first = jax.lax.top_k(jnp.abs(x), 1)[1].astype(jnp.int32)
    return jnp.concatenate([first, jnp.full((capacity - 1,), d, jnp.int32)])

  def top_branch(x):
    return top_k_indices(x, capacity)

  block = _block_size(d, capacity) if d >= _MIN_FAST_SIZE else 0
  if block:
    gathered, index, valid, num_flagged = _gather_flagged(
        x, tau, capacity, block)
    count = jnp.sum(valid, dtype=jnp.int32)
    pos = compact(valid, capacity)
    found = index.at[pos].get(mode="fill", fill_value=d)
    overflow = (num_flagged > capacity) | (count > capacity)
  else:
    passing = _not_below(jnp.abs(x), tau)
    count = jnp.sum(passing, dtype=jnp.int32)
    found = compact(passing, capacity)
    overflow = count > capacity
  branch = jnp.where(overflow, 2, jnp.where(count == 0, 0, 1))
  return jax.lax.switch(branch, [argmax_branch, lambda x: found, top_branch],
                        x)
