"""Tests for nm_ste (straight-through forward masking) and sr_ste."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_jax.masks import nm_mask, transposable_nm_mask
from sparse_jax.sparsity import (SRSTEState, axis_by_path, nm_ste, sr_ste,
                                 sparsity_diagnostics)


def make_params(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 8, 8)),
                                     jnp.float32),
               "bias": jnp.asarray(rng.normal(size=8), jnp.float32)},
      "dense": {"kernel": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
                "bias": jnp.zeros(4)},
  }


def quadratic_loss(p, target):
  return sum(jnp.sum((a - b) ** 2 * (1 + jnp.arange(a.size).reshape(a.shape)))
             for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target)))


def test_forward_is_masked_and_gradient_goes_straight_through():
  params = make_params()
  target = jax.tree.map(lambda x: 0.5 * jnp.ones_like(x), params)
  ste_loss = jax.jit(lambda p: quadratic_loss(nm_ste(p, 2, 4), target))
  sparse = nm_ste(params, 2, 4)
  for name in ("conv", "dense"):
    w = params[name]["kernel"]
    expect = jnp.where(nm_mask(w, 2, 4), w, 0)
    np.testing.assert_array_equal(np.asarray(sparse[name]["kernel"]),
                                  np.asarray(expect))
  np.testing.assert_array_equal(np.asarray(sparse["conv"]["bias"]),
                                np.asarray(params["conv"]["bias"]))
  # the STE gradient is the gradient of the loss AT the sparse weights,
  # applied to every (also pruned) dense weight.
  g_ste = jax.grad(ste_loss)(params)
  g_at_sparse = jax.grad(lambda p: quadratic_loss(p, target))(sparse)
  for a, b in zip(jax.tree.leaves(g_ste), jax.tree.leaves(g_at_sparse)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
  assert np.all(np.asarray(g_ste["dense"]["kernel"]) != 0)


def test_transposable_ste_and_explicit_axis():
  params = make_params(1)
  sparse = jax.jit(lambda p: nm_ste(p, 2, 4, transposable=True))(params)
  for name in ("conv", "dense"):
    w = params[name]["kernel"]
    mask = transposable_nm_mask(w, 2, 4)
    np.testing.assert_array_equal(np.asarray(sparse[name]["kernel"] != 0),
                                  np.asarray(mask))
  att = {"query": {"kernel": jnp.asarray(
      np.random.default_rng(2).normal(size=(8, 2, 4)), jnp.float32)}}
  with pytest.raises(ValueError, match="ambiguous"):
    nm_ste(att, 2, 4)
  out = nm_ste(att, 2, 4, axis=axis_by_path({"query": 0}))
  np.testing.assert_array_equal(
      np.asarray(out["query"]["kernel"] != 0),
      np.asarray(nm_mask(att["query"]["kernel"], 2, 4, axis=0)))


def test_sr_ste_adds_decay_on_pruned_weights_only():
  params = make_params(3)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.25), params)
  decay, lr = 0.1, 0.5
  tx = optax.chain(sr_ste(2, 4, decay=decay), optax.sgd(lr))
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  for name in ("conv", "dense"):
    w = params[name]["kernel"]
    pruned = ~nm_mask(w, 2, 4)
    expect = -lr * (0.25 + decay * jnp.where(pruned, w, 0))
    np.testing.assert_allclose(np.asarray(updates[name]["kernel"]),
                               np.asarray(expect), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(updates[name]["bias"]),
                               -lr * 0.25 * np.ones(params[name]["bias"].shape),
                               rtol=1e-6)
  sr_state = state[0]
  assert isinstance(sr_state, SRSTEState)
  diag = sparsity_diagnostics(params, state)
  assert float(diag["all"]["mask_sparsity"]) == 0.5
  assert float(diag["all"]["sparsity"]) == 0.0  # STE params stay dense
  assert float(diag["['dense']['kernel']"]["flip_rate"]) == 0.0


def test_sr_ste_training_drives_pruned_weights_down():
  """With zero task gradient, SR-STE decays exactly the pruned weights."""
  params = {"kernel": jnp.asarray(np.random.default_rng(4).normal(size=(16, 4)),
                                  jnp.float32)}
  mask = np.asarray(nm_mask(params["kernel"], 2, 4))
  tx = optax.chain(sr_ste(2, 4, decay=0.2), optax.sgd(1.0))
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.tree.map(jnp.zeros_like, p), s, p))
  w0 = np.asarray(params["kernel"])
  for _ in range(5):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  w = np.asarray(params["kernel"])
  np.testing.assert_allclose(w[mask], w0[mask])
  np.testing.assert_allclose(w[~mask], w0[~mask] * 0.8 ** 5, rtol=1e-5)


def test_bad_arguments():
  with pytest.raises(ValueError, match="decay must be >= 0"):
    sr_ste(2, 4, decay=-1.0)
  with pytest.raises(ValueError, match="1 <= n <= m"):
    sr_ste(5, 4)
  with pytest.raises(ValueError, match="needs the params"):
    tx = sr_ste(2, 4)
    p = make_params()
    tx.update(p, tx.init(p))
  with pytest.raises(ValueError, match=r"\['w'\].*\(6, 4\)"):
    nm_ste({"w": jnp.ones((6, 4))}, 2, 4, mask={"w": True})


def test_traced_n_and_schedules():
  from sparse_jax.sparsity import nm_schedule
  params = {"kernel": jnp.asarray(np.random.default_rng(5).normal(size=(16, 2)),
                                  jnp.float32)}
  f = jax.jit(lambda p, n: nm_ste(p, n, 8)["kernel"])
  for n in (1, 5):
    np.testing.assert_array_equal(np.asarray(f(params, n) != 0),
                                  np.asarray(nm_mask(params["kernel"], n, 8)))
  with pytest.raises(ValueError, match="not the schedule itself"):
    nm_ste(params, nm_schedule(2, 8, start_step=0, end_step=4), 8)
  with pytest.raises(ValueError, match="transposable masks need n"):
    jax.jit(lambda p, n: nm_ste(p, n, 4, transposable=True))(
        {"kernel": jnp.ones((4, 4))}, 2)
  sched = nm_schedule(2, 8, start_step=0, end_step=3, power=1.0)
  tx = sr_ste(sched, 8, decay=1.0)
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for step in range(4):
    updates, state = jax.jit(tx.update)(zeros, state, params)
    pruned = np.asarray(updates["kernel"]) != 0
    assert np.all(pruned.reshape(2, 8, 2).sum(1) == 8 - int(sched(step)))


# ------------------------------------------------------------------ S-STE --

import hypothesis  # noqa: E402
import hypothesis.extra.numpy as hnp  # noqa: E402
import hypothesis.strategies as st  # noqa: E402

from sparse_jax.sparsity import s_ste, s_ste_scales  # noqa: E402


def _soft_reference(w, n, m):
  """Brute force along axis 0: t = the (n+1)-th largest |w| of each group."""
  w = np.asarray(w, np.float64)
  out = np.zeros_like(w)
  for g in range(w.shape[0] // m):
    for j in range(w.shape[1]):
      col = w[g * m:(g + 1) * m, j]
      order = sorted(range(m), key=lambda i: (-abs(col[i]), i))
      t = abs(col[order[n]]) if n < m else 0.0
      for i in order[:n]:
        out[g * m + i, j] = np.sign(col[i]) * max(abs(col[i]) - t, 0.0)
  return out


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (8, 16), (4, 4)])
def test_s_ste_equals_soft_thresholding_and_is_nm_sparse(n, m):
  w = jnp.asarray(np.random.default_rng(n * m).normal(size=(2 * m, 3)),
                  jnp.float32)
  out = np.asarray(s_ste({"kernel": w}, n, m)["kernel"])
  np.testing.assert_allclose(out, _soft_reference(w, n, m), atol=1e-6)
  nonzero = (out.reshape(2, m, 3) != 0).sum(axis=1)
  assert nonzero.max() <= n
  grad = jax.grad(lambda p: jnp.sum(s_ste(p, n, m)["kernel"] * 3.0))(
      {"kernel": w})["kernel"]
  np.testing.assert_array_equal(np.asarray(grad), 3.0)  # straight through


@hypothesis.settings(deadline=None, max_examples=30)
@hypothesis.given(
    hnp.arrays(np.float32, (8, 2), elements=st.floats(-4, 4, width=32)),
    hnp.arrays(np.float32, (8, 2), elements=st.floats(-0.125, 0.125, width=32)))
def test_s_ste_is_continuous(w, dw):
  """2-Lipschitz in the max norm: no jump when two magnitudes swap (STE's
  hard threshold jumps by the whole weight there)."""
  a = np.asarray(s_ste({"k": jnp.asarray(w)}, 2, 4, mask={"k": True})["k"])
  b = np.asarray(s_ste({"k": jnp.asarray(w + dw)}, 2, 4, mask={"k": True})["k"])
  assert np.abs(a - b).max() <= 2 * np.abs(dw).max() + 1e-5


def test_s_ste_scales_minimise_the_error_and_apply():
  params = make_params(3)
  scales = s_ste_scales(params, 2, 4)
  assert set(scales) == {"['conv']['kernel']", "['dense']['kernel']"}
  for key, path in [("conv", "['conv']['kernel']"),
                    ("dense", "['dense']['kernel']")]:
    w = np.asarray(params[key]["kernel"], np.float64)
    soft = np.asarray(s_ste(params, 2, 4)[key]["kernel"], np.float64)
    beta = float(scales[path])
    best = np.vdot(w, soft) / np.vdot(soft, soft)       # least squares
    assert beta == pytest.approx(best, rel=1e-5) and beta > 1
    err = lambda b: np.sum((w - b * soft) ** 2)  # noqa: E731
    assert err(beta) <= min(err(beta * 0.99), err(beta * 1.01))
    scaled = np.asarray(s_ste(params, 2, 4, scales=scales)[key]["kernel"])
    np.testing.assert_allclose(scaled, beta * soft, rtol=1e-5, atol=1e-6)
  # biases untouched (default filter)
  np.testing.assert_array_equal(s_ste(params, 2, 4)["conv"]["bias"],
                                params["conv"]["bias"])


def test_s_ste_bad_arguments():
  params = make_params()
  with pytest.raises(ValueError, match="no entry for the pruned leaf"):
    s_ste(params, 2, 4, scales={"['dense']['kernel']": 1.0})
  with pytest.raises(ValueError, match="scales must be the dict"):
    s_ste(params, 2, 4, scales=2.0)
  with pytest.raises(ValueError, match="not a schedule"):
    s_ste(params, lambda c: 2, 4)
  with pytest.raises(ValueError, match="m"):
    s_ste(params, 2, True)


def test_end_step_stops_decay_and_projection():
  params = {"kernel": jnp.array([[1.], [-3.], [2.], [0.5]])}
  grads = {"kernel": jnp.zeros((4, 1))}
  tx = sr_ste(2, 4, decay=0.1, end_step=2)
  state = tx.init(params)
  out = []
  for _ in range(3):
    u, state = tx.update(grads, state, params)
    out.append(np.asarray(u["kernel"]).ravel().tolist())
  assert out[0] == out[1] == pytest.approx([0.1, 0, 0, 0.05])
  assert out[2] == [0, 0, 0, 0]
  from sparse_jax.sparsity import nm_projection
  tx = nm_projection(2, 4, end_step=1)
  state = tx.init(params)
  u, state = tx.update(grads, state, params)
  assert np.asarray(u["kernel"]).ravel().tolist() == [-1, 0, 0, -0.5]
  u, state = tx.update(grads, state, params)
  assert np.asarray(u["kernel"]).ravel().tolist() == [0, 0, 0, 0]
  with pytest.raises(ValueError, match="end_step=3 must be after start_step=5"):
    sr_ste(2, 4, start_step=5, end_step=3)
