"""Tests for mask diversity counts, unstructured masks and ERK distributions."""

import doctest
import itertools
import math

import jax.numpy as jnp
import numpy as np
import pytest

import sparse_jax.masks
from sparse_jax.masks import (diversity, erk_sparsity, mask_diversity, nm,
                              regular_matrix_count, transposable,
                              uniform_sparsity, unstructured,
                              unstructured_diversity, unstructured_mask)


def all_binary_matrices(m):
  bits = (np.arange(2 ** (m * m))[:, None] >> np.arange(m * m)) & 1
  return bits.reshape(-1, m, m).astype(bool)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_regular_matrix_count_brute_force(m):
  mats = all_binary_matrices(m)
  for n in range(m + 1):
    ok = np.all(mats.sum(1) == n, axis=1) & np.all(mats.sum(2) == n, axis=1)
    assert regular_matrix_count(n, m) == int(ok.sum())


def test_regular_matrix_count_m5_and_symmetry():
  # m = 5 by enumerating rows (10^5 candidate matrices at n = 2).
  for n in (1, 2):
    rows = list(itertools.combinations(range(5), n))
    count = 0
    for choice in itertools.product(rows, repeat=4):
      cols = np.zeros(5, int)
      for c in choice:
        cols[list(c)] += 1
      need = n - cols  # the last row is forced
      if np.all((need == 0) | (need == 1)) and need.sum() == n:
        count += 1
    assert regular_matrix_count(n, 5) == count
  # complements: R(m, n) == R(m, m - n); n = 1 gives the permutations.
  for m in range(1, 8):
    assert regular_matrix_count(1, m) == math.factorial(m)
    for n in range(m + 1):
      assert regular_matrix_count(n, m) == regular_matrix_count(m - n, m)


def test_table_a3_of_the_algorithms_notes():
  """The 8x8-block figures of ALGORITHMS.md A3 (rounded there)."""
  assert regular_matrix_count(4, 8) == 116_963_796_250
  table = {
      "unstructured": (unstructured_diversity(0.5), 1.8e18),
      "1:2": (mask_diversity(1, 2), 4.3e9),
      "2:4": (mask_diversity(2, 4), 2.8e12),
      "4:8": (mask_diversity(4, 8), 5.8e14),
      "T-1:2": (mask_diversity(1, 2, transposable=True), 6.6e4),
      "T-2:4": (mask_diversity(2, 4, transposable=True), 6.6e7),
      "T-4:8": (mask_diversity(4, 8, transposable=True), 1.2e11),
  }
  for name, (count, approx) in table.items():
    assert isinstance(count, int), name
    assert float(f"{count:.1e}") == approx, name
  order = ["T-1:2", "T-2:4", "1:2", "T-4:8", "2:4", "4:8", "unstructured"]
  counts = [table[k][0] for k in order]
  assert counts == sorted(counts)


def test_block_counts_by_brute_force():
  """All 2^16 masks of a 4x4 block, counted against each constraint."""
  mats = all_binary_matrices(4)
  groups_of_4 = mats.reshape(-1, 4, 4).sum(1)  # groups along axis 0 (in)
  for n in range(1, 5):
    nm_ok = np.all(groups_of_4 == n, axis=1)
    assert mask_diversity(n, 4, block_size=16) == int(nm_ok.sum())
    t_ok = nm_ok & np.all(mats.sum(2) == n, axis=1)
    assert mask_diversity(n, 4, transposable=True, block_size=16) == int(
        t_ok.sum())
  half = mats.reshape(-1, 16).sum(1) == 8
  assert unstructured_diversity(0.5, block_size=16) == int(half.sum())
  pairs = mats.reshape(-1, 8, 2).sum(2)  # 1:2 groups
  assert mask_diversity(1, 2, block_size=16) == int(np.all(pairs == 1, 1).sum())


@pytest.mark.parametrize("kwargs,match", [
    (dict(n=2, m=4, block_size=30), "not divisible by 4"),
    (dict(n=2, m=4, transposable=True, block_size=24), "not divisible by 16"),
    (dict(n=5, m=4), "1 <= n <= m"),
])
def test_diversity_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    mask_diversity(**kwargs)
  with pytest.raises(ValueError, match="whole number"):
    unstructured_diversity(0.3, block_size=16)


def test_unstructured_mask():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(6, 7)).astype(np.float32)
  mask = np.asarray(unstructured_mask(w, 0.75))
  k = round(0.25 * 42)
  assert mask.sum() == k
  a = np.abs(w)
  assert a[mask].min() >= a[~mask].max()
  # ties: the lower flat index wins; NaN ranks last.
  w = jnp.array([[1., 1.], [1., jnp.nan]])
  np.testing.assert_array_equal(np.asarray(unstructured_mask(w, 0.5)),
                                [[1, 1], [0, 0]])
  np.testing.assert_array_equal(np.asarray(unstructured_mask(w, 0.25)),
                                [[1, 1], [1, 0]])
  assert unstructured_mask(w, 0.0).all()
  with pytest.raises(ValueError, match=r"in \[0, 1\)"):
    unstructured_mask(w, 1.0)


def test_uniform_and_erk_distributions():
  shapes = {"conv1": (3, 3, 3, 64), "conv2": (3, 3, 64, 128),
            "fc1": (8192, 512), "fc2": (512, 10)}
  sizes = {k: np.prod(v) for k, v in shapes.items()}
  total = sum(sizes.values())
  u = uniform_sparsity(shapes, 0.9, dense=["fc2"])
  assert u == {"conv1": 0.9, "conv2": 0.9, "fc1": 0.9, "fc2": 0.0}
  for target in (0.5, 0.8, 0.95):
    erk = erk_sparsity(shapes, target)
    kept = sum((1 - erk[k]) * sizes[k] for k in shapes)
    assert kept == pytest.approx((1 - target) * total, rel=1e-9)
    assert all(0.0 <= v < 1.0 for v in erk.values())
    # density proportional to sum(shape)/prod(shape) for the non-dense layers
    free = [k for k in shapes if erk[k] > 0]
    ratios = [(1 - erk[k]) / (sum(shapes[k]) / sizes[k]) for k in free]
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-9)
    # the small layers are denser than the big one
    assert erk["conv1"] <= erk["conv2"] <= erk["fc1"]
  # at 50% the small conv1 and fc2 would exceed density 1: they become dense
  erk = erk_sparsity(shapes, 0.5)
  assert erk["conv1"] == 0.0 and erk["fc2"] == 0.0
  assert erk_sparsity(shapes, 0.9, power=0.0)["fc1"] == pytest.approx(0.9)
  with pytest.raises(ValueError, match="exceed the budget"):
    erk_sparsity(shapes, 0.99, dense=["fc1"])
  with pytest.raises(ValueError, match="unknown layers"):
    uniform_sparsity(shapes, 0.5, dense=["nope"])


@pytest.mark.parametrize("module", [nm, transposable, diversity, unstructured])
def test_docstring_examples_run(module):
  assert sparse_jax.masks is not None
  result = doctest.testmod(module, verbose=False)
  assert result.attempted > 0 and result.failed == 0
