"""Transposable N:M masks: every row AND column of each m x m tile keeps n.

A weight matrix ``W`` of shape ``(..., in, out)`` is cut into true 2-D tiles
``W[..., i*m:(i+1)*m, j*m:(j+1)*m]`` (for a Conv kernel ``(H, W, in, out)`` this
happens at every spatial position). A transposable N:M mask keeps exactly ``n``
entries in every row and every column of every tile, so both ``W`` (groups along
``in``) and ``W^T`` (groups along ``out``) are N:M sparse and the backward GEMM
can use the same sparse kernel as the forward one.

Methods (all batched over every tile at once and jittable):

* ``"exact"``: an optimal mask. Picking the mask is a max-weight ``n``-regular
  bipartite subgraph (a transportation problem whose constraint matrix is
  totally unimodular). For ``m = 4`` (2:4, 1:4, 3:4) the two row halves are
  solved separately and joined on their column counts (one fused elementwise
  pass over the tiles, ~5x faster than scoring all 90 2:4 patterns). For other
  small ``m`` (at most 128 valid patterns per tile) every pattern is scored
  with one matmul and the best taken.
  Otherwise the solver starts from the row-wise top-``n`` mask, which is optimal
  when only rows are constrained, and moves the surplus of over-full columns to
  under-full ones along shortest augmenting paths (successive shortest paths of
  min-cost flow), which keeps the mask optimal for its column counts at every
  step. Tiles are sorted by how many augmentations they need and processed in
  chunks, so the cost follows the total work, not the worst tile.
* ``"greedy"``: the 2-approximation of Hubara et al.: visit the entries in
  descending score order and keep one when its row and column still have fewer
  than ``n``. It can leave rows and columns SHORT of ``n``.
* ``"greedy_repair"``: greedy, then shortest (fewest-hop, then best-score)
  augmenting paths from short rows to short columns until every row and column
  keeps exactly ``n``. Faster than exact for large ``m``, not optimal.
* ``"entropic"``: near-optimal for large ``m`` (8:16, 16:32). The LP
  relaxation with an entropy term on every entry and its complement,
  ``max <z, x> + eps sum H(x_ij)`` over ``0 <= x <= 1`` with ``n`` per row
  and column, has the solution ``x_ij = sigmoid((z_ij - u_i - v_j) / eps)``
  (``z`` the tile's standardised scores); the row and column duals ``u, v``
  come from alternating Newton steps on the row/column sums. ``x`` is
  rounded by the greedy above (on ``x``), repaired to exactly ``n`` per row
  and column along augmenting paths (on the scores), then improved by
  exchanges of one column between two rows while any gains. On Gaussian
  tiles the kept ``|w|`` mass is within 0.3% of the optimum on every 8:16
  and 16:32 tile (mean gap ~0.03%); sparser patterns are harder for it
  (1:8: mean 0.06%, worst tile 2%), use ``"exact"`` there.

Ties are broken deterministically; NaN scores rank below every number.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from sparse_jax._core import sharding as _sharding
from sparse_jax.masks import _checks
from sparse_jax.masks.nm import nm_mask

METHODS = ("exact", "greedy", "greedy_repair", "entropic")
OBJECTIVES = ("l1", "l2")
# "exact" scores every pattern with a matmul when a tile has at most this many.
_MAX_PATTERNS = 128


# ---------------------------------------------------------------------------
# tiling


def to_tiles(w: jax.Array, m: int) -> jax.Array:
  """``(..., I, O) -> (T, m, m)``: all m x m tiles, rows from I, cols from O."""
  *lead, rows, cols = w.shape
  t = w.reshape(*lead, rows // m, m, cols // m, m)
  k = len(lead)
  t = jnp.moveaxis(t, k + 1, k + 2)  # (..., I/m, O/m, m, m)
  return t.reshape(-1, m, m)


def from_tiles(t: jax.Array, shape: tuple[int, ...], m: int) -> jax.Array:
  """Inverse of :func:`to_tiles`."""
  *lead, rows, cols = shape
  k = len(lead)
  t = t.reshape(*lead, rows // m, cols // m, m, m)
  t = jnp.moveaxis(t, k + 2, k + 1)
  return t.reshape(shape)


def _scores(w: jax.Array, objective: str, m: int) -> jax.Array:
  """Per-entry gain (|w| or w^2) as float32/float64; NaN -> -1; inf clipped."""
  dtype = jnp.float64 if w.dtype == jnp.float64 else jnp.float32
  a = jnp.abs(w.astype(dtype))
  if objective == "l2":
    a = a * a
  # keep sums of up to 2 m^2 scores finite.
  big = jnp.asarray(np.finfo(np.dtype(dtype)).max / (4.0 * m * m), dtype)
  a = jnp.minimum(a, big)
  return jnp.where(jnp.isnan(a), jnp.asarray(-1.0, dtype), a)


def _min_first(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """``(min, argmin)`` along a short ``axis`` (first index on ties)."""
  return x.min(axis=axis), jnp.argmin(x, axis=axis).astype(jnp.int32)


def _argmax_first(x: jax.Array, axis: int) -> jax.Array:
  """``argmax`` along a short ``axis`` (first index on ties)."""
  return jnp.argmax(x, axis=axis).astype(jnp.int32)


def _argmax_long(x: jax.Array) -> jax.Array:
  """``argmax`` over a long last axis (first index on ties).

  A max and a min reduction: for ~100 candidates XLA's CPU argmax (a variadic
  reduce) is several times slower. ``x`` must be NaN-free.
  """
  size = x.shape[-1]
  hit = x == x.max(axis=-1, keepdims=True)
  return jnp.min(jnp.where(hit, jnp.arange(size, dtype=jnp.int32), size),
                 axis=-1)


# ---------------------------------------------------------------------------
# exact by enumeration (small m)


@functools.lru_cache(maxsize=None)
def regular_patterns(n: int, m: int) -> np.ndarray:
  """All m x m 0/1 matrices with every row and column sum equal to n.

  Returned as a ``(count, m, m)`` boolean array in lexicographic order of the
  rows' column choices. Only sensible for small m (2:4 has 90, 4:8 has
  116,963,796,250).
  """
  rows = list(itertools.combinations(range(m), n))
  out = []

  def rec(prefix, col_counts):
    r = len(prefix)
    if r == m:
      out.append(prefix)
      return
    for choice in rows:
      counts = list(col_counts)
      ok = True
      for c in choice:
        counts[c] += 1
        if counts[c] > n:
          ok = False
          break
      # every column must still be able to reach n with the rows left.
      left = m - r - 1
      if ok and all(n - cc <= left for cc in counts):
        rec(prefix + [choice], counts)

  rec([], [0] * m)
  pats = np.zeros((len(out), m, m), dtype=bool)
  for k, choice in enumerate(out):
    for r, cols in enumerate(choice):
      pats[k, r, list(cols)] = True
  return pats


def _exact_by_patterns(s, n, chunk_size):
  m = s.shape[-1]
  pats = regular_patterns(n, m)
  p = jnp.asarray(pats.reshape(len(pats), m * m), s.dtype)
  table = jnp.asarray(pats)

  def solve(chunk):  # chunks keep the (tiles, patterns) scores in cache
    totals = chunk.reshape(-1, m * m) @ p.T
    return table[_argmax_long(totals)]  # first best pattern on ties

  return _in_chunks(solve, s, chunk_size)


# ---------------------------------------------------------------------------
# exact for m = 4 by splitting the rows in two halves


@functools.lru_cache(maxsize=None)
def _half_pairs(n: int, m: int):
  """Row choices and the row-pair choices of a half tile, by column counts.

  Returns ``(choices, groups)``: ``choices[k]`` is the k-th n-subset of the m
  columns; ``groups`` lists ``(counts, pairs)`` with ``pairs`` the ``(a, b)``
  choices of two rows whose column counts are ``counts``, kept only when the
  other half can complete every column to exactly n.
  """
  choices = list(itertools.combinations(range(m), n))
  by_counts: dict = {}
  for a, ca in enumerate(choices):
    for b, cb in enumerate(choices):
      counts = [0] * m
      for c in ca + cb:
        counts[c] += 1
      by_counts.setdefault(tuple(counts), []).append((a, b))
  groups = [(v, by_counts[v]) for v in sorted(by_counts)
            if tuple(n - c for c in v) in by_counts]
  return tuple(choices), tuple(groups)


def _exact_m4(s, n, chunk_size):
  """Optimal transposable n:4 masks of ``(T, 4, 4)`` score tiles.

  Rows 0-1 and rows 2-3 each pick a pair of row choices; the two halves fit
  when their column counts add to n everywhere. So the best tile is the best,
  over the column-count vectors v of the top half, of ``best_top[v] +
  best_bottom[n - v]``: for 2:4 that is 24 row scores, 72 pair sums and 19
  candidates per tile instead of scoring 90 patterns. Every step is
  elementwise over the tiles and carries the winner as a 16-bit code, so each
  chunk is one fused pass; the code is unpacked after the chunk loop (inside
  it, XLA would fuse the solve into all 16 mask bits and run it 16 times).
  """
  m = 4
  choices, groups = _half_pairs(n, m)
  bits = [sum(1 << c for c in cols) for cols in choices]
  index = {v: i for i, (v, _) in enumerate(groups)}

  def solve(chunk):
    x = [[chunk[:, r, c] for c in range(m)] for r in range(m)]
    row = [[sum(x[r][c] for c in cols) for cols in choices] for r in range(m)]

    def best_half(r0, r1, shift):
      out = []
      for _, pairs in groups:
        best, code = None, None
        for a, b in pairs:  # first best pair on ties
          val = row[r0][a] + row[r1][b]
          c = jnp.int32((bits[a] << (4 * r0 + shift)) |
                        (bits[b] << (4 * r1 + shift)))
          if best is None:
            best, code = val, jnp.full(val.shape, c)
          else:
            code = jnp.where(val > best, c, code)
            best = jnp.maximum(val, best)
        out.append((best, code))
      return out

    top, bot = best_half(0, 1, 0), best_half(2, 3, 0)
    best = code = None
    for v, _ in groups:
      (bt, ct), (bb, cb) = top[index[v]], bot[index[tuple(n - c for c in v)]]
      val, c = bt + bb, ct | cb
      if best is None:
        best, code = val, c
      else:
        code = jnp.where(val > best, c, code)
        best = jnp.maximum(val, best)
    return code

  t = s.shape[0]
  chunk = int(max(1, min(chunk_size, t)))
  pad = (-t) % chunk
  sp = jnp.pad(s, ((0, pad), (0, 0), (0, 0)))
  code = lax.map(solve, sp.reshape(-1, chunk, m, m)).reshape(-1)[:t]
  unpacked = (code[:, None] >> jnp.arange(m * m, dtype=jnp.int32)) & 1
  return unpacked.astype(bool).reshape(t, m, m)


# ---------------------------------------------------------------------------
# augmenting paths on the column graph
#
# Moving one unit from column c to column c' through row r removes (r, c) and
# adds (r, c'); its cost (negative gain) is s[r, c] - s[r, c'], allowed when
# (r, c) is kept and (r, c') is not. E[c, c'] is the cheapest such row. A path
# of such moves that visits distinct columns is always a valid set of flips.


def _column_graph(s: jax.Array, sel: jax.Array):
  inf = jnp.asarray(jnp.inf, s.dtype)
  removable = jnp.where(sel, s, inf)    # (T, r, c)
  addable = jnp.where(sel, -inf, s)     # (T, r, c')
  cost = removable[:, :, :, None] - addable[:, :, None, :]  # (T, r, c, c')
  return _min_first(cost, 1)


def _bellman_ford(dist, e, tol):
  """Jacobi Bellman-Ford from ``dist``; updates only on strict improvement."""
  m = dist.shape[-1]

  def relax(_, carry):
    dist, pred = carry
    best, arg = _min_first(dist[:, :, None] + e, 1)
    upd = best < dist - tol
    return jnp.where(upd, best, dist), jnp.where(upd, arg, pred)

  pred = jnp.full(dist.shape, -1, jnp.int32)
  return lax.fori_loop(0, m - 1, relax, (dist, pred))


def _layered_paths(dist, e):
  """Fewest-hop paths, best score among those (a DAG, so always simple)."""
  m = dist.shape[-1]
  inf = jnp.asarray(jnp.inf, dist.dtype)
  edge = jnp.isfinite(e)

  def layer(_, carry):
    dist, pred, reached, frontier = carry
    link = frontier[:, :, None] & edge
    cand = jnp.where(link, dist[:, :, None] + e, inf)
    new = ~reached & jnp.any(link, axis=1)
    best, arg = _min_first(cand, 1)
    dist = jnp.where(new, best, dist)
    pred = jnp.where(new, arg, pred)
    return dist, pred, reached | new, new

  pred = jnp.full(dist.shape, -1, jnp.int32)
  frontier = jnp.isfinite(dist)
  dist, pred, _, _ = lax.fori_loop(0, m - 1, layer,
                                   (dist, pred, frontier, frontier))
  return dist, pred


def _augment(s, sel, n, tol, *, repair):
  """One augmentation per tile that needs one (no-op elsewhere)."""
  t, m, _ = s.shape
  inf = jnp.asarray(jnp.inf, s.dtype)
  col_count = sel.sum(axis=1)
  e, via = _column_graph(s, sel)
  if repair:
    # start from a short row r: add (r, c) for an unkept (r, c).
    row_short = sel.sum(axis=2) < n
    start = jnp.where(row_short[:, :, None] & ~sel, -s, inf)  # (T, r, c)
    dist0, start_row = _min_first(start, 1)
    work = jnp.any(row_short, axis=-1)
    dist, pred = _layered_paths(dist0, e)
  else:
    # start from an over-full column (its surplus moves along the path).
    dist0 = jnp.where(col_count > n, jnp.zeros((), s.dtype), inf)
    start_row = jnp.full((t, m), -1, jnp.int32)
    work = jnp.any(col_count > n, axis=-1)
    dist, pred = _bellman_ford(dist0, e, tol)
  _, target = _min_first(jnp.where(col_count < n, dist, inf), -1)
  work = work & jnp.any((col_count < n) & jnp.isfinite(dist), axis=-1)

  ar = jnp.arange(m, dtype=jnp.int32)
  tiles = jnp.arange(t)

  def walk(_, carry):
    # one step back along the path, recording the entries it flips.
    flip, cur, active = carry
    p = jnp.take_along_axis(pred, cur[:, None], axis=1)[:, 0]
    step = active & (p >= 0)
    pp = jnp.maximum(p, 0)
    r = via[tiles, pp, cur]
    entries = (ar[None, :] == r[:, None])[:, :, None] & (
        (ar[None, :] == pp[:, None]) | (ar[None, :] == cur[:, None]))[:, None]
    flip = flip ^ (entries & step[:, None, None])
    # at the path's start (no predecessor), a repair adds (start_row, cur).
    first = active & (p < 0)
    r0 = jnp.take_along_axis(start_row, cur[:, None], axis=1)[:, 0]
    entry0 = ((ar[None, :] == r0[:, None])[:, :, None]
              & (ar[None, :] == cur[:, None])[:, None, :])
    flip = flip ^ (entry0 & (first & (r0 >= 0))[:, None, None])
    return flip, jnp.where(step, pp, cur), step

  flip, _, _ = lax.fori_loop(0, m, walk, (jnp.zeros_like(sel), target, work))
  return sel ^ flip


def _run_sorted(s, sel, num_aug, aug_fn, chunk_size):
  """Runs ``num_aug[t]`` augmentations on tile t, in chunks sorted by work."""
  t, m, _ = s.shape
  if t == 0:
    return sel
  chunk = int(min(chunk_size, t))
  pad = (-t) % chunk
  order = jnp.argsort(-num_aug, stable=True)
  s_sorted = jnp.pad(s[order], ((0, pad), (0, 0), (0, 0)))
  sel_sorted = jnp.pad(sel[order], ((0, pad), (0, 0), (0, 0)))
  work = jnp.pad(num_aug[order], (0, pad))
  num_chunks = (t + pad) // chunk

  def chunk_cond(carry):
    c, _ = carry
    return (c < num_chunks) & (work[jnp.minimum(c, num_chunks - 1) * chunk] > 0)

  def chunk_body(carry):
    c, sel_all = carry
    start = c * chunk
    s_c = lax.dynamic_slice_in_dim(s_sorted, start, chunk)
    sel_c = lax.dynamic_slice_in_dim(sel_all, start, chunk)
    steps = work[start]  # the chunk's largest amount of work
    sel_c = lax.fori_loop(0, steps, lambda _, x: aug_fn(s_c, x), sel_c)
    return c + 1, lax.dynamic_update_slice_in_dim(sel_all, sel_c, start, 0)

  _, sel_sorted = lax.while_loop(chunk_cond, chunk_body, (0, sel_sorted))
  return jnp.zeros_like(sel).at[order].set(sel_sorted[:t],
                                           unique_indices=True)


def _tolerance(s: jax.Array) -> jax.Array:
  m = s.shape[-1]
  eps = jnp.finfo(s.dtype).eps
  return (8 * m * eps * jnp.max(jnp.abs(s), axis=(1, 2)))[:, None]


def _exact_by_paths(s, n, chunk_size):
  sel = nm_mask(s, n, s.shape[-1], axis=-1)  # each row keeps its top n
  num_aug = jnp.maximum(sel.sum(axis=1) - n, 0).sum(axis=-1)
  aug = lambda s_c, sel_c: _augment(s_c, sel_c, n, _tolerance(s_c),
                                    repair=False)
  return _run_sorted(s, sel, num_aug, aug, chunk_size)


def _greedy_rounds(s, n, init=None):
  """Hubara et al.'s greedy, in rounds of "locally dominant" picks.

  Visiting entries by descending score (lower flat index first on ties) and
  keeping each whose row and column have room is the same as repeatedly
  keeping, all at once, every eligible entry that is the best eligible entry
  of both its row and its column: nothing visited before such an entry can
  touch its row or column, so sequential greedy keeps it too. Each round keeps
  at least the best eligible entry, so at most n*m rounds; far fewer in
  practice. ``init``: entries kept before the first round (at most ``n`` per
  row and column); the rounds complete it.
  """
  m = s.shape[-1]
  neg = jnp.asarray(-jnp.inf, s.dtype)
  ar = jnp.arange(m)

  def eligible(sel):
    row_room = sel.sum(axis=2) < n
    col_room = sel.sum(axis=1) < n
    return ~sel & row_room[:, :, None] & col_room[:, None, :]

  def body(carry):
    sel, elig = carry
    v = jnp.where(elig, s, neg)
    row_best = _argmax_first(v, 2)  # first (lowest column) on ties
    col_best = _argmax_first(v, 1)  # first (lowest row) on ties
    dominant = (elig & (ar[None, None, :] == row_best[:, :, None])
                & (ar[None, :, None] == col_best[:, None, :]))
    sel = sel | dominant
    return sel, eligible(sel)

  sel0 = jnp.zeros(s.shape, bool) if init is None else init
  sel, _ = lax.while_loop(lambda c: jnp.any(c[1]), body,
                          (sel0, eligible(sel0)))
  return sel


def _in_chunks(fn, s, chunk_size, *more):
  """Applies ``fn`` to chunks of tiles one after another (lax.map).

  ``more``: further ``(T, m, m)`` arrays chunked alike; ``fn`` then takes
  one chunk of each.
  """
  t, m, _ = s.shape
  chunk = int(max(1, min(chunk_size, t)))
  pad = (-t) % chunk
  chunks = tuple(jnp.pad(a, ((0, pad), (0, 0), (0, 0))).reshape(-1, chunk, m, m)
                 for a in (s, *more))
  out = lax.map(lambda c: fn(*c), chunks)
  return out.reshape(-1, m, m)[:t]


def _greedy(s, n, chunk_size):
  if s.shape[0] == 0:
    return jnp.zeros(s.shape, bool)
  return _in_chunks(lambda c: _greedy_rounds(c, n), s, chunk_size)


def _greedy_repair(s, n, chunk_size):
  sel = _greedy(s, n, chunk_size)
  num_aug = jnp.maximum(n - sel.sum(axis=2), 0).sum(axis=-1)
  aug = lambda s_c, sel_c: _augment(s_c, sel_c, n, None, repair=True)
  return _run_sorted(s, sel, num_aug, aug, chunk_size)


# "entropic": temperature (in standard deviations of the tile's scores), dual
# rounds and Newton steps per round, and row-exchange sweeps.
_ENTROPIC_EPS = 0.1
_ENTROPIC_ROUNDS = 10
_ENTROPIC_NEWTON = 3
_EXCHANGE_SWEEPS = 1
_GREEDY_CHUNK = 64   # a chunk's greedy rounds run until its slowest tile is done
_REPAIR_CHUNK = 256  # a chunk's augmentations run as often as its neediest tile's


def _soft_assignment(s, n):
  """``x = sigmoid((z - u - v) / eps)`` with every row and column summing to n."""
  t, m, _ = s.shape
  z = s - jnp.mean(s, axis=(1, 2), keepdims=True)
  z = z / (jnp.std(s, axis=(1, 2), keepdims=True) + jnp.finfo(s.dtype).tiny)
  eps = _ENTROPIC_EPS

  def duals(z, u, v):
    """Newton steps on u (rows of z) with v fixed; the row sums are monotone."""
    def step(_, u):
      x = jax.nn.sigmoid((z - u - v) / eps)
      excess = x.sum(axis=2, keepdims=True) - n
      slope = (x * (1.0 - x)).sum(axis=2, keepdims=True) / eps
      return u + jnp.clip(excess / (slope + 1e-12), -1.0, 1.0)
    return lax.fori_loop(0, _ENTROPIC_NEWTON, step, u)

  def round_(_, uv):
    u, v = uv
    u = duals(z, u, v)
    vt = duals(jnp.swapaxes(z, 1, 2), jnp.swapaxes(v, 1, 2),
               jnp.swapaxes(u, 1, 2))
    return u, jnp.swapaxes(vt, 1, 2)

  u0 = jnp.zeros((t, m, 1), s.dtype)
  u, v = lax.fori_loop(0, _ENTROPIC_ROUNDS, round_,
                       (u0, jnp.swapaxes(u0, 1, 2)))
  return jax.nn.sigmoid((z - u - v) / eps)


def _exchange_rows(s, sel, sweeps):
  """Local search: move one kept column from row i to row k and back another.

  For rows ``i, k``, dropping ``j`` from ``i`` (``j`` kept in ``i`` only) and
  ``l`` from ``k`` (kept in ``k`` only) and adding ``(i, l), (k, j)`` keeps
  every row and column count and gains ``(s_kj - s_ij) + (s_il - s_kl)``: the
  two terms are maximised separately. Each sweep visits every ``i`` and
  applies its best exchange when it gains.
  """
  t, m, _ = s.shape
  neg = jnp.asarray(-jnp.inf, s.dtype)
  tiles = jnp.arange(t)
  tol = _tolerance(s)[:, 0]

  def visit(i, sel):
    row_i = lax.dynamic_slice_in_dim(sel, i, 1, 1)        # (T, 1, m)
    s_i = lax.dynamic_slice_in_dim(s, i, 1, 1)
    give = jnp.where(row_i & ~sel, s - s_i, neg)          # (T, k, j)
    take = jnp.where(sel & ~row_i, s_i - s, neg)          # (T, k, l)
    gain = give.max(axis=2) + take.max(axis=2)            # (T, k)
    k = _argmax_first(gain, 1)
    j = _argmax_first(give[tiles, k], 1)     # only the chosen row k
    l = _argmax_first(take[tiles, k], 1)
    do = gain[tiles, k] > tol
    flip = jnp.zeros_like(sel)
    for r, c in ((i, j), (i, l), (k, l), (k, j)):
      flip = flip.at[tiles, r, c].set(do)
    return sel ^ flip

  return lax.fori_loop(0, sweeps * m, lambda q, sel: visit(q % m, sel), sel)


def _entropic(s, n, chunk_size):
  if s.shape[0] == 0:
    return jnp.zeros(s.shape, bool)
  m = s.shape[-1]
  x = _in_chunks(lambda c: _soft_assignment(c, n), s, chunk_size)
  # Round: keep the confident entries (x > 1/2, at most n per row and column),
  # complete greedily on x, repair the rows greedy leaves short (augmenting
  # paths on s), then improve by row exchanges.
  confident = (x > 0.5) & nm_mask(x, n, m, axis=-1) & nm_mask(x, n, m, axis=-2)
  sel = _in_chunks(lambda xc, ic: _greedy_rounds(xc, n, ic > 0), x,
                   min(chunk_size, _GREEDY_CHUNK), confident.astype(x.dtype))
  num_aug = jnp.maximum(n - sel.sum(axis=2), 0).sum(axis=-1)
  aug = lambda s_c, sel_c: _augment(s_c, sel_c, n, None, repair=True)
  sel = _run_sorted(s, sel, num_aug, aug, min(chunk_size, _REPAIR_CHUNK))
  return _exchange_rows(s, sel, _EXCHANGE_SWEEPS)


def _check_args(n, m, method, objective, chunk_size):
  n, m = _checks.check_nm(n, m)
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
  if objective not in OBJECTIVES:
    raise ValueError(f"objective must be one of {OBJECTIVES}, got "
                     f"{objective!r}.")
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
  return n, m


def _check_shape(w, n, m, where=""):
  _checks.check_float_like(w)
  if w.ndim < 2 or w.shape[-2] % m or w.shape[-1] % m:
    raise ValueError(
        f"transposable {n}:{m} masks tile the last two axes (in, out) into "
        f"{m} x {m} tiles, so both sizes must be divisible by m={m}; got "
        f"shape {tuple(w.shape)}{where}.")


def _solve(s, n, method, chunk_size):
  """Masks for a batch of score tiles ``(T, m, m)``."""
  m = s.shape[-1]
  if n == m:
    return jnp.ones(s.shape, bool)
  if method == "greedy":
    return _greedy(s, n, chunk_size)
  if method == "greedy_repair":
    return _greedy_repair(s, n, chunk_size)
  if method == "entropic":
    return _entropic(s, n, chunk_size)
  if m == 4:
    return _exact_m4(s, n, chunk_size)
  if _few_patterns(n, m):
    return _exact_by_patterns(s, n, chunk_size)
  return _exact_by_paths(s, n, chunk_size)


def transposable_nm_mask(w: jax.typing.ArrayLike, n: int, m: int, *,
                         method: str = "exact", objective: str = "l1",
                         chunk_size: int = 8192) -> jax.Array:
  """Transposable N:M mask: n kept in every row and column of each m x m tile.

  The last two axes of ``w`` are ``(in, out)`` (Flax Dense ``(in, out)``, Conv
  ``(H, W, in, out)``); they are cut into true ``m x m`` tiles and every leading
  axis (conv spatial positions, stacked layers) is batched. ``n`` is the number
  KEPT per row and per column of a tile, so both ``W`` (groups along ``in``) and
  ``W^T`` (groups along ``out``) are N:M sparse.

  Args:
    w: real array with ``ndim >= 2`` whose last two sizes are divisible by m.
    n: entries KEPT per tile row and per tile column, ``1 <= n <= m``.
    m: tile size.
    method: ``"exact"`` (an optimal mask; a split-rows solve for m = 4,
      enumeration of the valid tile patterns when there are at most 128 of
      them, else successive
      shortest augmenting paths, optimal up to float rounding: path costs
      within ``8 m eps max|w|`` of the tile count as equal), ``"greedy"``
      (Hubara et al.'s 2-approximation; may leave rows/columns with fewer than ``n``), or
      ``"greedy_repair"`` (greedy completed by augmenting paths to exactly
      ``n`` per row and column; not optimal), or ``"entropic"`` (entropic
      relaxation, rounding, repair and row exchanges; near-optimal and
      faster than exact for large ``m``, see the module docstring).
    objective: ``"l1"`` maximises the kept ``sum |w|`` (the paper's choice);
      ``"l2"`` maximises the kept ``sum w^2`` (the Euclidean projection).
    chunk_size: tiles per chunk of the solvers (memory vs. wasted work; the
      result does not depend on it).

  Returns:
    Boolean mask of ``w``'s shape. For ``"exact"`` and ``"greedy_repair"`` every
    tile row and column has exactly ``n`` True entries; for ``"greedy"`` at most
    ``n``.

  Raises:
    ValueError: bad ``n``/``m``/``method``/``objective``, ``w.ndim < 2``, or a
      last-two-axes size not divisible by ``m``.

  Example:
    >>> import jax
    >>> from sparse_jax.masks import transposable_nm_mask
    >>> w = jax.random.normal(jax.random.key(0), (8, 16))
    >>> mask = transposable_nm_mask(w, 2, 4)
    >>> rows, cols = mask.reshape(2, 4, 4, 4).sum(1), mask.reshape(8, 4, 4).sum(2)
    >>> int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())
    (2, 2, 2, 2)

  References:
    Hubara et al., "Accelerated Sparse Neural Training: A Provable and
    Efficient Method to Find N:M Transposable Masks", NeurIPS 2021,
    https://arxiv.org/abs/2102.08124.
  """
  w = jnp.asarray(w)
  n, m = _check_args(n, m, method, objective, chunk_size)
  _check_shape(w, n, m)
  def solve(w):
    s = to_tiles(_scores(w, objective, m), m)
    return from_tiles(_solve(s, n, method, chunk_size), w.shape, m)
  return _sharding.auto_sharded(solve, w, out_specs=_sharding.spec_of(w))


def transposable_nm_mask_tree(tree, n: int, m: int, *, method: str = "exact",
                              objective: str = "l1", chunk_size: int = 8192):
  """:func:`transposable_nm_mask` of every leaf, solved as ONE batch of tiles.

  The tiles of all leaves are concatenated and solved together, so a whole
  network compiles one solver (instead of one per kernel shape) and the
  augmenting-path work is balanced across layers.

  Args:
    tree: a pytree of real arrays, each with the last two axes ``(in, out)``
      divisible by ``m``.
    n: entries KEPT per tile row and column.
    m: tile size.
    method: see :func:`transposable_nm_mask`.
    objective: see :func:`transposable_nm_mask`.
    chunk_size: see :func:`transposable_nm_mask`.

  Returns:
    A pytree of boolean masks with the structure and shapes of ``tree``.

  Raises:
    ValueError: as :func:`transposable_nm_mask`, naming the leaf path.

  Example:
    >>> import jax.numpy as jnp
    >>> from sparse_jax.masks import transposable_nm_mask_tree
    >>> params = {"a": jnp.ones((3, 3, 8, 8)), "b": jnp.ones((16, 4))}
    >>> masks = transposable_nm_mask_tree(params, 2, 4)
    >>> int(masks["a"].sum()), int(masks["b"].sum())
    (288, 32)

  References:
    Hubara et al., NeurIPS 2021, https://arxiv.org/abs/2102.08124.
  """
  n, m = _check_args(n, m, method, objective, chunk_size)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  arrays = [jnp.asarray(x) for _, x in leaves]
  for (path, _), w in zip(leaves, arrays):
    _check_shape(w, n, m, where=f" at {jax.tree_util.keystr(path)}")
  if not arrays:
    return tree
  return jax.tree_util.tree_unflatten(treedef, _sharding.auto_sharded(
      lambda arrays: _tree_masks(arrays, n, m, method, objective, chunk_size),
      arrays, out_specs=[_sharding.spec_of(w) for w in arrays]))


def _tree_masks(arrays, n, m, method, objective, chunk_size):
  dtype = jnp.result_type(*[jnp.float32] + [
      jnp.float64 if w.dtype == jnp.float64 else jnp.float32 for w in arrays])
  tiles = [to_tiles(_scores(w, objective, m).astype(dtype), m) for w in arrays]
  sizes = np.cumsum([t.shape[0] for t in tiles])[:-1]
  sel = _solve(jnp.concatenate(tiles, axis=0), n, method, chunk_size)
  parts = jnp.split(sel, sizes, axis=0)
  return [from_tiles(p, w.shape, m) for p, w in zip(parts, arrays)]


def _few_patterns(n: int, m: int) -> bool:
  """Whether "exact" should enumerate the valid tile patterns."""
  return m <= 4 and len(regular_patterns(n, m)) <= _MAX_PATTERNS


def is_transposable_nm_sparse(x: jax.typing.ArrayLike, n: int,
                              m: int) -> jax.Array:
  """Whether every row and column of every m x m tile has at most n nonzeros.

  Args:
    x: array (or boolean mask) with the last two axes ``(in, out)``.
    n: maximum nonzeros per tile row and per tile column.
    m: tile size.

  Returns:
    A boolean scalar array.

  Example:
    >>> import jax.numpy as jnp
    >>> from sparse_jax.masks import is_transposable_nm_sparse
    >>> bool(is_transposable_nm_sparse(jnp.eye(4), 1, 2))
    True

  References:
    Hubara et al., NeurIPS 2021, https://arxiv.org/abs/2102.08124.
  """
  x = jnp.asarray(x)
  m = _checks.check_m(m)
  if x.ndim < 2 or x.shape[-2] % m or x.shape[-1] % m:
    raise ValueError(f"need the last two sizes divisible by m={m}, got shape "
                     f"{tuple(x.shape)}.")
  def check(x):
    t = to_tiles(x != 0, m)
    return jnp.all(t.sum(1) <= n) & jnp.all(t.sum(2) <= n)
  return _sharding.auto_sharded(check, x, out_specs=jax.P())
