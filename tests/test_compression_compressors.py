"""The compressors against brute force and against the lognormal math."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

import sparse_jax.compression as C
from sparse_jax.compression import lognormal_model as lt
from sparse_jax.masks import nm_prune

KEY = jax.random.key(0)


def roundtrip(comp, x, key=KEY):
  out = jax.jit(comp.compress)(x, key)
  return out, comp.decompress(out, x.shape, x.dtype)


def brute_top_k_dense(x, k):
  flat = np.asarray(x).ravel()
  keep = np.argsort(-np.abs(flat), kind="stable")[:k]
  out = np.zeros_like(flat)
  out[keep] = flat[keep]
  return out.reshape(np.shape(x))


# --------------------------------------------------------------- top-k --


@pytest.mark.parametrize("shape,fraction", [
    ((300, 200), 0.001), ((64, 10), 0.5), ((7,), 0.3), ((2, 3, 4), 1.0)])
def test_top_k_matches_brute_force(shape, fraction):
  x = jax.random.normal(KEY, shape)
  _, dense = roundtrip(C.top_k(fraction), x)
  k = C.kept_count(fraction, x.size)
  assert k == max(1, round(fraction * x.size))
  np.testing.assert_array_equal(dense, brute_top_k_dense(x, k))


@pytest.mark.parametrize("shape", [(), (3,), (999,)])
@pytest.mark.parametrize("make", [lambda: C.top_k(1e-6), lambda: C.rand_k(1e-6),
                                  lambda: C.threshold(1e9),
                                  lambda: C.lognormal(0.999999)])
def test_at_least_one_entry_on_tiny_tensors(shape, make):
  comp = make()
  x = jnp.arange(1.0, 1.0 + math.prod(shape)).reshape(shape)
  _, dense = roundtrip(comp, x)
  assert int(jnp.sum(dense != 0)) >= 1
  if comp.name.startswith(("top_k", "threshold", "lognormal")):
    # The one entry kept is the largest.
    assert float(jnp.max(jnp.abs(dense))) == float(jnp.max(jnp.abs(x)))


def test_sparse_form_and_wire_bytes():
  comp = C.top_k(0.01)
  x = jax.random.normal(KEY, (100, 100))
  out, _ = roundtrip(comp, x)
  assert out.values.shape == (100,) and out.indices.shape == (100,)
  assert out.indices.dtype == jnp.int32
  assert comp.wire_bytes(x.shape) == 100 * (4 + 4)
  # 60% of 10 entries: 6 * 8 bytes > 40 bytes dense, so the dense form is sent.
  dense_form, _ = roundtrip(C.top_k(0.6), jnp.arange(10.0))
  assert dense_form.values.shape == (10,) and dense_form.indices.shape == (0,)
  assert C.top_k(0.6).wire_bytes((10,)) == 40


def test_decompress_adds_duplicates_over_leading_axes():
  comp = C.top_k(0.25)
  xs = jnp.array([[0.0, 5.0, 0.0, 0.0] * 4, [0.0, 3.0, 0.0, 1.0] * 4])
  stacked = jax.vmap(comp.compress, in_axes=(0, None))(xs, KEY)
  total = comp.decompress(stacked, (16,))
  expect = sum(brute_top_k_dense(x, 4) for x in np.asarray(xs))
  np.testing.assert_allclose(total, expect)


def test_compress_under_jit_and_vmap_has_static_shapes():
  comp = C.threshold(0.5, max_fraction=0.1)
  xs = jax.random.normal(KEY, (5, 1000)) * jnp.arange(1, 6)[:, None]
  out = jax.jit(jax.vmap(comp.compress, in_axes=(0, None)))(xs, KEY)
  assert out.values.shape == (5, 100)
  for x, v, i in zip(np.asarray(xs), np.asarray(out.values),
                     np.asarray(out.indices)):
    passing = np.flatnonzero(np.abs(x) >= 0.5)
    if passing.size <= 100:
      np.testing.assert_array_equal(i[:passing.size], passing)
      assert np.all(i[passing.size:] == 1000) and np.all(v[passing.size:] == 0)
    else:   # overflow: the 100 largest
      np.testing.assert_array_equal(np.sort(i), np.sort(
          np.argsort(-np.abs(x), kind="stable")[:100]))


def test_add_to_scatters_in_the_target_shape_and_drops_padding():
  """add_to on 1-D/2-D/3-D targets (one or stacked compressed) = brute force."""
  rng = np.random.default_rng(0)
  for shape in [(37,), (12, 10), (3, 4, 5)]:
    size = math.prod(shape)
    comp = C.top_k(0.1)
    target = rng.normal(size=shape).astype(np.float32)
    # Two workers' buffers; the last slot is padding (index == size).
    index = np.stack([rng.choice(size, 4, replace=False),
                      rng.choice(size, 4, replace=False)]).astype(np.int32)
    index[:, -1] = size
    values = rng.normal(size=index.shape).astype(np.float32)
    values[:, -1] = 0.0
    stacked = C.Compressed(jnp.asarray(values), jnp.asarray(index))
    got = jax.jit(lambda t, c: comp.add_to(t, c, -2.0))(
        jnp.asarray(target), stacked)
    expect = target.ravel().copy()
    for row_i, row_v in zip(index, values):
      for i, v in zip(row_i, row_v):
        if i < size:
          expect[i] += -2.0 * v     # duplicates across workers add up
    np.testing.assert_allclose(got, expect.reshape(shape), rtol=1e-6)
    one = C.Compressed(jnp.asarray(values[0]), jnp.asarray(index[0]))
    np.testing.assert_allclose(
        comp.add_to(jnp.asarray(target), one),
        jnp.asarray(target) + comp.decompress(one, shape), rtol=1e-6)


def test_add_to_structured_nm_indices_in_2d():
  comp = C.nm(2, 4, axis=0)
  x = jax.random.normal(KEY, (8, 6))
  c = comp.compress(x, KEY)
  base = jnp.arange(48.0).reshape(8, 6)
  expect = np.asarray(base) + np.asarray(nm_prune(x, 2, 4, axis=0))
  np.testing.assert_allclose(comp.add_to(base, c), expect, rtol=1e-6)


# -------------------------------------------------------------- rand-k --


def test_rand_k_distinct_uniform_and_keyed():
  comp = C.rand_k(0.25)
  x = jnp.arange(1.0, 41.0)   # d = 40, k = 10 (sparse form)
  keys = jax.random.split(KEY, 2000)
  out = jax.jit(jax.vmap(comp.compress, in_axes=(None, 0)))(x, keys)
  idx = np.asarray(out.indices)
  assert idx.shape == (2000, 10)
  assert all(len(set(row)) == 10 for row in idx)           # no repeats
  np.testing.assert_array_equal(np.asarray(out.values), idx + 1.0)
  freq = np.bincount(idx.ravel(), minlength=40) / 2000
  sigma = math.sqrt(0.25 * 0.75 / 2000)
  assert np.all(np.abs(freq - 0.25) < 5 * sigma), freq
  assert len({tuple(r) for r in idx[:50]}) > 45             # keys matter


def test_rand_k_rescaled_is_unbiased():
  comp = C.rand_k(0.2, rescale=True)
  x = jax.random.normal(KEY, (30,))
  keys = jax.random.split(jax.random.key(3), 20_000)
  dense = jax.vmap(lambda k: comp.decompress(comp.compress(x, k), (30,)))(keys)
  mean = jnp.mean(dense, axis=0)
  # std of each coordinate's estimate: |x| sqrt((d/k - 1) / N)
  tol = 5 * np.abs(np.asarray(x)) * math.sqrt(4.0 / 20_000) + 1e-6
  assert np.all(np.abs(np.asarray(mean - x)) < tol)


# ------------------------------------------------------------ threshold --


def test_threshold_keeps_exactly_the_passing_entries():
  x = jax.random.normal(KEY, (500,))
  _, dense = roundtrip(C.threshold(1.5, max_fraction=0.2), x)
  expect = np.where(np.abs(np.asarray(x)) >= 1.5, np.asarray(x), 0.0)
  np.testing.assert_array_equal(dense, expect)


def test_threshold_default_buffer_keeps_the_largest_one_percent():
  x = jax.random.normal(KEY, (5000,))
  _, dense = roundtrip(C.threshold(1.5), x)     # ~13% pass, 50 slots
  np.testing.assert_array_equal(dense, brute_top_k_dense(np.asarray(x), 50))
  assert C.threshold(1.5).wire_bytes((5000,)) == 50 * 8


# ------------------------------------------------------------ lognormal --


@pytest.mark.parametrize("log_a,sigma", [(-1.0, 0.5), (0.5, 1.0), (2.0, 2.5),
                                         (-3.0, 3.0)])
def test_stochastic_zero_fraction_matches_numerical_integral(log_a, sigma):
  """F(a) = E[(1 - |g|/tau)^+] for ln|g| ~ N(0, sigma^2), tau = a."""
  a = math.exp(log_a)
  integrand = lambda z: max(0.0, 1.0 - math.exp(sigma * z) / a) * stats.norm.pdf(z)
  expect, _ = integrate.quad(integrand, -40, log_a / sigma)
  got = float(lt.stochastic_zero_fraction(log_a, sigma))
  assert abs(got - expect) < 1e-5


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("sparsity", [0.9, 0.99, 0.999])
def test_threshold_solver_inverts_the_model(sparsity, stochastic):
  fit = lt.LognormalFit(jnp.float32(-3.0), jnp.float32(1.7), jnp.float32(0.0))
  tau = float(lt.lognormal_threshold(fit, sparsity, stochastic=stochastic))
  log_a = math.log(tau) + 3.0
  if stochastic:
    zero = float(lt.stochastic_zero_fraction(log_a, 1.7))
  else:
    zero = stats.norm.cdf(log_a / 1.7)
  assert abs(zero - sparsity) < 1e-4 * (1 - sparsity) + 1e-6


# Stated tolerance: on lognormal data the kept fraction is within 10%
# (relative) of the target density.
@pytest.mark.parametrize("sparsity,zero_fraction", [
    (0.9, 0.0), (0.99, 0.5), (0.999, 0.0), (0.999, 0.5)])
def test_lognormal_hits_target_sparsity(sparsity, zero_fraction):
  d = 300_000
  k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
  g = jnp.exp(-4.0 + 1.5 * jax.random.normal(k1, (d,)))
  g = g * jnp.where(jax.random.bernoulli(k2, 0.5, (d,)), 1.0, -1.0)
  g = jnp.where(jax.random.uniform(k3, (d,)) < zero_fraction, 0.0, g)
  comp = C.lognormal(sparsity, capacity_factor=2.0)
  _, dense = roundtrip(comp, g)
  kept = float(jnp.mean(dense != 0))
  assert abs(kept - (1 - sparsity)) < 0.1 * (1 - sparsity), kept
  # Every value sent is the original value (deterministic pruning).
  np.testing.assert_array_equal(np.where(dense != 0, g, 0.0), dense)


@pytest.mark.parametrize("sparsity", [0.9, 0.99])
def test_lognormal_stochastic_hits_target_and_is_unbiased(sparsity):
  d = 200_000
  g = jnp.exp(-2.0 + 1.2 * jax.random.normal(jax.random.key(1), (d,)))
  comp = C.lognormal(sparsity, stochastic=True, capacity_factor=2.0)
  keys = jax.random.split(jax.random.key(2), 4)
  dense = jax.jit(jax.vmap(lambda k: comp.decompress(comp.compress(g, k),
                                                     (d,))))(keys)
  kept = float(jnp.mean(dense != 0))
  assert abs(kept - (1 - sparsity)) < 0.1 * (1 - sparsity), kept
  # Unbiased: the summed mass is preserved in expectation (1% here).
  ratio = float(jnp.sum(dense) / (4 * jnp.sum(g)))
  assert abs(ratio - 1.0) < 0.01, ratio
  # Pruned-and-promoted entries carry exactly +-tau.
  tau = float(lt.lognormal_threshold(lt.fit_lognormal(g[::max(1, d // 65536)]),
                                     sparsity, stochastic=True))
  sent = np.asarray(dense[0])
  promoted = (sent != 0) & (np.abs(np.asarray(g)) < tau)
  assert promoted.any()
  np.testing.assert_allclose(np.abs(sent[promoted]), tau, rtol=1e-5)


def test_lognormal_stochastic_unbiased_per_entry():
  x = jnp.array([0.01, -0.02, 0.05, 0.3, -1.0, 2.0, 0.001, 0.4])
  comp = C.lognormal(0.7, stochastic=True, capacity_factor=3.0)
  keys = jax.random.split(KEY, 40_000)
  dense = jax.jit(jax.vmap(lambda k: comp.decompress(comp.compress(x, k),
                                                     (8,))))(keys)
  mean = np.asarray(jnp.mean(dense, axis=0))
  np.testing.assert_allclose(mean, np.asarray(x), atol=0.01)


def test_fit_lognormal_ignores_zeros():
  g = jnp.array([0.0, 0.0, math.e, math.e ** 3])
  fit = lt.fit_lognormal(g)
  np.testing.assert_allclose([fit.mu, fit.sigma, fit.zero_fraction],
                             [2.0, 1.0, 0.5], rtol=1e-6)


# ------------------------------------------------------------------ N:M --


@pytest.mark.parametrize("n,m,shape,axis", [(2, 4, (3, 3, 8, 4), -2),
                                            (1, 4, (8, 12), -1),
                                            (4, 8, (8, 3, 5), 0)])
def test_nm_equals_the_nm_projection(n, m, shape, axis):
  x = jax.random.normal(KEY, shape)
  comp = C.nm(n, m, axis=axis)
  out, dense = roundtrip(comp, x)
  np.testing.assert_array_equal(dense, nm_prune(x, n, m, axis=axis))
  assert out.values.shape == (x.size * n // m,)
  assert out.indices.dtype == jnp.uint8
  assert comp.wire_bytes(shape) == x.size * n // m * (4 + 1)


# ----------------------------------------------------------- bad input --


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan"), True, "0.1"])
def test_fraction_outside_unit_interval(fraction):
  with pytest.raises(ValueError, match="fraction"):
    C.top_k(fraction)
  with pytest.raises(ValueError, match="fraction"):
    C.rand_k(fraction)


def test_other_bad_arguments():
  with pytest.raises(ValueError, match="tau"):
    C.threshold(-1.0)
  with pytest.raises(ValueError, match="max_fraction"):
    C.threshold(1.0, max_fraction=0.0)
  with pytest.raises(ValueError, match="sparsity"):
    C.lognormal(1.0)
  with pytest.raises(ValueError, match="capacity_factor"):
    C.lognormal(0.9, capacity_factor=0.5)
  with pytest.raises(ValueError, match="1 <= n <= m"):
    C.nm(5, 4)
  with pytest.raises(ValueError, match="not divisible by m=4"):
    C.nm(2, 4).compress(jnp.ones((6, 3)), KEY)
  with pytest.raises(ValueError, match="floating-point"):
    C.top_k(0.5).compress(jnp.ones((4,), jnp.int32), KEY)
  with pytest.raises(ValueError, match="empty"):
    C.top_k(0.5).compress(jnp.ones((0,)), KEY)
