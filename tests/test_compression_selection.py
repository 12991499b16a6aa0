"""Exactness of the selection kernels (fast top-k, threshold compaction)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sparse_jax.compression import selection
from sparse_jax.compression.selection import select_above, top_k_indices


def brute_top_k(x, k):
  """Stable sort on -|x|: descending magnitude, lower index first on ties."""
  a = np.abs(np.asarray(x, np.float64))
  a = np.where(np.isnan(a), np.inf, a)   # NaN ranks largest, as lax.top_k
  return np.argsort(-a, kind="stable")[:k]


def brute_select(x, tau, capacity):
  a = np.abs(np.asarray(x, np.float64))
  passing = np.flatnonzero(~(a < tau))
  d = a.size
  if passing.size == 0:
    out = brute_top_k(x, 1)
  elif passing.size > capacity:
    out = brute_top_k(x, capacity)
  else:
    out = passing
  return np.concatenate([out, np.full(capacity - out.size, d)])


TOP_K = jax.jit(top_k_indices, static_argnums=1)
SELECT = jax.jit(select_above, static_argnums=2)


@pytest.mark.parametrize("d,k", [(200_000, 200), (200_000, 3_000),
                                 (100_003, 101), (50, 7), (1, 1)])
def test_top_k_matches_brute_force(d, k):
  x = jax.random.normal(jax.random.key(d + k), (d,))
  np.testing.assert_array_equal(TOP_K(x, k), brute_top_k(x, k))


@pytest.mark.parametrize("d,k,block", [
    (200_000, 200, 16), (100_003, 101, 16), (1_000_000, 1_000, 16),
    (200_000, 4_000, 2), (200_000, 8_000, 1)])   # 2% and 4%: small blocks
def test_sampled_fast_path_alone_is_exact_on_gaussian_data(d, k, block):
  """The sampled branch (not the lax.top_k fallback) is used and exact."""
  assert selection._block_size(
      d, math.ceil(selection._BLOCK_CAPACITY * k)) == block
  x = jax.random.normal(jax.random.key(k), (d,))
  index, ok = jax.jit(selection._sampled_top_k, static_argnums=1)(x, k)
  assert bool(ok)
  np.testing.assert_array_equal(index, brute_top_k(x, k))


def test_fast_path_is_taken_for_large_sparse_problems():
  assert selection._fast_path_ok(11_000_000, 11_000)
  assert selection._fast_path_ok(200_000, 200)
  assert not selection._fast_path_ok(1000, 1)            # small: lax.top_k
  assert not selection._fast_path_ok(200_000, 20_000)    # dense: lax.top_k


@pytest.mark.parametrize("k", [300, 8_000])   # blocks of 16 and of 1
@pytest.mark.parametrize("case", ["ties", "zeros", "heavy_tail", "nan",
                                  "structured"])
def test_top_k_exact_on_adversarial_inputs(case, k):
  """Inputs that break the sampled threshold still give the exact answer."""
  d = 200_000
  key = jax.random.key(1)
  if case == "ties":       # few distinct magnitudes: ties at the k-th value
    x = jax.random.randint(key, (d,), -3, 4).astype(jnp.float32)
  elif case == "zeros":    # fewer than k non-zeros: the rest are zero ties
    x = jnp.zeros((d,)).at[jnp.arange(0, d, 1000)].set(1.0 + jnp.arange(200))
  elif case == "heavy_tail":
    x = jnp.exp(8.0 * jax.random.normal(key, (d,)))
  elif case == "nan":
    x = jax.random.normal(key, (d,)).at[jnp.array([5, 77_777])].set(jnp.nan)
  else:                    # all large entries in one place, sample misses them
    x = jnp.zeros((d,)).at[1000:1000 + 2 * k].set(
        jax.random.normal(key, (2 * k,)))
  np.testing.assert_array_equal(TOP_K(x, k), brute_top_k(x, k))


def test_fast_path_on_column_structured_gradients():
  """A weight gradient whose magnitude depends on the column (period 16).

  A stride-16 sample of the flat matrix sees one column class only (the old
  strided estimate then missed and fell back to the full lax.top_k, 2-5x
  slower); the random sample of block maxima does not alias.
  """
  rows, cols, k = 1024, 1024, 1049
  scale = jnp.where(jnp.arange(cols) % 16 == 0, 4.0, 1.0)
  x = (jax.random.normal(jax.random.key(3), (rows, cols)) * scale).ravel()
  index, ok = jax.jit(selection._sampled_top_k, static_argnums=1)(x, k)
  assert bool(ok)
  np.testing.assert_array_equal(index, brute_top_k(x, k))


def test_nan_found_by_select_above_on_large_inputs():
  """NaN passes any threshold, also where the block maxima may drop it."""
  d, capacity = 200_000, 400
  x = jax.random.normal(jax.random.key(2), (d,))
  x = x.at[jnp.array([3, 123_457])].set(jnp.nan)
  got = SELECT(x, 3.5, capacity)
  np.testing.assert_array_equal(got, brute_select(x, 3.5, capacity))


@pytest.mark.parametrize("n,size,density", [
    (5000, 300, 0.05), (5000, 40, 0.05), (4096, 10, 1.0), (4096, 10, 0.0),
    (33, 33, 0.5), (1, 1, 1.0)])
def test_compact_matches_nonzero(n, size, density):
  mask = jax.random.uniform(jax.random.key(n + size), (n,)) < density
  want = jnp.nonzero(mask, size=size, fill_value=n)[0]
  np.testing.assert_array_equal(jax.jit(selection.compact, static_argnums=1)(
      mask, size), want)


def test_block_max_is_the_max_magnitude_of_each_block():
  x = jax.random.normal(jax.random.key(4), (1000,)) * 3.0
  want = np.abs(np.asarray(x))[:992].reshape(62, 16).max(axis=1)
  np.testing.assert_array_equal(jax.jit(selection._block_max, static_argnums=1)(
      x, 16), want)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(-4, 4), min_size=1, max_size=40), st.data())
def test_top_k_property_small(values, data):
  x = np.asarray(values, np.float32)
  k = data.draw(st.integers(1, x.size))
  np.testing.assert_array_equal(top_k_indices(jnp.asarray(x), k),
                                brute_top_k(x, k))


@pytest.mark.parametrize("d,tau,capacity", [
    (200_000, 3.0, 2_000),    # fits: all passing entries, in index order
    (200_000, 2.0, 2_000),    # overflow: the 2000 largest
    (200_000, 100.0, 50),     # nothing passes: the single largest
    (300, 1.5, 100), (300, 1.5, 10), (300, 9.0, 5), (1, 0.0, 1),
])
def test_select_above_matches_brute_force(d, tau, capacity):
  x = jax.random.normal(jax.random.key(d), (d,))
  got = SELECT(x, tau, capacity)
  np.testing.assert_array_equal(got, brute_select(x, tau, capacity))


def test_select_above_traced_threshold_under_vmap():
  x = jax.random.normal(jax.random.key(0), (4, 300))
  taus = jnp.array([0.5, 1.0, 2.0, 5.0])
  got = jax.vmap(select_above, in_axes=(0, 0, None))(x, taus, 60)
  for row, tau, out in zip(np.asarray(x), np.asarray(taus), np.asarray(got)):
    np.testing.assert_array_equal(out, brute_select(row, tau, 60))


def test_bad_arguments():
  with pytest.raises(ValueError, match="1 <= k <= d"):
    top_k_indices(jnp.ones(3), 4)
  with pytest.raises(ValueError, match="1-D"):
    top_k_indices(jnp.ones((2, 2)), 1)
  with pytest.raises(ValueError, match="capacity"):
    select_above(jnp.ones(3), 1.0, 0)
