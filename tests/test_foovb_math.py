"""The pure math of FOO-VB against closed forms (ALGORITHMS.md part C checks)."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_jax.bayes import fixed_point as fp
from sparse_jax.bayes import kronecker as kr


def _spd(rng, n, scale=1.0):
  a = rng.normal(size=(n, n))
  return scale * (a @ a.T / n + 0.5 * np.eye(n))


# --------------------------------------------------------------------------
# Diagonal (BGD) step.


def test_diagonal_step_matches_direct_formula_float64():
  rng = np.random.default_rng(0)
  std = rng.uniform(0.01, 1.0, size=200)
  geps = rng.normal(size=200) * 10.0 ** rng.uniform(-3, 3, size=200)
  x = std * geps / 2
  direct = std * np.sqrt(1 + x ** 2) - std * x
  with jax.enable_x64(True):
    got = np.asarray(fp.diagonal_std_update(jnp.asarray(std), jnp.asarray(geps)))
  np.testing.assert_allclose(got, direct, rtol=1e-7)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_diagonal_step_is_positive_root_of_1x1_equation(sign):
  rng = np.random.default_rng(1)
  std = rng.uniform(0.01, 2.0, size=50)
  e = sign * rng.uniform(0.0, 50.0, size=50)
  with jax.enable_x64(True):
    s = np.asarray(fp.diagonal_std_update(jnp.asarray(std), jnp.asarray(e)))
  v = std ** 2
  size = s * s + np.abs(v * e * s) + v
  np.testing.assert_allclose((s * s + v * e * s - v) / size, 0.0, atol=1e-14)
  assert np.all(s > 0)
  # e > 0 (positive curvature) shrinks, e < 0 grows.
  assert np.all((s < std) if sign > 0 else (s > std))


def test_diagonal_step_float32_no_collapse_for_huge_gradients():
  std = np.float32(0.05)
  geps = np.array([1e4, 1e6, 1e10, 1e20, 1e30], np.float32)
  got = np.asarray(fp.diagonal_std_update(jnp.float32(std), jnp.asarray(geps)))
  x = np.float64(std) * geps.astype(np.float64) / 2
  ref = np.float64(std) / (np.sqrt(1 + x ** 2) + x)
  # The direct form collapses to exactly 0 here (x = 2.5e4).
  x32 = np.float32(x[1])
  assert std * np.sqrt(np.float32(1) + x32 * x32) - std * x32 == 0.0
  np.testing.assert_allclose(got, ref, rtol=1e-5)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    log_std=st.floats(-30, 3), log_g=st.floats(-30, 38.5),
    sign=st.sampled_from([-1.0, 1.0]))
def test_diagonal_step_float32_positive_finite(log_std, log_g, sign):
  std = jnp.float32(10.0 ** log_std)
  geps = jnp.float32(sign * 10.0 ** min(log_g, 38.5))
  out = fp.diagonal_std_update(std, geps)
  assert out.dtype == jnp.float32
  assert bool(jnp.isfinite(out)) and float(out) > 0


# --------------------------------------------------------------------------
# The matrix equation X X^T + V E X^T - V = 0.


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(n=st.integers(1, 7), seed=st.integers(0, 10_000),
                  log_scale=st.floats(-3, 3))
def test_solve_fixed_point_satisfies_equation(n, seed, log_scale):
  rng = np.random.default_rng(seed)
  v = _spd(rng, n, scale=rng.uniform(0.01, 2.0))
  e = rng.normal(size=(n, n)) * 10.0 ** log_scale
  with jax.enable_x64(True):
    x = np.asarray(fp.solve_fixed_point(jnp.asarray(v), jnp.asarray(e)))
  res = x @ x.T + v @ e @ x.T - v
  size = np.linalg.norm(v) + np.linalg.norm(v @ e) * np.linalg.norm(x) \
      + np.linalg.norm(x) ** 2
  assert np.linalg.norm(res) <= 1e-11 * size
  # The chosen root never increases the covariance: V - X X^T is PSD.
  gap = np.linalg.eigvalsh(v - x @ x.T)
  assert gap.min() >= -1e-10 * np.linalg.norm(v)


def test_solve_fixed_point_float32_residual_small():
  rng = np.random.default_rng(3)
  v = _spd(rng, 20, 0.1)
  e = rng.normal(size=(20, 20))
  x = fp.solve_fixed_point(jnp.asarray(v, jnp.float32), jnp.asarray(e, jnp.float32))
  res = fp.fixed_point_residual(x, v.astype(np.float32), e.astype(np.float32))
  assert float(jnp.abs(res).max()) < 1e-4 * np.abs(v).max() * 20


@pytest.mark.parametrize("log_scale", [2.0, 4.0, 6.0])
def test_solve_fixed_point_float32_stable_for_informative_batches(log_scale):
  # V E large: X = L_B Q - V E / 2 would cancel catastrophically in float32.
  rng = np.random.default_rng(9)
  v = _spd(rng, 6, 0.1)
  e = _spd(rng, 6) * 10.0 ** log_scale + 0.1 * rng.normal(size=(6, 6))
  with jax.enable_x64(True):
    x64 = np.asarray(fp.solve_fixed_point(jnp.asarray(v), jnp.asarray(e)))
  x32 = np.asarray(fp.solve_fixed_point(jnp.asarray(v, jnp.float32),
                                        jnp.asarray(e, jnp.float32)), np.float64)
  cov64, cov32 = x64 @ x64.T, x32 @ x32.T
  assert np.linalg.norm(cov32 - cov64) < 1e-3 * np.linalg.norm(cov64)
  # The paper's form X = L_B S W^T - V E / 2, evaluated in float32 (numpy).
  ve = (v @ e).astype(np.float32)
  b = v.astype(np.float32) + 0.25 * ve @ ve.T
  l_b = np.linalg.cholesky(b.astype(np.float64)).astype(np.float32)
  u, _, wt = np.linalg.svd(np.linalg.solve(l_b, ve).astype(np.float32))
  naive = (l_b @ u @ wt - 0.5 * ve).astype(np.float64)
  if log_scale >= 4:  # the textbook form loses the answer here
    assert np.linalg.norm(naive @ naive.T - cov64) > 1e-2 * np.linalg.norm(cov64)


def test_factor_form_float32_accurate_for_ill_conditioned_covariance():
  # Long streams shrink some directions a lot: cond(V) = 1e10 is out of reach
  # of float32 Cholesky of V, not of the factor form X = A T.
  rng = np.random.default_rng(10)
  n = 12
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  a = q @ np.diag(np.logspace(0, -5, n)) @ np.linalg.qr(rng.normal(size=(n, n)))[0]
  e = rng.normal(size=(n, n)) * 50.0
  with jax.enable_x64(True):
    x64 = np.asarray(fp.solve_fixed_point_factor(jnp.asarray(a), jnp.asarray(e)))
    res = np.asarray(fp.fixed_point_residual(x64, a @ a.T, e))
  assert np.abs(res).max() < 1e-12 * np.abs(e).max()
  x32 = np.asarray(fp.solve_fixed_point_factor(jnp.asarray(a, jnp.float32),
                                               jnp.asarray(e, jnp.float32)), np.float64)
  assert np.all(np.isfinite(x32))
  # Compare in the whitened coordinates of the old covariance: A^-1 X.
  t64, t32 = np.linalg.solve(a, x64), np.linalg.solve(a.astype(np.float32), x32)
  assert np.linalg.norm(t32 @ t32.T - t64 @ t64.T) < 1e-3 * np.linalg.norm(t64 @ t64.T)


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(n=st.integers(1, 8), seed=st.integers(0, 10_000),
                  log_scale=st.floats(-2.0, 2.0))
def test_fixed_point_factor_has_the_papers_covariance(n, seed, log_scale):
  rng = np.random.default_rng(seed)
  a = np.tril(rng.normal(size=(n, n))) + 2.0 * np.eye(n)
  e = rng.normal(size=(n, n)) * 10.0 ** log_scale
  with jax.enable_x64(True):
    x = np.asarray(fp.fixed_point_factor(jnp.asarray(a), jnp.asarray(e)))
    y = np.asarray(fp.solve_fixed_point_factor(jnp.asarray(a), jnp.asarray(e)))
  np.testing.assert_allclose(x @ x.T, y @ y.T, rtol=1e-9,
                             atol=1e-12 * np.abs(a @ a.T).max())
  # The closed form: X = A h(G), h(G) = (sqrt(I + G) + sqrt(G))^-1, G = F F^T.
  f = a.T @ e / 2
  d, u = np.linalg.eigh(f @ f.T)
  d = np.maximum(d, 0)
  h = (u / (np.sqrt(1 + d) + np.sqrt(d))) @ u.T
  np.testing.assert_allclose(x, a @ h, rtol=1e-6, atol=1e-9)
  # The covariance never grows: V - X X^T is positive semi-definite.
  assert np.linalg.eigvalsh(a @ a.T - x @ x.T).min() > -1e-9 * np.abs(a).max() ** 2


def test_fixed_point_factor_is_canonical():
  # Rotating the old factor (A -> A Q, the same covariance) rotates the new
  # one by the same Q and nothing else: the result is a function of (A, E),
  # whichever singular vectors LAPACK returns. The paper's root is not.
  rng = np.random.default_rng(3)
  n = 6
  a = jnp.asarray(np.tril(rng.normal(size=(n, n))) + 2 * np.eye(n), jnp.float32)
  e = jnp.asarray(rng.normal(size=(n, n)), jnp.float32)
  q = jnp.asarray(np.linalg.qr(rng.normal(size=(n, n)))[0], jnp.float32)
  x, xq = fp.fixed_point_factor(a, e), fp.fixed_point_factor(a @ q, e)
  np.testing.assert_allclose(xq, x @ q, atol=1e-5)
  # Batched linear algebra gives the same factor as one at a time.
  xs = jax.vmap(fp.fixed_point_factor)(jnp.stack([a, a @ q]), jnp.stack([e, e]))
  np.testing.assert_allclose(xs[0], x, atol=1e-5)
  # Repeated singular values (E = 0 in a block): any basis of that block
  # gives the same answer, the identity there.
  e0 = e.at[:, :3].set(0.0).at[:3].set(0.0)
  x0 = fp.fixed_point_factor(jnp.eye(n), e0)
  np.testing.assert_allclose(x0[:3, :3], np.eye(3), atol=1e-6)


def test_fixed_point_factor_float32_keeps_untouched_directions():
  # Directions no gradient reaches (zero rows/columns of E) keep their
  # variance: the singular values come from F itself, so no sqrt(eps) shrink
  # accumulates over a long stream.
  rng = np.random.default_rng(4)
  # (Taking them as sqrt of the eigenvalues of F F^T leaves 1.4e-3 here.)
  n = 40
  a = jnp.asarray(np.linalg.qr(rng.normal(size=(n, n)))[0], jnp.float32)
  for _ in range(300):
    e = rng.normal(size=(n, n)).astype(np.float32) * 0.02
    e[:10] = 0.0
    e[:, :10] = 0.0
    a = fp.fixed_point_factor(a, jnp.asarray(e))
  v = np.asarray(a @ a.T, np.float64)
  np.testing.assert_allclose(v[:10, :10], np.eye(10), atol=1e-4)
  assert np.diag(v)[10:].max() < 0.01      # the others did shrink


def test_1x1_equation_reproduces_diagonal_formula():
  rng = np.random.default_rng(4)
  std = rng.uniform(0.01, 1.0, size=40)
  e = np.concatenate([rng.uniform(0, 30, size=20), -rng.uniform(0, 30, size=20)])
  std = np.concatenate([std[:20], std[20:]])
  with jax.enable_x64(True):
    diag = np.asarray(fp.diagonal_std_update(jnp.asarray(std), jnp.asarray(e)))
    xs = np.array([float(fp.solve_fixed_point(jnp.array([[s * s]]),
                                              jnp.array([[ei]]))[0, 0])
                   for s, ei in zip(std, e)])
  v = std ** 2
  # Both are roots of the same quadratic ...
  np.testing.assert_allclose(xs ** 2 + v * e * xs - v, 0.0, atol=1e-12)
  # ... and for e >= 0 (the curvature estimate is positive) the same root:
  np.testing.assert_allclose(xs[:20], diag[:20], rtol=1e-12)
  # for e < 0 the closed form takes the root that does not grow the variance
  # (|X| = the other root's magnitude), the diagonal formula the growing one.
  np.testing.assert_allclose(np.abs(xs[20:]) * diag[20:], v[20:], rtol=1e-10)


# --------------------------------------------------------------------------
# Bayesian linear regression: exact posterior known.


def _linear_regression(seed=0, n=30, d=3, prior_scale=None, rho=0.5):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d))
  y = x @ rng.normal(size=d) + 0.3 * rng.normal(size=n)
  noise = 0.5
  h = x.T @ x / noise ** 2            # Hessian of the summed NLL
  b = x.T @ y / noise ** 2            # grad L(theta) = h theta - b
  m0 = rng.normal(size=d) * 0.1
  if prior_scale is None:
    s0 = _spd(rng, d)
    s0 *= rho / np.max(np.abs(np.linalg.eigvals(s0 @ h)))
  else:
    s0 = prior_scale
  post_cov = np.linalg.inv(np.linalg.inv(s0) + h)
  post_mean = post_cov @ (np.linalg.solve(s0, m0) + b)
  return h, b, m0, s0, post_mean, post_cov


def _full_map(mu, scale, h, b, m0, s0):
  """The FOO-VB full-covariance map with exact expectations under N(mu, L L^T)."""
  grad_mean = h @ mu - b                    # E[grad L(theta)]
  e = h @ scale                             # E[grad L(mu + L eps) eps^T]
  new_mu = m0 - s0 @ grad_mean
  new_scale = fp.solve_fixed_point(jnp.asarray(s0), jnp.asarray(e))
  return new_mu, np.asarray(new_scale)


def test_exact_posterior_is_fixed_point_of_full_map():
  with jax.enable_x64(True):
    h, b, m0, s0, m, s = _linear_regression(rho=3.0)  # also when one step is unstable
    scale = np.linalg.cholesky(s)
    new_mu, new_scale = _full_map(m, scale, h, b, m0, s0)
  assert np.abs(new_mu - m).max() < 1e-13 * (1 + np.abs(m).max())
  assert np.abs(new_scale - scale).max() < 1e-13 * np.abs(scale).max() * 10
  assert np.abs(new_scale @ new_scale.T - s).max() < 1e-14 * 10


def test_iterated_full_map_converges_to_exact_posterior():
  with jax.enable_x64(True):
    h, b, m0, s0, m, s = _linear_regression(seed=1, rho=0.5)
    mu, scale = m0.copy(), np.linalg.cholesky(s0)
    errors = []
    for _ in range(60):
      mu, scale = _full_map(mu, scale, h, b, m0, s0)
      errors.append(np.abs(scale @ scale.T - s).max() + np.abs(mu - m).max())
  assert errors[-1] < 1e-12
  assert errors[10] < errors[0] * 1e-2


def test_mean_field_solution_is_fixed_point_of_diagonal_map():
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    v0 = rng.uniform(0.01, 0.1, size=4)
    h, b, m0, s0, _, _ = _linear_regression(seed=2, d=4, prior_scale=np.diag(v0))
    precision = np.diag(1 / v0) + h
    mean = np.linalg.solve(precision, m0 / v0 + b)   # exact posterior mean
    sigma = 1 / np.sqrt(np.diag(precision))          # mean-field variances
    grad_mean = h @ mean - b                         # E[g]
    geps = np.diag(h) * sigma                        # E[g_i eps_i]
    new_mean = m0 - v0 * grad_mean
    new_sigma = np.asarray(fp.diagonal_std_update(jnp.asarray(np.sqrt(v0)),
                                                  jnp.asarray(geps)))
  np.testing.assert_allclose(new_mean, mean, rtol=1e-13, atol=1e-14)
  np.testing.assert_allclose(new_sigma, sigma, rtol=1e-13)


# --------------------------------------------------------------------------
# Kronecker: the Flax layout against the paper's (out, in + 1) layout.


def _reference_kron_step(m_ref, a, b, psi_ref, phi_ref, eta):
  """The paper's formulas, written in its own layout W_ref = M + B Phi A^T (P x N)."""
  k, p, n = psi_ref.shape
  new_m = m_ref - eta * (b @ b.T) @ psi_ref.mean(0) @ (a @ a.T)
  e_a = sum(psi_ref[i].T @ b @ phi_ref[i] for i in range(k)) / (k * p)
  e_b = sum(psi_ref[i] @ a @ phi_ref[i].T for i in range(k)) / (k * n)
  samples = np.stack([m_ref + b @ phi_ref[i] @ a.T for i in range(k)])
  return new_m, e_a, e_b, samples


def test_kron_flax_layout_matches_reference_layout():
  rng = np.random.default_rng(5)
  k, n, p = 6, 5, 3          # n = in + 1 rows (bias last), p = out
  a = rng.normal(size=(n, n))
  b = rng.normal(size=(p, p))
  m = rng.normal(size=(n, p))
  psi = rng.normal(size=(k, n, p))
  phi = rng.normal(size=(k, n, p))
  with jax.enable_x64(True):
    psi_bar, e_a, e_b = kr.kron_statistics(psi, phi, a, b)
    new_m = kr.kron_mean_step(m, a, b, psi_bar, 0.7)
    samples = kr.kron_sample(m, a, b, phi)
  ref_m, ref_ea, ref_eb, ref_samples = _reference_kron_step(
      m.T, a, b, psi.transpose(0, 2, 1), phi.transpose(0, 2, 1), 0.7)
  np.testing.assert_allclose(np.asarray(new_m), ref_m.T, rtol=1e-12)
  np.testing.assert_allclose(np.asarray(e_a), ref_ea, rtol=1e-12)
  np.testing.assert_allclose(np.asarray(e_b), ref_eb, rtol=1e-12)
  np.testing.assert_allclose(np.asarray(samples), ref_samples.transpose(0, 2, 1),
                             rtol=1e-12)


def test_kron_samples_have_stated_covariance():
  rng = np.random.default_rng(6)
  n, p, k = 3, 2, 100_000
  a = np.tril(rng.normal(size=(n, n))) + np.eye(n)
  b = np.tril(rng.normal(size=(p, p))) + np.eye(p)
  m = rng.normal(size=(n, p))
  phi = jax.random.normal(jax.random.PRNGKey(0), (k, n, p))
  w = np.asarray(kr.kron_sample(m, a, b, phi), np.float64).reshape(k, -1)
  cov = np.cov(w, rowvar=False)
  want = np.asarray(kr.kron_covariance(a, b))
  np.testing.assert_allclose(want, np.kron(a @ a.T, b @ b.T), rtol=1e-6)
  np.testing.assert_allclose(cov, want, atol=0.03 * np.abs(want).max())
  np.testing.assert_allclose(w.mean(0), m.reshape(-1), atol=0.03 * np.abs(want).max())


def test_kron_statistics_stein_expectation():
  # L(W) = tr(H_A W H_B W^T) / 2  =>  E[E_A] = H_A A tr(B^T H_B B) / p,
  #                                   E[E_B] = H_B B tr(A^T H_A A) / n.
  rng = np.random.default_rng(7)
  n, p, k = 3, 4, 40_000
  h_a, h_b = _spd(rng, n), _spd(rng, p)
  a = np.tril(rng.normal(size=(n, n))) * 0.3 + np.eye(n)
  b = np.tril(rng.normal(size=(p, p))) * 0.3 + np.eye(p)
  m = rng.normal(size=(n, p))
  phi = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (k, n, p)), np.float64)
  with jax.enable_x64(True):
    w = kr.kron_sample(m, a, b, phi)
    psi = h_a @ w @ h_b
    _, e_a, e_b = kr.kron_statistics(psi, phi, a, b)
  want_a = h_a @ a * np.trace(b.T @ h_b @ b) / p
  want_b = h_b @ b * np.trace(a.T @ h_a @ a) / n
  np.testing.assert_allclose(np.asarray(e_a), want_a, atol=0.05 * np.abs(want_a).max())
  np.testing.assert_allclose(np.asarray(e_b), want_b, atol=0.05 * np.abs(want_b).max())


def test_alpha_split_scale_variance():
  assert kr.alpha_split_scale(98, 0.5) ** 4 == pytest.approx(0.01)
  assert kr.alpha_split_scale(30, 0.25) ** 4 == pytest.approx(2 * 0.75 / 32)


def test_mix_scale_and_std():
  rng = np.random.default_rng(8)
  with jax.enable_x64(True):
    l = np.tril(rng.normal(size=(4, 4))) + 2 * np.eye(4)
    t = _spd(rng, 4)
    got = np.asarray(fp.mix_scale(l, t, 0.3))
    np.testing.assert_allclose(got @ got.T, 0.7 * l @ l.T + 0.3 * t, rtol=1e-12)
    s = np.asarray(fp.mix_std(jnp.asarray([1.0, 2.0]), 4.0, 0.25))
  np.testing.assert_allclose(s ** 2, 0.75 * np.array([1.0, 4.0]) + 1.0)
