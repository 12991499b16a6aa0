"""Mask diversity: how many distinct masks a sparsity constraint allows.

Exact Python integers (no floating point): unstructured ``C(T, kept)``, N:M
``C(m, n)^(T/m)``, transposable N:M ``R(m, n)^(T/m^2)`` where ``R(m, n)`` is the
number of ``m x m`` 0/1 matrices whose rows and columns all sum to ``n``.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

from sparse_jax.masks import _checks


@functools.lru_cache(maxsize=None)
def _fill(classes: tuple[int, ...], rows_left: int, n: int) -> int:
  """Ways to fill ``rows_left`` rows of n ones each, given column capacities.

  ``classes[k]`` is how many columns still need ``k`` more ones (k = 0..n).
  Only these counts matter (columns with equal needs are interchangeable), so
  the state space stays tiny even for m = 8.
  """
  if rows_left == 0:
    return int(all(c == 0 for c in classes[1:]))
  total = 0

  def choose(k: int, left: int, ways: int, new: list[int]):
    nonlocal total
    if k == 0:
      if left == 0:
        total += ways * _fill(tuple(new), rows_left - 1, n)
      return
    # take j of the columns that still need k (each then needs k - 1).
    for j in range(min(left, classes[k]) + 1):
      nxt = list(new)
      nxt[k] -= j
      nxt[k - 1] += j
      choose(k - 1, left - j, ways * math.comb(classes[k], j), nxt)

  choose(n, n, 1, list(classes))
  return total


def regular_matrix_count(n: int, m: int) -> int:
  """R(m, n): the number of m x m 0/1 matrices with all row and column sums n.

  This is the number of transposable n:m masks of one m x m tile.

  Args:
    n: ones per row and per column (``0 <= n <= m``).
    m: matrix size.

  Returns:
    The exact count as a Python int.

  Example:
    >>> from sparse_jax.masks import regular_matrix_count
    >>> regular_matrix_count(2, 4), regular_matrix_count(4, 8)
    (90, 116963796250)

  References:
    Hubara et al., NeurIPS 2021, https://arxiv.org/abs/2102.08124 (mask
    diversity of transposable masks).
  """
  m = _checks.check_m(m)
  if not isinstance(n, int) or not 0 <= n <= m:
    raise ValueError(f"n must be an int with 0 <= n <= m, got n={n!r}, m={m}.")
  classes = [0] * (n + 1)
  classes[n] = m
  return _fill(tuple(classes), m, n)


def mask_diversity(n: int, m: int, *, transposable: bool = False,
                   block_size: int = 64) -> int:
  """Number of distinct N:M (or transposable N:M) masks of a block of weights.

  ``n`` is the number KEPT per group of ``m``. A block of ``T = block_size``
  weights holds ``T/m`` independent groups (N:M: ``C(m, n)`` choices each) or
  ``T/m^2`` independent ``m x m`` tiles (transposable: ``R(m, n)`` each).

  Args:
    n: entries kept per group (``1 <= n <= m``).
    m: group size.
    transposable: count transposable N:M masks instead.
    block_size: number of weights ``T`` in the block (an ``8 x 8`` block is
      64); must be divisible by ``m`` (by ``m^2`` when transposable).

  Returns:
    The exact count as a Python int.

  Raises:
    ValueError: bad ``n``/``m`` or a block size that does not tile.

  Example:
    >>> from sparse_jax.masks import mask_diversity
    >>> mask_diversity(2, 4), mask_diversity(2, 4, transposable=True)
    (2821109907456, 65610000)

  References:
    Hubara et al., "Accelerated Sparse Neural Training: A Provable and
    Efficient Method to Find N:M Transposable Masks", NeurIPS 2021,
    https://arxiv.org/abs/2102.08124.
  """
  n, m = _checks.check_nm(n, m)
  if not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"block_size must be a positive int, got {block_size!r}.")
  unit = m * m if transposable else m
  if block_size % unit:
    raise ValueError(
        f"block_size={block_size} is not divisible by {unit} (the number of "
        f"weights in one {'m x m tile' if transposable else 'group of m'}, "
        f"m={m}).")
  per_unit = regular_matrix_count(n, m) if transposable else math.comb(m, n)
  return per_unit ** (block_size // unit)


def unstructured_diversity(sparsity: float, *, block_size: int = 64) -> int:
  """Number of unstructured masks of ``block_size`` weights at a sparsity.

  Args:
    sparsity: fraction of zeros; ``(1 - sparsity) * block_size`` must be an
      integer (the number kept).
    block_size: number of weights in the block.

  Returns:
    ``C(block_size, kept)`` as a Python int.

  Example:
    >>> from sparse_jax.masks import unstructured_diversity
    >>> unstructured_diversity(0.5, block_size=16)
    12870

  References:
    Hubara et al., NeurIPS 2021, https://arxiv.org/abs/2102.08124.
  """
  if not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"block_size must be a positive int, got {block_size!r}.")
  if not 0.0 <= sparsity <= 1.0:
    raise ValueError(f"sparsity must be in [0, 1], got {sparsity!r}.")
  kept = (1 - Fraction(sparsity).limit_denominator(10**9)) * block_size
  if kept.denominator != 1:
    raise ValueError(
        f"(1 - sparsity) * block_size = {float(kept)} is not a whole number "
        f"of kept weights (sparsity={sparsity}, block_size={block_size}).")
  return math.comb(block_size, int(kept))
