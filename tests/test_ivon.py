"""IVON (sparse_jax.bayes.ivon) against Algorithm 1 of Shen et al. 2024."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_jax.bayes import (IVONState, find_foovb_state, foovb_sample,
                              foovb_set_mean, foovb_std, ivon)

K = 3


def _params():
  rng = np.random.default_rng(0)
  return {"dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                    "bias": jnp.zeros(3, jnp.float32)},
          "scale": jnp.asarray(rng.uniform(0.5, 1.5, size=(3,)), jnp.float32)}


def _loss(target):
  def loss(p):   # a batch-mean style loss with curvature 2 (not quadratic in scale)
    return sum(jnp.sum((a - b) ** 2) for a, b in
               zip(jax.tree.leaves(p), jax.tree.leaves(target))) + jnp.sum(
                   jnp.sin(p["scale"]))
  return loss


def _algorithm_1(m, g_mom, h, grads, eps, sigma, t, *, lr, ess, h0, b1, b2, wd):
  """One step of Algorithm 1 (numpy, float64), K samples averaged."""
  g_hat = grads.mean(0)
  h_hat = (grads * eps / sigma).mean(0)       # g (theta - m) / sigma^2
  g_mom = b1 * g_mom + (1 - b1) * g_hat
  h = b2 * h + (1 - b2) * h_hat + 0.5 * (1 - b2) ** 2 * (h - h_hat) ** 2 / (h + wd)
  g_bar = g_mom / (1 - b1 ** t)
  m = m - lr * (h0 + wd) * (g_bar + wd * m) / (h + wd)
  return m, g_mom, h, 1 / np.sqrt(ess * (h + wd))


def test_matches_algorithm_1_step_by_step():
  hp = dict(lr=0.05, ess=50.0, h0=0.5, b1=0.9, b2=0.95, wd=1e-2)
  tx = ivon(hp["lr"], ess=hp["ess"], hess_init=hp["h0"], beta1=hp["b1"],
            beta2=hp["b2"], weight_decay=hp["wd"], num_samples=K, key=4)
  params = _params()
  loss = _loss(jax.tree.map(lambda x: x + 1.0, params))
  state = tx.init(params)
  flat = lambda t: [np.asarray(x, np.float64) for x in jax.tree.leaves(t)]
  m, g_mom = flat(params), [np.zeros_like(x) for x in flat(params)]
  h = [np.full_like(x, hp["h0"]) for x in m]
  sigma = [1 / np.sqrt(hp["ess"] * (hp["h0"] + hp["wd"]))] * len(m)
  np.testing.assert_allclose(flat(foovb_std(state))[0], sigma[0], rtol=1e-6)
  for t in range(1, 6):
    samples = foovb_sample(state, K)
    grads = jax.vmap(jax.grad(loss))(samples)
    eps = [(s - mi) / si for s, mi, si in zip(flat(samples), m, sigma)]
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    for i, g in enumerate(flat(grads)):
      m[i], g_mom[i], h[i], sigma[i] = _algorithm_1(
          m[i], g_mom[i], h[i], g, eps[i], sigma[i], t, **hp)
    for got, want in zip(flat(params), m):
      np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    for got, want in zip(flat(state.hess), h):
      np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    for got, want in zip(flat(foovb_std(state)), sigma):
      np.testing.assert_allclose(got, want, rtol=2e-5)
  assert int(state.count) == 5


def test_quadratic_reaches_the_posterior_in_closed_form():
  # Mean loss l(theta) = sum H (theta - c)^2 / 2: E[g eps / sigma] = H, so h
  # -> H, the mean -> H c / (H + delta) (the weight decay is the prior) and
  # sigma -> 1 / sqrt(ess (H + delta)).
  hess = jnp.array([0.5, 2.0, 8.0])
  c = jnp.array([1.0, -2.0, 0.5])
  wd, ess = 0.1, 200.0
  tx = ivon(0.05, ess=ess, hess_init=1.0, beta2=0.99, weight_decay=wd,
            num_samples=16, key=0)
  loss = lambda p: 0.5 * jnp.sum(hess * (p["w"] - c) ** 2)
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.vmap(jax.grad(loss))(foovb_sample(state, 16))
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(3000):
    params, state = step(params, state)
  np.testing.assert_allclose(state.hess["w"], hess, rtol=0.05)
  np.testing.assert_allclose(params["w"], hess * c / (hess + wd), rtol=0.02,
                             atol=0.01)
  np.testing.assert_allclose(foovb_std(state)["w"],
                             1 / np.sqrt(ess * (hess + wd)), rtol=0.03)


def test_the_hessian_estimate_stays_positive():
  # Huge negative curvature estimates (concave loss) cannot drive h + delta
  # to zero or below: the third term of the h update (Lin et al. 2020).
  tx = ivon(0.01, ess=10.0, beta2=0.5, weight_decay=1e-3, num_samples=K, key=2)
  params = {"w": jnp.zeros(5)}
  loss = lambda p: -50.0 * jnp.sum(p["w"] ** 2)
  state = tx.init(params)
  for _ in range(20):
    grads = jax.vmap(jax.grad(loss))(foovb_sample(state, K))
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    assert float(jnp.min(state.hess["w"])) > -1e-3
    assert np.all(np.isfinite(np.asarray(foovb_std(state)["w"])))


def test_summed_loss_gradients_are_divided_by_the_batch_size():
  params = _params()
  loss = _loss(params)
  kw = dict(ess=10.0, num_samples=K, key=1)
  a, b = ivon(0.1, **kw), ivon(0.1, loss="sum", batch_size=8, **kw)
  sa, sb = a.init(params), b.init(params)
  grads = jax.vmap(jax.grad(loss))(foovb_sample(sa, K))
  ua, _ = a.update(grads, sa, params)
  ub, _ = b.update(jax.tree.map(lambda g: 8 * g, grads), sb, params)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), ua, ub)
  with pytest.raises(ValueError, match="batch size"):
    ivon(0.1, loss="sum", **kw).update(grads, sb, params)


def test_nonfinite_gradients_skip_the_step():
  params = _params()
  tx = ivon(0.1, ess=10.0, num_samples=K)
  state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.ones((K,) + p.shape), params)
  grads["scale"] = grads["scale"].at[0, 1].set(jnp.nan)
  updates, new = tx.update(grads, state, params)
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))
  assert int(new.skipped) == 1 and int(new.count) == 0
  np.testing.assert_array_equal(new.key, state.key)


def test_sampling_api_and_mask():
  params = _params()
  tx = optax.chain(ivon(0.1, ess=10.0, num_samples=K,
                        mask={"dense": True, "scale": False}),
                   optax.identity())
  state = tx.init(params)
  assert isinstance(find_foovb_state(state), IVONState)
  samples = foovb_sample(state, K)
  assert samples["dense"]["kernel"].shape == (K, 4, 3)
  # The unmasked leaf is a point estimate: every sample is its mean.
  np.testing.assert_array_equal(samples["scale"],
                                jnp.broadcast_to(params["scale"], (K, 3)))
  assert float(jnp.abs(foovb_std(state)["scale"]).max()) == 0.0
  moved = jax.tree.map(lambda x: x + 1.0, params)
  assert float(find_foovb_state(foovb_set_mean(state, moved)).mean["scale"][0]) \
      == pytest.approx(float(params["scale"][0]) + 1.0)


@pytest.mark.parametrize("bad, match", [
    (dict(ess=0.0), "ess"),
    (dict(ess=True), "ess"),
    (dict(ess=1.0, beta1=1.0), "beta1"),
    (dict(ess=1.0, beta2=float("nan")), "beta2"),
    (dict(ess=1.0, weight_decay=0.0), "weight_decay"),
    (dict(ess=1.0, hess_init=-1.0), "hess_init"),
    (dict(ess=1.0, num_samples=0), "num_samples"),
    (dict(ess=1.0, loss="median"), "loss"),
    (dict(ess=1.0, clip_radius=float("inf")), "clip_radius"),
])
def test_bad_options_raise_naming_the_option(bad, match):
  with pytest.raises((ValueError, TypeError), match=match):
    ivon(0.1, **bad)


def test_gradients_without_the_sample_axis_say_what_to_do():
  params = _params()
  tx = ivon(0.1, ess=10.0, num_samples=K)
  with pytest.raises(ValueError, match="leading sample axis"):
    tx.update(params, tx.init(params), params)
