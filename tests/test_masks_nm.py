"""Tests for sparse_jax.masks.nm: N:M masks against a sorting reference."""

import itertools

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_jax.masks import is_nm_sparse, nm_mask, nm_prune


def reference_nm_mask(w, n, m, axis):
  """The n largest |w| per group; lower index first among ties; NaN last."""
  w = np.moveaxis(np.asarray(w, dtype=np.float64), axis, -1)
  key = np.abs(w)
  key = np.where(np.isnan(key), -1.0, key)
  groups = key.reshape(key.shape[:-1] + (-1, m))
  # stable argsort of -key keeps the lower index first among equal keys.
  order = np.argsort(-groups, axis=-1, kind="stable")
  ranks = np.argsort(order, axis=-1, kind="stable")
  mask = (ranks < n).reshape(w.shape)
  return np.moveaxis(mask, -1, axis)


NM_PAIRS = [(1, 1), (1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (7, 8),
            (3, 5)]


@pytest.mark.parametrize("n,m", NM_PAIRS)
@pytest.mark.parametrize("axis", [0, 1, -2, -1])
def test_matches_sorting_reference_with_many_ties(n, m, axis):
  rng = np.random.default_rng(n * 100 + m)
  shape = [3, 2 * m, 5]
  shape[axis] = 2 * m
  # small integers: many ties; signs: |w| decides.
  w = rng.integers(-3, 4, size=shape).astype(np.float32)
  got = np.asarray(nm_mask(w, n, m, axis=axis))
  np.testing.assert_array_equal(got, reference_nm_mask(w, n, m, axis))
  counts = np.moveaxis(got, axis, -1).reshape(-1, m).sum(-1)
  assert np.all(counts == n)


@pytest.mark.parametrize("n,m", [(126, 127), (1, 127), (100, 128), (3, 256)])
def test_large_groups_match_the_reference(n, m):
  # Ranks go up to m - 1: int8 counts while they fit (m <= 127), int32 past.
  rng = np.random.default_rng(m)
  w = rng.normal(size=(2 * m, 3)).astype(np.float32)
  w[: m // 2] = np.round(w[: m // 2])          # ties among many entries
  np.testing.assert_array_equal(np.asarray(nm_mask(w, n, m, axis=0)),
                                reference_nm_mask(w, n, m, 0))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32,
                                   jnp.int32])
def test_dtypes(dtype):
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(16, 6)) * 3).astype(dtype)
  got = nm_mask(w, 2, 4)
  assert got.dtype == jnp.bool_ and got.shape == w.shape
  np.testing.assert_array_equal(
      np.asarray(got), reference_nm_mask(np.asarray(w.astype(jnp.float32)),
                                         2, 4, -2))


def test_float64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    # differences below float32 resolution must still be resolved.
    base = rng.normal(size=(8, 3))
    w = jnp.asarray(base + 1e-12 * rng.normal(size=(8, 3)), dtype=jnp.float64)
    assert w.dtype == jnp.float64
    np.testing.assert_array_equal(np.asarray(nm_mask(w, 2, 4)),
                                  reference_nm_mask(np.asarray(w), 2, 4, -2))
    w = jnp.asarray([1.0, 1.0 + 1e-12, 1.0, 1.0], dtype=jnp.float64)
    np.testing.assert_array_equal(np.asarray(nm_mask(w, 1, 4, axis=0)),
                                  [False, True, False, False])


def test_ties_lower_index_wins():
  w = jnp.zeros((8, 2))
  got = np.asarray(nm_mask(w, 2, 4))
  np.testing.assert_array_equal(got[:, 0], [1, 1, 0, 0, 1, 1, 0, 0])
  # equal magnitude, different sign: still a tie.
  w = jnp.array([-1., 1., -1., 1.])
  np.testing.assert_array_equal(np.asarray(nm_mask(w, 3, 4, axis=0)),
                                [True, True, True, False])


def test_nan_ranks_lowest_and_inf_highest():
  w = jnp.array([jnp.nan, 0., 0., jnp.inf, jnp.nan, jnp.nan, -jnp.inf, 5.])
  got = np.asarray(nm_mask(w, 2, 4, axis=0))
  np.testing.assert_array_equal(got, [0, 1, 0, 1, 0, 0, 1, 1])
  # more NaNs than dropped slots: NaNs are kept by index order.
  w = jnp.array([jnp.nan, jnp.nan, jnp.nan, 1.])
  np.testing.assert_array_equal(np.asarray(nm_mask(w, 3, 4, axis=0)),
                                [1, 1, 0, 1])


def test_default_axis_is_input_axis_of_flax_kernels():
  # Dense (in, out): groups run along `in` (axis -2), not along `out`.
  w = jnp.arange(1., 33.).reshape(8, 4)  # |w| grows along `in`
  got = np.asarray(nm_mask(w, 2, 4))
  np.testing.assert_array_equal(got.sum(0), [4, 4, 4, 4])
  np.testing.assert_array_equal(got[:, 0], [0, 0, 1, 1, 0, 0, 1, 1])
  # Conv HWIO: groups along `in` at every spatial position.
  k = jax.random.normal(jax.random.key(0), (3, 3, 8, 5))
  got = np.asarray(nm_mask(k, 1, 4))
  assert np.all(got.reshape(3, 3, 2, 4, 5).sum(3) == 1)


def test_projection_and_checker():
  w = jax.random.normal(jax.random.key(1), (12, 7))
  p = nm_prune(w, 1, 3)
  assert p.dtype == w.dtype
  assert bool(is_nm_sparse(p, 1, 3))
  assert not bool(is_nm_sparse(w, 1, 3))
  np.testing.assert_array_equal(np.asarray(p != 0),
                                np.asarray(nm_mask(w, 1, 3)))
  kept = np.where(np.asarray(p) != 0, np.asarray(w), 0)
  np.testing.assert_array_equal(np.asarray(p), kept)


def test_jit_vmap_and_traced_n():
  w = jax.random.normal(jax.random.key(2), (4, 16, 8))
  got = jax.jit(lambda x: nm_mask(x, 2, 4))(w)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(nm_mask(w, 2, 4)))
  got = jax.vmap(lambda x: nm_mask(x, 2, 4, axis=0))(w)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(nm_mask(w, 2, 4)))
  f = jax.jit(lambda x, n: nm_mask(x, n, 8))
  for n in (1, 3, 8):
    np.testing.assert_array_equal(np.asarray(f(w, n)),
                                  np.asarray(nm_mask(w, n, 8)))


@pytest.mark.parametrize("n,m,shape,axis,match", [
    (3, 2, (4, 4), -2, "1 <= n <= m"),
    (0, 4, (4, 4), -2, "1 <= n <= m"),
    (2, 4, (6, 4), -2, "not divisible by m=4"),
    (2, 4, (4, 4), 2, "out of range"),
    (2, 0, (4, 4), -2, "m must be an int >= 1"),
    (2.0, 4, (4, 4), -2, "Python int"),
])
def test_bad_arguments(n, m, shape, axis, match):
  with pytest.raises(ValueError, match=match):
    nm_mask(jnp.ones(shape), n, m, axis=axis)


@hypothesis.settings(deadline=None, max_examples=40)
@hypothesis.given(
    data=hnp.arrays(np.float32, (8, 3),
                    elements=st.one_of(st.floats(-4, 4, width=32),
                                       st.just(np.nan), st.just(0.0))),
    nm=st.sampled_from([(1, 2), (2, 4), (3, 4), (1, 8), (5, 8)]))
def test_property_kept_dominate_dropped(data, nm):
  n, m = nm
  got = np.asarray(nm_mask(data, n, m, axis=0))
  key = np.where(np.isnan(data), -1.0, np.abs(data))
  for col, g in itertools.product(range(3), range(8 // m)):
    sl = slice(g * m, (g + 1) * m)
    kept, gkey = got[sl, col], key[sl, col]
    assert kept.sum() == n
    if n < m:
      assert gkey[kept].min() >= gkey[~kept].max()
  np.testing.assert_array_equal(got, reference_nm_mask(data, n, m, 0))
