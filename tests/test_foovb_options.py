"""FOO-VB layouts (Dense/Conv/NNX), options (mask, loss, damping, iterations,
forgetting), Monte-Carlo error and float32 robustness, checked against the math."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sparse_jax.bayes import foovb_step
from sparse_jax.bayes import fixed_point as fp
from sparse_jax.bayes.transform import (
    KronFactors,
    alpha_split_init,
    foovb,
    foovb_sample,
    foovb_std,
)


def _grads_at(loss, samples):
  return jax.vmap(jax.grad(loss))(samples)


def _random_factor(rng, n):
  return jnp.asarray(0.3 * np.tril(rng.normal(size=(n, n))) + np.eye(n), jnp.float32)


# --------------------------------------------------------------------------
# Kronecker layouts.


def test_kron_dense_samples_have_stated_covariance_with_bias_row():
  rng = np.random.default_rng(0)
  params = {"layer": {"kernel": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}}
  state = foovb(covariance="kron").init(params)
  a, b = _random_factor(rng, 3), _random_factor(rng, 3)   # 2 inputs + bias row
  state = state._replace(kron={"['layer']['kernel']": KronFactors(a, b)})
  k = 40_000
  s = foovb_sample(state, k)["layer"]
  w = np.concatenate([s["kernel"], s["bias"][:, None]], 1).reshape(k, -1)
  want = np.kron(np.asarray(a @ a.T), np.asarray(b @ b.T))
  np.testing.assert_allclose(np.cov(w.astype(np.float64), rowvar=False), want,
                             atol=0.04 * np.abs(want).max())
  mean = np.concatenate([params["layer"]["kernel"], params["layer"]["bias"][None]], 0)
  np.testing.assert_allclose(w.mean(0), mean.reshape(-1), atol=0.04)
  # foovb_std: sqrt of the covariance's diagonal, split back into kernel/bias.
  std = foovb_std(state)["layer"]
  got = np.concatenate([std["kernel"], std["bias"][None]], 0).reshape(-1)
  np.testing.assert_allclose(got, np.sqrt(np.diag(want)), rtol=1e-5)


def test_kron_conv_hwio_rows_are_h_w_in_row_major():
  h, w, cin, cout = 2, 3, 2, 4
  rng = np.random.default_rng(1)
  params = {"conv": {"kernel": jnp.zeros((h, w, cin, cout)),
                     "bias": jnp.zeros((cout,))}}
  state = foovb(covariance="kron").init(params)
  group = state.layout.groups[0]
  assert (group.fan_in, group.rows, group.cols) == (h * w * cin, h * w * cin + 1, cout)
  da = rng.uniform(0.5, 2.0, size=group.rows)
  db = rng.uniform(0.5, 2.0, size=cout)
  state = state._replace(kron={group.name: KronFactors(
      jnp.diag(jnp.asarray(da, jnp.float32)), jnp.diag(jnp.asarray(db, jnp.float32)))})
  std = foovb_std(state)["conv"]
  for i in range(h):
    for j in range(w):
      for c in range(cin):
        row = (i * w + j) * cin + c
        np.testing.assert_allclose(std["kernel"][i, j, c], da[row] * db, rtol=1e-5)
  np.testing.assert_allclose(std["bias"], da[-1] * db, rtol=1e-5)
  s = foovb_sample(state, 20_000)["conv"]
  np.testing.assert_allclose(s["kernel"].std(0), std["kernel"], rtol=0.05)
  np.testing.assert_allclose(s["bias"].std(0), std["bias"], rtol=0.05)


def test_kron_on_nnx_models_groups_kernels_and_biases():
  from sparse_jax.models import CNN, MLP
  cnn = CNN((4, 4, 1), 10, features=(4,), dense=8, rngs=nnx.Rngs(0))
  state = foovb(covariance="kron").init(nnx.split(cnn, nnx.Param)[1])
  groups = {g.name: (g.rows, g.cols, g.bias is not None) for g in state.layout.groups}
  assert groups == {"['convs'][0]['kernel']": (3 * 3 * 1 + 1, 4, True),
                    "['dense']['kernel']": (4 + 1, 8, True),
                    "['head']['kernel']": (8 + 1, 10, True)}
  # A jitted step on NNX State params (paths end in .value).
  graphdef, params = nnx.split(MLP((4, 1, 1), 3, hidden=(5,), rngs=nnx.Rngs(0)),
                               nnx.Param)
  tx = foovb(covariance="kron", num_samples=3)
  state = tx.init(params)
  assert [g.name for g in state.layout.groups] == ["['head']['kernel']",
                                                   "['hidden'][0]['kernel']"]
  x = jnp.ones((2, 4, 1, 1))

  def loss(p):
    return nnx.merge(graphdef, p)(x).sum()

  @jax.jit
  def step(params, state):
    grads = _grads_at(loss, foovb_sample(state, 3))
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  p2, s2 = step(params, state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), p2, s2.mean)
  assert not np.allclose(s2.kron["['head']['kernel']"].b, state.kron["['head']['kernel']"].b)


def test_alpha_split_init_statistics():
  params = {"d": {"kernel": jnp.zeros((400, 300)), "bias": jnp.zeros(300)},
            "ln": {"scale": jnp.ones(300)}}
  p = alpha_split_init(params, 0, alpha=0.3)
  want = np.sqrt(2 * 0.3 / 402)
  assert abs(float(p["d"]["kernel"].std()) / want - 1) < 0.02
  assert abs(float(p["d"]["bias"].std()) / want - 1) < 0.2
  np.testing.assert_array_equal(p["ln"]["scale"], params["ln"]["scale"])
  state = foovb(covariance="kron", alpha=0.3).init(p)
  fac = state.kron["['d']['kernel']"]
  np.testing.assert_allclose(fac.a[0, 0] ** 2 * fac.b[0, 0] ** 2, 2 * 0.7 / 402, rtol=1e-5)


# --------------------------------------------------------------------------
# mask, loss convention, damping, forgetting, fixed-point iterations.


def _params():
  rng = np.random.default_rng(3)
  return {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}


def _loss(p):
  return jnp.sum((p["w"] - 1.0) ** 2) * 2.0 + jnp.sum(jnp.sin(p["b"]) * p["w"][0])


def test_mask_leaves_are_point_estimates():
  params = _params()
  tx = foovb(num_samples=4, mask={"w": True, "b": False}, init_std=0.1)
  state = tx.init(params)
  assert state.std["b"] is None
  samples = foovb_sample(state, 4)
  np.testing.assert_array_equal(samples["b"], jnp.broadcast_to(params["b"], (4, 2)))
  assert float(samples["w"].std(0).min()) > 0
  grads = _grads_at(_loss, samples)
  updates, new = tx.update(grads, state, params)
  np.testing.assert_allclose(updates["b"], grads["b"].mean(0), rtol=1e-6)
  np.testing.assert_array_equal(new.mean["b"], params["b"])
  np.testing.assert_array_equal(foovb_std(new)["b"], 0.0)


def test_mean_loss_equals_sum_loss_times_batch_size():
  params = _params()
  tx_sum = foovb(num_samples=4)
  tx_mean = foovb(num_samples=4, loss="mean", batch_size=8)
  state = tx_sum.init(params)
  grads = _grads_at(_loss, foovb_sample(state, 4))
  u1, s1 = tx_sum.update(grads, state, params)
  u2, s2 = tx_mean.update(jax.tree.map(lambda g: g / 8, grads), tx_mean.init(params),
                          params)
  u3, _ = tx_mean.update(jax.tree.map(lambda g: g / 2, grads), tx_mean.init(params),
                         params, batch_size=2)
  for a, b, c in [(u1, u2, u3), (s1.std, s2.std, s2.std)]:
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-8), a, b)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-8), u1, u3)


@pytest.mark.parametrize("covariance", ["diagonal", "kron", "full"])
def test_damping_and_forgetting_mix_as_stated(covariance):
  params = {"d": {"kernel": _params()["w"], "bias": _params()["b"]}}
  loss = lambda p: _loss({"w": p["d"]["kernel"], "b": p["d"]["bias"]})
  kw = dict(covariance=covariance, num_samples=4, init_std=0.2, kron_init="std")
  base = foovb(**kw)
  state = base.init(params)
  grads = _grads_at(loss, foovb_sample(state, 4))
  u0, s0 = base.update(grads, state, params)
  w, g = 0.3, 0.2
  u1, s1 = foovb(damping=w, **kw).update(grads, state, params)
  u2, s2 = foovb(forgetting=g, **kw).update(grads, state, params)
  # mean: relaxed step, untouched by forgetting
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, w * b, rtol=1e-5, atol=1e-8), u1, u0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u2, u0)

  def covs(s):
    if covariance == "diagonal":
      return [x ** 2 for x in jax.tree.leaves(s.std)]
    if covariance == "kron":
      f = s.kron["['d']['kernel']"]
      return [f.a @ f.a.T, f.b @ f.b.T]
    return [s.scale @ s.scale.T]

  def init_covs():
    if covariance == "diagonal":
      return [0.04, 0.04]
    if covariance == "kron":
      return [0.2 * np.eye(4), 0.2 * np.eye(2)]
    return [0.04 * np.eye(8)]

  for c0, c1, c2, ci, cs in zip(covs(s0), covs(s1), covs(s2), init_covs(), covs(state)):
    np.testing.assert_allclose(c1, (1 - w) * cs + w * c0, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(c2, (1 - g) * c0 + g * ci, rtol=1e-4, atol=1e-7)


def test_fixed_point_iterations_keep_the_batch_prior():
  params = _params()
  n, eta = 3, 0.5
  tx = foovb(num_samples=6, fixed_point_iterations=n, init_std=0.1, eta=eta)
  state = tx.init(params)
  prior_mean, prior_std = params, state.std
  p = params
  for it in range(2 * n):
    cur = state
    samples = foovb_sample(state, 6)
    grads = _grads_at(_loss, samples)
    updates, state = tx.update(grads, state, p)
    p = optax.apply_updates(p, updates)
    for name in ("w", "b"):
      eps = (samples[name] - cur.mean[name]) / cur.std[name]
      g = grads[name]
      want_m = prior_mean[name] - eta * prior_std[name] ** 2 * g.mean(0)
      want_s = fp.diagonal_std_update(prior_std[name], (g * eps).mean(0))
      np.testing.assert_allclose(state.mean[name], want_m, rtol=1e-4, atol=1e-6)
      np.testing.assert_allclose(state.std[name], want_s, rtol=1e-4)
    if (it + 1) % n == 0:   # end of the batch: the iterate becomes the prior
      jax.tree.map(np.testing.assert_array_equal, state.anchor.mean, state.mean)
      prior_mean, prior_std = state.mean, state.std
    else:
      jax.tree.map(np.testing.assert_array_equal, state.anchor.mean, prior_mean)


# --------------------------------------------------------------------------
# Bayesian linear regression through the transform (full covariance).


def _regression(rho):
  rng = np.random.default_rng(4)
  n, d, init_std, noise = 40, 3, 0.3, 0.5
  x = rng.normal(size=(n, d)) * np.array([1.0, 0.6, 0.3])
  y = x @ np.array([0.5, -1.0, 2.0]) + noise * rng.normal(size=n)
  h = x.T @ x / noise ** 2
  scale_x = np.sqrt(rho / (init_std ** 2 * np.linalg.eigvalsh(h).max()))
  x, h = x * scale_x, h * scale_x ** 2
  b = x.T @ y / noise ** 2
  post_cov = np.linalg.inv(np.eye(d) / init_std ** 2 + h)
  post_mean = post_cov @ b            # prior mean 0
  return x, y, noise, init_std, post_mean, post_cov


def _fit_regression(rho, iterations, damping, k=400):
  x, y, noise, init_std, m, s = _regression(rho)
  loss = lambda p: 0.5 * jnp.sum((y - jnp.asarray(x, jnp.float32) @ p["w"]) ** 2) / noise ** 2
  tx = foovb(covariance="full", num_samples=k, init_std=init_std,
             fixed_point_iterations=iterations, damping=damping, key=1)
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)

  @jax.jit
  def run(params, state):
    def body(carry, _):
      params, state = carry
      grads = _grads_at(loss, foovb_sample(state, k))
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None
    return jax.lax.scan(body, (params, state), None, length=iterations)[0]

  params, state = run(params, state)
  cov = np.asarray(state.scale @ state.scale.T, np.float64)
  err_m = np.linalg.norm(np.asarray(params["w"]) - m) / np.linalg.norm(m)
  err_s = np.linalg.norm(cov - s) / np.linalg.norm(s)
  return err_m, err_s, state


def test_full_transform_one_step_is_exact_enough_for_weak_batches():
  # rho(Sigma0 H) = 0.05: one FOO-VB step ~ the exact posterior.
  err_m, err_s, _ = _fit_regression(0.05, 1, 1.0)
  assert err_m < 0.1 and err_s < 0.05


def test_full_transform_damped_iterations_fix_informative_batches():
  # rho(Sigma0 H) = 4: one step overshoots the mean (factor ~ rho) ...
  err_m1, err_s1, _ = _fit_regression(4.0, 1, 1.0)
  assert err_m1 > 0.5
  # ... damped fixed-point iterations on the same batch converge to the
  # exact posterior (up to Monte-Carlo error).
  err_m, err_s, state = _fit_regression(4.0, 40, 0.3)
  assert err_m < 0.05 and err_s < 0.1, (err_m, err_s)
  assert err_m < err_m1 / 10
  assert int(state.count) == 40


# --------------------------------------------------------------------------
# Monte-Carlo error ~ 1/sqrt(K); float32 robustness.


def test_monte_carlo_error_falls_like_inverse_sqrt_k():
  d, h, sigma, eta = 256, 2.0, 0.1, 1.0
  params = {"w": jnp.ones(d)}
  loss = lambda p: 0.5 * h * jnp.sum(p["w"] ** 2)
  exact = 1.0 - eta * sigma ** 2 * h * 1.0         # E[new mean]
  rms = []
  ks = [2, 8, 32, 128]
  for k in ks:
    tx = foovb(num_samples=k, init_std=sigma, eta=eta)
    state = tx.init(params)
    states = jax.vmap(lambda key: state._replace(key=key))(
        jax.random.split(jax.random.PRNGKey(0), 8))

    def new_mean(state):
      grads = _grads_at(loss, foovb_sample(state, k))
      return tx.update(grads, state, params)[1].mean["w"]

    got = jax.jit(jax.vmap(new_mean))(states)
    rms.append(float(jnp.sqrt(jnp.mean((got - exact) ** 2))))
  slope = np.polyfit(np.log(ks), np.log(rms), 1)[0]
  assert -0.6 < slope < -0.4, (slope, rms)
  # and the error is the stated one: sigma^2 h sigma / sqrt(K)
  np.testing.assert_allclose(rms, [sigma ** 3 * h / np.sqrt(k) for k in ks], rtol=0.1)


@pytest.mark.parametrize("scale", [1e-30, 1e10, 1e30, 3e37])
def test_float32_std_positive_and_finite_for_extreme_gradients(scale):
  params = {"w": jnp.zeros(64, jnp.float32)}
  tx = foovb(num_samples=4, init_std=0.05)
  state = tx.init(params)
  samples = foovb_sample(state, 4)
  for sign in (1.0, -1.0):
    grads = {"w": sign * scale * jnp.sign(samples["w"]) + 0.0 * samples["w"]}
    _, new = tx.update(grads, state, params)
    std = new.std["w"]
    assert std.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(std))) and bool(jnp.all(std > 0))
    if sign > 0 and scale >= 1e10:
      # geps = scale * mean|eps| > 0: std shrinks to ~ 1 / geps, not to 0.
      geps = scale * jnp.abs((samples["w"] - 0.0) / 0.05).mean(0)
      np.testing.assert_allclose(std, 1.0 / geps, rtol=1e-3)


def test_full_float64_matches_math_to_double_precision():
  with jax.enable_x64(True):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(20, 3))
    y = rng.normal(size=20)
    loss = lambda p: 0.5 * jnp.sum((y - x @ p["w"]) ** 2)
    params = {"w": jnp.asarray(rng.normal(size=3))}           # float64
    tx = foovb(covariance="full", num_samples=8, init_std=0.3, eta=0.9,
               centered=False)  # the papers' estimator E = mean_k g_k eps_k^T
    state = tx.init(params)
    assert state.scale.dtype == jnp.float64
    samples = foovb_sample(state, 8)
    grads = _grads_at(loss, samples)
    _, new = tx.update(grads, state, params)
    eps = (np.asarray(samples["w"]) - np.asarray(params["w"])) / 0.3
    g = np.asarray(grads["w"])
    v = 0.09 * np.eye(3)
    want_mu = np.asarray(params["w"]) - 0.9 * v @ g.mean(0)
    want_x = np.asarray(fp.solve_fixed_point(v, g.T @ eps / 8))
    np.testing.assert_allclose(new.mean["w"], want_mu, rtol=1e-12)
    # The state keeps the canonical factor of the paper's covariance.
    cov = np.asarray(new.scale @ new.scale.T)
    np.testing.assert_allclose(cov, want_x @ want_x.T, rtol=1e-9, atol=1e-14)
    res = fp.fixed_point_residual(want_x, v, g.T @ eps / 8)
    assert float(jnp.abs(res).max()) < 1e-14
    # float32 params with float64 covariance work too (the reference's solves).
    tx32 = foovb(covariance="full", num_samples=8, dtype=jnp.float64)
    p32 = {"w": jnp.zeros(3, jnp.float32)}
    s32 = tx32.init(p32)
    assert s32.scale.dtype == jnp.float64
    g32 = _grads_at(lambda p: jnp.sum(p["w"] ** 2), foovb_sample(s32, 8))
    u, s32 = tx32.update(g32, s32, p32)
    assert u["w"].dtype == jnp.float32 and s32.scale.dtype == jnp.float64


def test_full_covariance_learns_with_the_centred_statistic():
  # A 6-4-3 tanh network on a separable 3-class problem, full covariance over
  # its 43 params. With the papers' estimator E = mean_k g_k eps_k^T, the
  # zero-mean term gbar epsbar^T only ever shrinks the covariance (the closed-
  # form root never grows it), first along the gradient: the mean step V gbar
  # vanishes and the network stops learning. The centred estimator learns.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(256, 6)).astype(np.float32)
  y = (x @ rng.normal(size=(6, 3))).argmax(-1)

  def loss(p, xb, yb):
    h = jnp.tanh(xb @ p["w1"] + p["b1"]) @ p["w2"]
    return optax.softmax_cross_entropy_with_integer_labels(h, yb).sum()

  def accuracy(centered):
    r = np.random.default_rng(1)
    p = {"w1": jnp.asarray(r.normal(size=(6, 4)) * 0.5, jnp.float32),
         "b1": jnp.zeros(4), "w2": jnp.asarray(r.normal(size=(4, 3)) * 0.5, jnp.float32)}
    tx = foovb(covariance="full", num_samples=4, init_std=0.05, eta=5.0,
               centered=centered)
    s = tx.init(p)
    step = jax.jit(lambda p, s, xb, yb: foovb_step(tx, loss, p, s, xb, yb,
                                                   num_samples=4)[:2])
    for _ in range(150):
      i = r.integers(0, 256, 32)
      p, s = step(p, s, x[i], y[i])
    return float(((jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]).argmax(-1) == y).mean())

  centred, papers = accuracy(None), accuracy(False)   # None: the default, centred
  assert centred > 0.85, centred
  assert papers < centred - 0.3, (papers, centred)
