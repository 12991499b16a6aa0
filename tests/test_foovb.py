"""The FOO-VB optax transform: sample/update consistency, chains, errors, jit/scan/vmap."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_jax.bayes import fixed_point as fp
from sparse_jax.bayes import kronecker as kr
from sparse_jax.bayes.transform import (
    FooVBState,
    KronFactors,
    find_foovb_state,
    foovb,
    foovb_sample,
    foovb_set_mean,
)

K = 5


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32)},
      "norm": {"scale": jnp.asarray(rng.uniform(0.5, 1.5, size=(3,)), jnp.float32)},
  }


def _target(params, seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype),
                      params)


def _quad_loss(target, h=3.0):
  """Summed quadratic: grad = h * (theta - target), leafwise."""
  def loss(p):
    return sum(0.5 * h * jnp.sum((a - b) ** 2)
               for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target)))
  return loss


def _grads_at(loss, samples):
  return jax.vmap(jax.grad(loss))(samples)


# --------------------------------------------------------------------------
# The update uses exactly the noise of foovb_sample.


def test_diagonal_update_consistent_with_samples():
  params, eta = _params(), 0.7
  tx = foovb(num_samples=K, init_std=0.1, eta=eta, key=3)
  state = tx.init(params)
  loss = _quad_loss(_target(params))
  samples = foovb_sample(state, K)
  grads = _grads_at(loss, samples)
  updates, new = tx.update(grads, state, params)
  for path in [("dense", "kernel"), ("dense", "bias"), ("norm", "scale")]:
    mu = params[path[0]][path[1]]
    s = state.std[path[0]][path[1]]
    theta = samples[path[0]][path[1]]
    g = grads[path[0]][path[1]]
    eps = (theta - mu) / s
    want_mean = mu - eta * s ** 2 * g.mean(0)
    want_std = fp.diagonal_std_update(s, (g * eps).mean(0))
    np.testing.assert_allclose(new.mean[path[0]][path[1]], want_mean, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(updates[path[0]][path[1]], want_mean - mu,
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new.std[path[0]][path[1]], want_std, rtol=1e-4)
  assert int(new.count) == 1
  # The key advanced: the next samples differ; sampling alone changes nothing.
  again = foovb_sample(state, K)
  np.testing.assert_array_equal(again["dense"]["kernel"], samples["dense"]["kernel"])
  nxt = foovb_sample(new, K)
  assert not np.allclose(nxt["dense"]["kernel"] - new.mean["dense"]["kernel"],
                         samples["dense"]["kernel"] - params["dense"]["kernel"])


def test_noise_of_sample_k_independent_of_num_samples():
  params = _params()
  state = foovb(num_samples=3).init(params)
  a = foovb_sample(state, 3)["dense"]["kernel"]
  b = foovb_sample(state, 7)["dense"]["kernel"]
  np.testing.assert_array_equal(a, b[:3])


def test_kron_update_consistent_with_samples():
  params, eta = _params(), 0.5
  tx = foovb(covariance="kron", num_samples=K, eta=eta, init_std=0.1, key=4,
             centered=False)  # the papers' estimator, checked below
  state = tx.init(params)
  assert set(state.kron) == {"['dense']['kernel']"}
  assert state.std["dense"]["kernel"] is None
  assert state.std["dense"]["bias"] is None
  assert state.std["norm"]["scale"].shape == (3,)
  loss = _quad_loss(_target(params))
  samples = foovb_sample(state, K)
  grads = _grads_at(loss, samples)
  updates, new = tx.update(grads, state, params)
  fac = state.kron["['dense']['kernel']"]
  m = jnp.concatenate([params["dense"]["kernel"], params["dense"]["bias"][None]], 0)
  w = jnp.concatenate([samples["dense"]["kernel"],
                       samples["dense"]["bias"][:, None]], 1)
  psi = jnp.concatenate([grads["dense"]["kernel"], grads["dense"]["bias"][:, None]], 1)
  # Recover the noise from the samples: W - M = A Phi B^T.
  phi = jnp.linalg.solve(fac.a, w - m) @ jnp.linalg.inv(fac.b).T
  psi_bar, e_a, e_b = kr.kron_statistics(psi, phi, fac.a, fac.b)
  want_m = kr.kron_mean_step(m, fac.a, fac.b, psi_bar, eta)
  want_a = fp.solve_fixed_point(fac.a @ fac.a.T, e_a)
  want_b = fp.solve_fixed_point(fac.b @ fac.b.T, e_b)
  got = new.kron["['dense']['kernel']"]
  np.testing.assert_allclose(new.mean["dense"]["kernel"], want_m[:4], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new.mean["dense"]["bias"], want_m[4], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(updates["dense"]["bias"], want_m[4] - m[4], rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(got.a @ got.a.T, want_a @ want_a.T, rtol=1e-3, atol=1e-7)
  np.testing.assert_allclose(got.b @ got.b.T, want_b @ want_b.T, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("centered", [False, True])
def test_full_update_consistent_with_samples(centered):
  params, eta = _params(), 0.3
  tx = foovb(covariance="full", num_samples=K, eta=eta, init_std=0.2, key=5,
             centered=centered)
  state = tx.init(params)
  d = 4 * 3 + 3 + 3
  assert state.scale.shape == (d, d)
  # A non-trivial factor: set one, then check the update against the math.
  rng = np.random.default_rng(0)
  scale = jnp.asarray(0.1 * np.eye(d) + 0.02 * np.tril(rng.normal(size=(d, d))),
                      jnp.float32)
  state = state._replace(scale=scale)
  loss = _quad_loss(_target(params))
  samples = foovb_sample(state, K)
  grads = _grads_at(loss, samples)
  _, new = tx.update(grads, state, params)
  flat = lambda t: jnp.concatenate([x.reshape(t_lead + (-1,)) for x in [
      t["dense"]["bias"], t["dense"]["kernel"], t["norm"]["scale"]]], -1)
  t_lead = (K,)
  theta, g = flat(samples), flat(grads)
  t_lead = ()
  mu = flat(params)
  eps = jnp.linalg.solve(scale, (theta - mu).T).T
  v = scale @ scale.T
  want_mu = mu - eta * v @ g.mean(0)
  e = ((g - g.mean(0)).T @ eps / (K - 1)) if centered else (g.T @ eps / K)
  want_x = fp.solve_fixed_point(v, e)
  np.testing.assert_allclose(flat(new.mean), want_mu, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new.scale @ new.scale.T, want_x @ want_x.T,
                             rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("covariance", ["diagonal", "kron", "full"])
def test_consistent_inside_chain(covariance):
  params = _params()
  loss = _quad_loss(_target(params))
  alone = foovb(covariance=covariance, num_samples=K, key=7, init_std=0.05)
  chained = optax.chain(optax.identity(), foovb(covariance=covariance,
                                                num_samples=K, key=7,
                                                init_std=0.05),
                        optax.scale(1.0))
  s1, s2 = alone.init(params), chained.init(params)
  p1 = p2 = params
  for _ in range(3):
    smp1, smp2 = foovb_sample(s1, K), foovb_sample(s2, K)
    jax.tree.map(np.testing.assert_array_equal, smp1, smp2)
    u1, s1 = alone.update(_grads_at(loss, smp1), s1, p1)
    u2, s2 = chained.update(_grads_at(loss, smp2), s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), p1, p2)
  # The params you hold are the posterior mean.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               p2, find_foovb_state(s2).mean)
  assert isinstance(find_foovb_state(s2), FooVBState)


# --------------------------------------------------------------------------
# jit, scan, vmap.


def _step_fn(tx, loss):
  def step(params, state):
    samples = foovb_sample(state, K)
    updates, state = tx.update(_grads_at(loss, samples), state, params)
    return optax.apply_updates(params, updates), state
  return step


@pytest.mark.parametrize("covariance", ["diagonal", "kron"])
def test_jit_scan_equals_python_loop(covariance):
  params = _params()
  loss = _quad_loss(_target(params))
  tx = foovb(covariance=covariance, num_samples=K, init_std=0.05)
  step = _step_fn(tx, loss)
  p, s = params, tx.init(params)
  for _ in range(4):
    p, s = step(p, s)

  @jax.jit
  def run(params, state):
    def body(carry, _):
      return step(*carry), None
    return jax.lax.scan(body, (params, state), None, length=4)[0]

  p2, s2 = run(params, tx.init(params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               (p, s.std, s.kron), (p2, s2.std, s2.kron))
  assert int(s2.count) == 4


def test_vmap_over_seeds_equals_separate_runs():
  params = _params()
  loss = _quad_loss(_target(params))
  tx = foovb(num_samples=K, init_std=0.05)
  step = jax.jit(_step_fn(tx, loss))
  keys = jnp.stack([jax.random.PRNGKey(i) for i in range(3)])
  state0 = tx.init(params)
  states = jax.vmap(lambda k: state0._replace(key=k))(keys)
  batched = jax.jit(jax.vmap(step, in_axes=(None, 0)))(params, states)
  for i in range(3):
    p, s = step(params, state0._replace(key=keys[i]))
    np.testing.assert_allclose(batched[0]["dense"]["kernel"][i], p["dense"]["kernel"],
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(batched[1].std["norm"]["scale"][i], s.std["norm"]["scale"],
                               rtol=1e-5)


@pytest.mark.parametrize("covariance", ["kron", "full"])
def test_batched_linear_algebra_draws_the_same_samples(covariance):
  # The new factor is canonical (fixed_point_factor), so 30 steps run
  # batched (vmap: batched LAPACK) and one at a time give the same factors
  # and draw the same samples. With the paper's root they drifted apart by
  # a rotation (9e-2 after 30 steps).
  params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(6, 5)),
                             jnp.float32)}
  loss = _quad_loss(_target(params))
  tx = foovb(covariance=covariance, num_samples=K, init_std=0.3,
             kron_init="std", key=1)
  step = jax.jit(_step_fn(tx, loss))
  state = tx.init(params)
  p1, s1 = params, state
  pb, sb = jax.tree.map(lambda x: jnp.stack([x, x]), (params, state))
  vstep = jax.jit(jax.vmap(step))
  for _ in range(30):
    p1, s1 = step(p1, s1)
    pb, sb = vstep(pb, sb)
  for leaf1, leafb in zip(jax.tree.leaves((s1.kron, s1.scale)),
                          jax.tree.leaves((sb.kron, sb.scale))):
    np.testing.assert_allclose(leafb[0], leaf1, rtol=1e-4, atol=1e-6)
  draw = lambda s: foovb_sample(s, K)["w"]
  np.testing.assert_allclose(jax.vmap(draw)(sb)[1], draw(s1), rtol=1e-4,
                             atol=1e-5)


# --------------------------------------------------------------------------
# Composition with a later transform that changes the updates.


def _zero_entries(keep):
  """Stand-in projection: after apply_updates, entries with keep=False are 0."""
  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    return jax.tree.map(lambda u, p, k: jnp.where(k, u, -p), updates, params,
                        keep), state
  return optax.GradientTransformation(init_fn, update_fn)


def _keep(params):
  rng = np.random.default_rng(11)
  return jax.tree.map(lambda p: jnp.asarray(rng.uniform(size=p.shape) < 0.5), params)


def test_projection_after_foovb_dense_shadow_mean():
  params = _params()
  keep = _keep(params)
  loss = _quad_loss(_target(params))
  plain = foovb(num_samples=K, init_std=0.05, key=2)
  tx = optax.chain(foovb(num_samples=K, init_std=0.05, key=2), _zero_entries(keep))
  sp, s = plain.init(params), tx.init(params)
  pp, p = params, params
  for _ in range(3):
    grads = _grads_at(loss, foovb_sample(s, K))
    u, s = tx.update(grads, s, p)
    p = optax.apply_updates(p, u)
    up, sp = plain.update(_grads_at(loss, foovb_sample(sp, K)), sp, pp)
    pp = optax.apply_updates(pp, up)
    st = find_foovb_state(s)
    # FOO-VB runs unprojected in the state; the params are its projection.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 st.mean, sp.mean)
    jax.tree.map(lambda a, m, k: np.testing.assert_allclose(
        a, jnp.where(k, m, 0.0), rtol=1e-5, atol=1e-6), p, st.mean, keep)


def test_projection_with_set_mean_projects_the_posterior_mean():
  params = _params()
  keep = _keep(params)
  loss = _quad_loss(_target(params))
  eta = 0.8
  tx = optax.chain(foovb(num_samples=K, init_std=0.05, eta=eta),
                   _zero_entries(keep))
  p = jax.tree.map(lambda x, k: jnp.where(k, x, 0.0), params, keep)
  s = foovb_set_mean(tx.init(p), p)
  for _ in range(3):
    st = find_foovb_state(s)
    samples = foovb_sample(s, K)
    # Samples are the projected params plus noise that does not depend on the
    # mean (compare with the same state centred on zero).
    noise = foovb_sample(foovb_set_mean(s, jax.tree.map(jnp.zeros_like, p)), K)
    jax.tree.map(lambda smp, n, m: np.testing.assert_allclose(
        smp - m, n, rtol=1e-5, atol=1e-7), samples, noise, p)
    grads = _grads_at(loss, samples)
    u, s = tx.update(grads, s, p)
    p_new = optax.apply_updates(p, u)
    # The FOO-VB step starts from the projected mean, then is projected.
    want = jax.tree.map(lambda m, sd, g, k: jnp.where(
        k, m - eta * sd ** 2 * g.mean(0), 0.0), p, st.std, grads, keep)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 p_new, want)
    s = foovb_set_mean(s, p_new)
    p = p_new
    jax.tree.map(np.testing.assert_array_equal, find_foovb_state(s).mean, p)
    jax.tree.map(lambda a, k: np.testing.assert_array_equal(a[~np.asarray(k)], 0.0),
                 p, keep)


# --------------------------------------------------------------------------
# Clear errors.


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), float("inf"), "x"])
def test_bad_init_std(bad):
  with pytest.raises(ValueError, match="init_std"):
    foovb(init_std=bad)


@pytest.mark.parametrize("kwargs, match", [
    (dict(covariance="lowrank"), "covariance"),
    (dict(num_samples=0), "num_samples"),
    (dict(eta=-1.0), "eta"),
    (dict(loss="avg"), "loss"),
    (dict(damping=0.0), "damping"),
    (dict(damping=1.5), "damping"),
    (dict(forgetting=1.5), "forgetting"),
    (dict(fixed_point_iterations=0), "fixed_point_iterations"),
    (dict(alpha=1.0), "alpha"),
    (dict(kron_init="xavier"), "kron_init"),
    (dict(key=jnp.ones(2)), "key"),
])
def test_bad_options(kwargs, match):
  with pytest.raises(ValueError, match=match):
    foovb(**kwargs)


def test_grads_without_sample_axis_names_path():
  params = _params()
  tx = foovb(num_samples=K)
  state = tx.init(params)
  grads = jax.grad(_quad_loss(_target(params)))(params)
  with pytest.raises(ValueError, match=r"\['dense'\]\['bias'\].*sample axis"):
    tx.update(grads, state, params)
  with pytest.raises(ValueError, match=r"sample axis"):
    jax.jit(tx.update)(grads, state, params)


def test_grads_with_wrong_num_samples():
  params = _params()
  tx = foovb(num_samples=K)
  state = tx.init(params)
  grads = _grads_at(_quad_loss(_target(params)), foovb_sample(state, K + 1))
  with pytest.raises(ValueError, match=rf"num_samples={K}"):
    tx.update(grads, state, params)


def test_grads_with_wrong_structure():
  params = _params()
  tx = foovb(num_samples=K)
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"do not match the params.*\[.dense.\]"):
    tx.update({"dense": jnp.zeros((K, 3))}, state, params)


def test_kron_on_unsupported_leaf_names_path():
  params = _params()
  flt = {"dense": {"kernel": True, "bias": False}, "norm": {"scale": True}}
  with pytest.raises(ValueError, match=r"\['norm'\]\['scale'\].*\(3,\)"):
    foovb(covariance="kron", kron_filter=flt).init(params)
  with pytest.raises(ValueError, match="kron_filter"):
    foovb(covariance="kron", kron_filter={"dense": True}).init(params)


def test_mean_loss_needs_batch_size():
  params = _params()
  tx = foovb(num_samples=K, loss="mean")
  state = tx.init(params)
  grads = _grads_at(_quad_loss(_target(params)), foovb_sample(state, K))
  with pytest.raises(ValueError, match="batch_size"):
    tx.update(grads, state, params)
  tx.update(grads, state, params, batch_size=4)  # given at update time: fine


def test_sample_needs_foovb_state_and_int_k():
  params = _params()
  with pytest.raises(ValueError, match="FooVBState"):
    foovb_sample(optax.adam(1e-3).init(params), K)
  with pytest.raises(ValueError, match="num_samples"):
    foovb_sample(foovb().init(params), 0)


def test_full_too_large_and_integer_leaves():
  with pytest.raises(ValueError, match="full"):
    foovb(covariance="full").init({"w": jnp.zeros((200, 100))})
  with pytest.raises(ValueError, match=r"\['step'\].*float"):
    foovb().init({"w": jnp.zeros(3), "step": jnp.zeros((), jnp.int32)})


def test_set_mean_checks_shapes():
  params = _params()
  state = foovb().init(params)
  bad = jax.tree.map(lambda p: jnp.zeros(p.shape + (1,)), params)
  with pytest.raises(ValueError, match=r"\['dense'\]\['bias'\]"):
    foovb_set_mean(state, bad)


def test_kron_factors_are_state_leaves():
  params = _params()
  state = foovb(covariance="kron", kron_init="std", init_std=0.04).init(params)
  fac = state.kron["['dense']['kernel']"]
  assert isinstance(fac, KronFactors)
  assert fac.a.shape == (5, 5) and fac.b.shape == (3, 3)  # 4 inputs + bias row
  np.testing.assert_allclose(fac.a, np.sqrt(0.04) * np.eye(5), rtol=1e-6)
  # Nothing static leaks into the leaves: the state is a clean pytree of arrays.
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))


@pytest.mark.parametrize("covariance", ["kron", "full"])
def test_state_round_trips_through_orbax(covariance, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  params = _params()
  tx = optax.chain(foovb(covariance=covariance, num_samples=K,
                         fixed_point_iterations=2), optax.identity())
  state = tx.init(params)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "ckpt", state)
  ckpt.wait_until_finished()
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = ckpt.restore(tmp_path / "ckpt", target=target)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, foovb_sample(restored, K),
               foovb_sample(state, K))


@pytest.mark.parametrize("covariance", ["diagonal", "kron", "full"])
def test_centered_covariance_update_ignores_the_gradient_offset(covariance):
  # Quadratic loss 0.5 * sum h (p - c)^2: g_k = h (theta_k - c). Moving the target
  # c changes every g_k by the same vector, so the centred covariance statistic,
  # (g_k - gbar), and hence the new covariance, do not change; the papers'
  # estimator mean_k g_k eps_k picks up gbar * epsbar and does change.
  params = _params()
  def new_cov(c, centered):
    tx = foovb(covariance=covariance, num_samples=K, init_std=0.1, key=3,
               centered=centered, kron_init="std")
    state = tx.init(params)
    loss = lambda p: sum(jnp.sum(0.5 * 3.0 * (x - c) ** 2)
                         for x in jax.tree.leaves(p))
    grads = jax.vmap(jax.grad(loss))(foovb_sample(state, K))
    _, new = tx.update(grads, state, params)
    # Covariances (the factors are unique only up to a rotation).
    factors = [f for f in jax.tree.leaves((new.kron, new.scale)) if f.ndim == 2]
    return ([np.asarray(x) for x in jax.tree.leaves(new.std)]
            + [np.asarray(f @ f.T) for f in factors])
  for a, b in zip(new_cov(0.0, True), new_cov(5.0, True)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-5)
  assert any(not np.allclose(a, b, rtol=1e-2, atol=1e-3)
             for a, b in zip(new_cov(0.0, False), new_cov(5.0, False)))


def test_centered_needs_two_samples():
  with pytest.raises(ValueError, match="num_samples >= 2"):
    foovb(covariance="full", num_samples=1)
  foovb(covariance="full", num_samples=1, centered=False)  # the papers' estimator


def test_kron_transform_pins_scipys_blas_to_one_thread():
  # jaxlib's CPU LAPACK runs on scipy's bundled OpenBLAS; its worker threads
  # would fight XLA's, so building a kron/full transform pins it to one
  # thread -- unless the user chose OPENBLAS_NUM_THREADS themselves. Run in
  # fresh interpreters: changing OpenBLAS's threads inside this (test)
  # process, whose OpenBLAS started with one thread, is not safe.
  pytest.importorskip("threadpoolctl")
  import subprocess
  import sys
  script = """
import os, sys
import scipy.linalg.cython_lapack
from threadpoolctl import threadpool_info
from sparse_jax._core import lapack
libs = lapack._scipy_blas(threadpool_info())
if not libs:
  print("NOLIBS"); sys.exit(0)
threads = lambda: sorted({l["num_threads"] for l in threadpool_info() if l["filepath"] in libs})
before = threads()
import sparse_jax as sj
sj.foovb(covariance="diagonal")
mid = threads()
sj.foovb(covariance="kron")
print(before, mid, threads())
"""
  env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
  env["JAX_PLATFORMS"] = "cpu"
  def run(extra):
    out = subprocess.run([sys.executable, "-c", script], env={**env, **extra},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]
  free = run({})
  if free == "NOLIBS":
    pytest.skip("scipy uses a system BLAS here")
  before, mid, after = free.split("] [")
  assert mid.strip("[]") == before.strip("[]")     # diagonal: no LAPACK
  assert after.strip("[]") == "1"                  # kron: one thread
  assert run({"OPENBLAS_NUM_THREADS": "2"}) == "[2] [2] [2]"   # user wins
