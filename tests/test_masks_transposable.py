"""Tests for sparse_jax.masks.transposable against brute force and an LP."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog

from sparse_jax.masks import (is_nm_sparse, is_transposable_nm_sparse,
                              transposable_nm_mask, transposable_nm_mask_tree)
from sparse_jax.masks.transposable import from_tiles, to_tiles


def brute_force_optimum(s, n):
  """Best kept score over ALL 0/1 m x m matrices with row/col sums n."""
  m = s.shape[0]
  best = -np.inf
  for choice in itertools.product(itertools.combinations(range(m), n),
                                  repeat=m):
    counts = np.zeros(m, int)
    for cols in choice:
      counts[list(cols)] += 1
    if np.all(counts == n):
      best = max(best, sum(s[r, list(c)].sum() for r, c in enumerate(choice)))
  return best


def lp_optimum(s, n):
  """The transportation LP (integral: totally unimodular constraints)."""
  m = s.shape[0]
  a = np.zeros((2 * m, m * m))
  for i in range(m):
    a[i, i * m:(i + 1) * m] = 1  # row i
    a[m + i, i::m] = 1           # column i
  res = linprog(-s.ravel(), A_eq=a, b_eq=np.full(2 * m, n), bounds=(0, 1),
                method="highs")
  assert res.status == 0
  return -res.fun


def sequential_greedy(s, n):
  """The paper's 2-approximation, written as stated (one entry at a time)."""
  m = s.shape[0]
  order = np.argsort(-s.ravel(), kind="stable")
  sel = np.zeros((m, m), bool)
  for k in order:
    r, c = divmod(k, m)
    if sel[r].sum() < n and sel[:, c].sum() < n:
      sel[r, c] = True
  return sel


def random_tiles(rng, t, m, ties=True):
  w = rng.normal(size=(t, m, m)).astype(np.float32)
  if ties:  # integer values (many ties) and exact zeros in a third of them
    w[: t // 3] = np.round(w[: t // 3] * 1.5)
  return w


def tiles_as_matrix(w):
  """(T, m, m) tiles -> a (T*m, m) matrix whose tiles are exactly those."""
  return w.reshape(-1, w.shape[-1])


def kept_value(s, sel):
  return (s * sel).sum(axis=(-1, -2))


@pytest.mark.parametrize("n,m", [(1, 2), (1, 3), (2, 3), (1, 4), (2, 4),
                                 (3, 4)])
def test_exact_equals_brute_force_small(n, m):
  rng = np.random.default_rng(10 * n + m)
  w = random_tiles(rng, 24, m)
  sel = np.asarray(transposable_nm_mask(tiles_as_matrix(w), n, m,
                                        chunk_size=5)).reshape(w.shape)
  assert np.all(sel.sum(1) == n) and np.all(sel.sum(2) == n)
  s = np.abs(w).astype(np.float64)
  ref = np.array([brute_force_optimum(x, n) for x in s])
  np.testing.assert_allclose(kept_value(s, sel), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n,m", [(4, 8), (1, 8), (3, 8), (6, 8), (2, 5),
                                 (3, 6)])
def test_exact_equals_lp_optimum(n, m):
  rng = np.random.default_rng(100 * n + m)
  w = random_tiles(rng, 30, m)
  sel = np.asarray(transposable_nm_mask(tiles_as_matrix(w), n, m,
                                        chunk_size=7)).reshape(w.shape)
  assert np.all(sel.sum(1) == n) and np.all(sel.sum(2) == n)
  s = np.abs(w).astype(np.float64)
  ref = np.array([lp_optimum(x, n) for x in s])
  np.testing.assert_allclose(kept_value(s, sel), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_l2_objective_is_optimal_for_squares_and_differs_from_l1(n, m):
  rng = np.random.default_rng(7)
  w = rng.normal(size=(60, m, m)).astype(np.float32)
  mat = tiles_as_matrix(w)
  l1 = np.asarray(transposable_nm_mask(mat, n, m)).reshape(w.shape)
  l2 = np.asarray(transposable_nm_mask(mat, n, m, objective="l2")).reshape(
      w.shape)
  a = np.abs(w).astype(np.float64)
  ref2 = np.array([lp_optimum(x ** 2, n) for x in a])
  np.testing.assert_allclose(kept_value(a ** 2, l2), ref2, rtol=1e-5)
  # each mask is at least as good as the other on its own objective...
  assert np.all(kept_value(a, l1) >= kept_value(a, l2) - 1e-5)
  assert np.all(kept_value(a ** 2, l2) >= kept_value(a ** 2, l1) - 1e-5)
  # ...and on Gaussian tiles they pick different masks fairly often.
  differ = np.any(l1 != l2, axis=(1, 2)).mean()
  assert 0.02 < differ < 0.9


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 4), (4, 8), (3, 8),
                                 (2, 6)])
def test_greedy_is_the_papers_algorithm_and_a_half_approximation(n, m):
  rng = np.random.default_rng(n + 31 * m)
  w = random_tiles(rng, 40, m)
  sel = np.asarray(transposable_nm_mask(tiles_as_matrix(w), n, m,
                                        method="greedy")).reshape(w.shape)
  s = np.abs(w).astype(np.float32)
  for k in range(len(w)):
    np.testing.assert_array_equal(sel[k], sequential_greedy(s[k], n))
  assert np.all(sel.sum(1) <= n) and np.all(sel.sum(2) <= n)
  opt = np.array([lp_optimum(x.astype(np.float64), n) for x in s])
  assert np.all(kept_value(s, sel) >= 0.5 * opt - 1e-6)


def test_greedy_tight_example_and_short_rows():
  eps = 1e-3
  w = jnp.array([[1 + eps, 1.0], [1.0, 0.0]])
  greedy = np.asarray(transposable_nm_mask(w, 1, 2, method="greedy"))
  np.testing.assert_array_equal(greedy, [[1, 0], [0, 1]])
  exact = np.asarray(transposable_nm_mask(w, 1, 2))
  np.testing.assert_array_equal(exact, [[0, 1], [1, 0]])
  ratio = (np.abs(w) * greedy).sum() / (np.abs(w) * exact).sum()
  assert ratio == pytest.approx((1 + eps) / 2, rel=1e-6)  # -> 1/2
  # On Gaussian tiles greedy leaves some rows/columns short of n.
  rng = np.random.default_rng(3)
  mats = rng.normal(size=(200, 4, 4)).astype(np.float32)
  sel = np.asarray(transposable_nm_mask(tiles_as_matrix(mats), 2, 4,
                                        method="greedy")).reshape(mats.shape)
  short = np.any(sel.sum(2) < 2, axis=1)
  assert 0.02 < short.mean() < 0.5
  np.testing.assert_array_equal(sel.sum((1, 2)) < 8, short)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (5, 8), (2, 6)])
def test_greedy_repair_keeps_exactly_n(n, m):
  rng = np.random.default_rng(5 * n + m)
  w = random_tiles(rng, 80, m)
  mat = tiles_as_matrix(w)
  rep = np.asarray(transposable_nm_mask(mat, n, m, method="greedy_repair",
                                        chunk_size=16)).reshape(w.shape)
  assert np.all(rep.sum(1) == n) and np.all(rep.sum(2) == n)
  greedy = np.asarray(transposable_nm_mask(mat, n, m, method="greedy")).reshape(
      w.shape)
  full = np.all(greedy.sum(1) == n, axis=1) & np.all(greedy.sum(2) == n, axis=1)
  np.testing.assert_array_equal(rep[full], greedy[full])  # untouched if full
  s = np.abs(w).astype(np.float64)
  opt = np.array([lp_optimum(x, n) for x in s])
  assert np.all(kept_value(s, rep) <= opt + 1e-5)
  assert np.mean(kept_value(s, rep) / opt) > 0.95


@pytest.mark.parametrize("n,m", [(8, 16), (16, 32)])
def test_entropic_is_within_half_a_percent_of_the_lp_optimum(n, m):
  # The large-M patterns: the kept |w| mass of every Gaussian tile within
  # 0.5% of the LP optimum (the exact solver, itself checked against the LP
  # above), on average within 0.1%.
  rng = np.random.default_rng(9 * n + m)
  w = rng.normal(size=(60, m, m)).astype(np.float32)
  mat = tiles_as_matrix(w)
  ent = np.asarray(jax.jit(lambda x: transposable_nm_mask(
      x, n, m, method="entropic", chunk_size=16))(mat)).reshape(w.shape)
  assert np.all(ent.sum(1) == n) and np.all(ent.sum(2) == n)
  exact = np.asarray(transposable_nm_mask(mat, n, m)).reshape(w.shape)
  s = np.abs(w).astype(np.float64)
  gap = 1.0 - kept_value(s, ent) / kept_value(s, exact)
  assert gap.min() >= -1e-6
  assert gap.max() < 5e-3 and gap.mean() < 1e-3
  if m == 16:   # the LP itself on a few tiles
    lp = np.array([lp_optimum(x, n) for x in s[:5]])
    np.testing.assert_allclose(kept_value(s, exact)[:5], lp, rtol=1e-5)


@pytest.mark.parametrize("n,m", [(1, 8), (2, 8), (3, 6)])
def test_entropic_keeps_exactly_n_for_any_pattern(n, m):
  rng = np.random.default_rng(n + 10 * m)
  w = random_tiles(rng, 40, m)
  ent = np.asarray(transposable_nm_mask(tiles_as_matrix(w), n, m,
                                        method="entropic")).reshape(w.shape)
  assert np.all(ent.sum(1) == n) and np.all(ent.sum(2) == n)
  s = np.abs(w).astype(np.float64)
  opt = np.array([lp_optimum(x, n) for x in s])
  assert np.all(kept_value(s, ent) <= opt + 1e-5)
  assert np.mean(kept_value(s, ent) / opt) > 0.99


def test_tiles_are_true_2d_blocks_and_conv_positions_are_batched():
  w = jnp.arange(2 * 8 * 12, dtype=jnp.float32).reshape(2, 8, 12)
  t = to_tiles(w, 4)
  assert t.shape == (2 * 2 * 3, 4, 4)
  np.testing.assert_array_equal(np.asarray(t[1]), np.asarray(w[0, 0:4, 4:8]))
  np.testing.assert_array_equal(np.asarray(t[3]), np.asarray(w[0, 4:8, 0:4]))
  np.testing.assert_array_equal(np.asarray(from_tiles(t, w.shape, 4)),
                                np.asarray(w))
  k = jax.random.normal(jax.random.key(0), (3, 3, 8, 16))
  solve = jax.jit(lambda x: transposable_nm_mask(x, 2, 4))
  mask = np.asarray(solve(k))
  assert bool(is_transposable_nm_sparse(mask, 2, 4))
  assert bool(is_nm_sparse(mask, 2, 4, axis=-2))
  assert bool(is_nm_sparse(mask, 2, 4, axis=-1))
  assert mask.sum() == k.size // 2
  for i, j in [(0, 0), (1, 2), (2, 1)]:
    np.testing.assert_array_equal(mask[i, j], np.asarray(solve(k[i, j])))


def test_jit_vmap_tree_and_dtypes():
  k = jax.random.normal(jax.random.key(1), (4, 16, 8))
  solve = jax.jit(lambda x: transposable_nm_mask(x, 4, 8))
  ref = np.asarray(solve(k))
  assert is_transposable_nm_sparse(ref, 4, 8) and ref.sum() == k.size // 2
  got = jax.jit(jax.vmap(lambda x: transposable_nm_mask(x, 4, 8)))(k)
  np.testing.assert_array_equal(np.asarray(got), ref)
  tree = {"a": k, "b": [k[0], k[1:3]]}
  masks = jax.jit(lambda t: transposable_nm_mask_tree(t, 4, 8))(tree)
  np.testing.assert_array_equal(np.asarray(masks["a"]), ref)
  np.testing.assert_array_equal(np.asarray(masks["b"][1]), ref[1:3])
  for dtype in (jnp.bfloat16, jnp.float16):
    got = jax.jit(lambda x: transposable_nm_mask(x, 2, 4))(k.astype(dtype))
    assert got.dtype == jnp.bool_
    assert bool(is_transposable_nm_sparse(got, 2, 4))
  with jax.enable_x64(True):
    k64 = jnp.asarray(np.asarray(k), jnp.float64)
    np.testing.assert_array_equal(np.asarray(solve(k64)), ref)


def test_nan_ranks_lowest():
  w = jnp.array([[jnp.nan, 0.0, 1.0, 2.0],
                 [3.0, jnp.nan, 1.0, 0.5],
                 [0.0, 0.0, jnp.nan, jnp.nan],
                 [1.0, 2.0, 3.0, 4.0]])
  for method in ("exact", "greedy_repair"):
    mask = np.asarray(transposable_nm_mask(w, 2, 4, method=method))
    assert np.all(mask.sum(0) == 2) and np.all(mask.sum(1) == 2)
    if method == "exact":  # a NaN-free mask exists, so the optimum avoids NaN
      assert not mask[np.isnan(np.asarray(w))].any()


@pytest.mark.parametrize("kwargs,shape,match", [
    (dict(n=2, m=4, method="lp"), (4, 4), "method must be one of"),
    (dict(n=2, m=4, objective="l0"), (4, 4), "objective must be one of"),
    (dict(n=2, m=4), (4, 6), r"divisible by m=4; got shape \(4, 6\)"),
    (dict(n=2, m=4), (8,), "divisible by m=4"),
    (dict(n=5, m=4), (4, 4), "1 <= n <= m"),
])
def test_bad_arguments(kwargs, shape, match):
  with pytest.raises(ValueError, match=match):
    transposable_nm_mask(jnp.ones(shape), **kwargs)


def test_tree_error_names_the_leaf():
  with pytest.raises(ValueError, match=r"\['layer'\]\['kernel'\]"):
    transposable_nm_mask_tree({"layer": {"kernel": jnp.ones((8, 6))}}, 2, 4)
