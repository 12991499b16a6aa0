"""error_feedback: the update rules, the invariants and the failure modes."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparse_jax.compression as C


def np_top_k(p, k):
  flat = p.ravel()
  keep = np.argsort(-np.abs(flat), kind="stable")[:k]
  out = np.zeros_like(flat)
  out[keep] = flat[keep]
  return out.reshape(p.shape)


def simulate(tx, x0, grad_fn, num_workers, steps):
  """n workers in one process: vmap over per-worker states, mean of updates.

  Without ``axis_name`` every worker's update is its own compressed tensor
  (EF21: its own estimate h_i), so the mean over workers is the data-parallel
  update.
  """
  states = jax.vmap(lambda _: tx.init(x0))(jnp.arange(num_workers))

  def step(carry, t):
    x, states = carry
    grads = jax.vmap(grad_fn, in_axes=(None, 0))(x, jnp.arange(num_workers))
    upd, states = jax.vmap(lambda g, s: tx.update(g, s, x))(grads, states)
    x = jax.tree.map(lambda a, u: a + u.mean(0), x, upd)
    return (x, states), grads

  (x, states), grads = jax.lax.scan(step, (x0, states), jnp.arange(steps))
  return x, states, grads


# ---------------------------------------------------------- update rules --


def test_ef_matches_the_ef14_recursion():
  rng = np.random.default_rng(0)
  lr, k = 0.1, 3
  tx = C.error_feedback(C.top_k(k / 12), learning_rate=lr)
  params = {"w": jnp.zeros((3, 4))}
  state = tx.init(params)
  e = np.zeros((3, 4), np.float32)
  update = jax.jit(tx.update)
  for _ in range(5):
    g = rng.normal(size=(3, 4)).astype(np.float32)
    updates, state = update({"w": jnp.asarray(g)}, state, params)
    p = e + lr * g
    c = np_top_k(p, k)
    e = p - c
    np.testing.assert_allclose(updates["w"], -c, rtol=1e-6)
    np.testing.assert_allclose(state.local.memory["w"], e, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(state.local.error_ratio,
                               np.linalg.norm(e) / np.linalg.norm(lr * g),
                               rtol=1e-5)
  assert int(state.count) == 5


@pytest.mark.parametrize("variant", ["ef", "ef21", "econtrol"])
def test_error_ratio_is_right_at_any_gradient_scale(variant):
  """||unsent|| / ||lr g|| does not depend on the gradients' scale, also
  where squares overflow (1e25) or underflow (1e-25) in float32; the clip
  norm sees the same global norm."""
  rng = np.random.default_rng(3)
  g = rng.normal(size=(6, 8)).astype(np.float32)
  g_lead = rng.normal(size=(5,)).astype(np.float32)   # not compressed
  ratios, scales = [], []
  for scale in (1e-25, 1.0, 1e25):
    for clip in (None, 0.5 * scale):
      tx = C.error_feedback(C.top_k(0.25), variant=variant, clip_norm=clip,
                            mask={"a": False, "w": True})
      params = {"a": jnp.zeros(5), "w": jnp.zeros((6, 8))}
      updates, state = jax.jit(tx.update)(
          {"a": jnp.asarray(g_lead * scale), "w": jnp.asarray(g * scale)},
          tx.init(params), params)
      ratios.append(float(state.local.error_ratio))
      if clip is not None:   # clipped to the global norm of both leaves
        total = np.sqrt(np.sum(g.astype(np.float64) ** 2)
                        + np.sum(g_lead.astype(np.float64) ** 2))
        sent = np.linalg.norm(np.asarray(updates["a"], np.float64))
        scales.append(sent / (np.linalg.norm(g_lead) * scale) * total / 0.5)
  np.testing.assert_allclose(ratios, ratios[2], rtol=1e-5)
  assert 0.0 < ratios[0] < 1.0
  np.testing.assert_allclose(scales, 1.0, rtol=1e-5)


def test_numerics_helpers_against_float64():
  from sparse_jax._core import numerics
  rng = np.random.default_rng(4)
  x = rng.normal(size=(50,)).astype(np.float32)
  for scale in (1e-30, 1e-20, 1.0, 1e20, 1e30):
    xs = (x * scale).astype(np.float32)
    want = np.max(np.abs(xs.astype(np.float64)))
    got = numerics.max_abs([jnp.asarray(xs), jnp.zeros((0,))])
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    norm = numerics.scaled_sq_norm(jnp.asarray(xs), jnp.float32(1 / want))
    np.testing.assert_allclose(
        float(norm), np.sum((xs.astype(np.float64) / want) ** 2), rtol=1e-5)
  for bad in (np.nan, np.inf, -np.inf):
    y = x.copy()
    y[7] = bad
    assert np.isnan(float(numerics.max_abs([jnp.asarray(x), jnp.asarray(y)])))
    assert not bool(numerics.all_finite([jnp.asarray(y)]))
  assert bool(numerics.all_finite([jnp.asarray(x), jnp.zeros((0,))]))
  assert float(numerics.max_abs([-jnp.asarray(np.abs(x))])) == np.max(np.abs(x))


def test_learning_rate_inside_equals_outside_for_constant_lr():
  """error_feedback(lr) == chain(error_feedback(), sgd(lr)); e scales by lr."""
  rng = np.random.default_rng(1)
  lr = 0.05
  inside = C.error_feedback(C.top_k(0.25), learning_rate=lr)
  outside = optax.chain(C.error_feedback(C.top_k(0.25)), optax.sgd(lr))
  x_in = x_out = {"w": jnp.ones((16,))}
  s_in, s_out = inside.init(x_in), outside.init(x_out)
  for _ in range(10):
    g = {"w": jnp.asarray(rng.normal(size=16), jnp.float32)}
    u_in, s_in = inside.update(g, s_in, x_in)
    u_out, s_out = outside.update(g, s_out, x_out)
    x_in = optax.apply_updates(x_in, u_in)
    x_out = optax.apply_updates(x_out, u_out)
  np.testing.assert_allclose(x_in["w"], x_out["w"], rtol=1e-5)
  np.testing.assert_allclose(s_in.local.memory["w"],
                             lr * s_out[0].local.memory["w"], rtol=1e-4,
                             atol=1e-7)


def test_schedule_multiplies_the_gradient_before_the_memory():
  schedule = lambda count: 1.0 / (1.0 + count)
  tx = C.error_feedback(C.top_k(0.5), learning_rate=schedule)
  params = {"w": jnp.zeros((4,))}
  state = tx.init(params)
  g1 = jnp.array([4.0, 1.0, 2.0, 0.5])   # lr 1: send 4, 2; keep 1, 0.5
  g2 = jnp.array([0.0, 2.0, 0.0, 0.5])   # lr 1/2: p = [0, 2, 0, .75]
  _, state = tx.update({"w": g1}, state, params)
  upd, state = tx.update({"w": g2}, state, params)
  np.testing.assert_allclose(upd["w"], [-0.0, -2.0, -0.0, -0.75])
  np.testing.assert_allclose(state.local.memory["w"], [0, 0, 0, 0])


def test_ef21_recursion():
  rng = np.random.default_rng(2)
  tx = C.error_feedback(C.top_k(0.25), variant="ef21", learning_rate=0.1)
  params = {"w": jnp.zeros((8,))}
  state = tx.init(params)
  h = np.zeros(8, np.float32)
  for _ in range(4):
    g = rng.normal(size=8).astype(np.float32)
    upd, state = tx.update({"w": jnp.asarray(g)}, state, params)
    h = h + np_top_k(0.1 * g - h, 2)
    np.testing.assert_allclose(state.local.memory["w"], h, rtol=1e-6)
    np.testing.assert_allclose(state.server["w"], h, rtol=1e-6)  # 1 worker
    np.testing.assert_allclose(upd["w"], -h, rtol=1e-6)


def test_dgc_momentum_correction_masking_and_clipping():
  rng = np.random.default_rng(3)
  mom, clip, lr = 0.9, 1.0, 0.5
  tx = C.error_feedback(C.top_k(0.25), variant="dgc", momentum=mom,
                        clip_norm=clip, learning_rate=lr)
  params = {"w": jnp.zeros((8,))}
  state = tx.init(params)
  u = np.zeros(8, np.float32)
  v = np.zeros(8, np.float32)
  for _ in range(5):
    g = 3 * rng.normal(size=8).astype(np.float32)
    upd, state = tx.update({"w": jnp.asarray(g)}, state, params)
    g = g * min(1.0, clip / np.linalg.norm(g))        # local clipping
    u = mom * u + lr * g                               # momentum correction
    v = v + u
    c = np_top_k(v, 2)
    v = v - c
    u = np.where(c != 0, 0.0, u)                       # momentum factor masking
    np.testing.assert_allclose(upd["w"], -c, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(state.local.memory["w"], v, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(state.local.momentum["w"], u, rtol=1e-5,
                               atol=1e-6)


def test_mask_leaves_other_leaves_dense():
  tx = C.error_feedback(C.top_k(0.1), learning_rate=0.1,
                        mask=lambda p: {"w": True, "b": False})
  params = {"w": jnp.zeros((50,)), "b": jnp.zeros((3,))}
  state = tx.init(params)
  assert isinstance(state.local.memory["b"], optax.MaskedNode)
  g = {"w": jnp.arange(50.0), "b": jnp.array([1.0, -2.0, 3.0])}
  upd, state = tx.update(g, state, params)
  np.testing.assert_allclose(upd["b"], [-0.1, 0.2, -0.3], rtol=1e-6)
  assert int(jnp.sum(upd["w"] != 0)) == 5


def test_sparsity_warmup_switches_compressors_and_bytes():
  levels = [C.top_k(0.5), C.top_k(0.25)]
  tx = C.error_feedback(C.top_k(0.05), warmup_compressors=levels,
                        warmup_steps=2)
  params = {"w": jnp.zeros((40,))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  counts, sent = [], []
  for t in range(6):
    g = {"w": jnp.arange(1.0, 41.0) * (-1.0) ** t}
    upd, state = update(g, state, params)
    counts.append(int(jnp.sum(upd["w"] != 0)))
    sent.append(float(state.wire.sent))
  assert counts == [20, 20, 10, 10, 2, 2]
  assert sent == [0.0] * 6     # one worker sends nothing over the wire


def test_wire_bytes_in_state_match_the_formula_for_n_workers():
  # Checked with real collectives in test_distributed.py; here the formula.
  w = C.exchange_bytes(C.top_k(0.01), {"a": jnp.zeros((100, 100)),
                                       "b": jnp.zeros((10,))},
                       num_workers=8, mask={"a": True, "b": False})
  assert w.sent == w.received == 7 * 100 * 8 + 2 * 7 / 8 * 40
  assert w.dense == 2 * 7 / 8 * 4 * 10_010


def test_ef_on_a_large_kernel_with_donated_state():
  """The fast top-k path (>= 2**15 entries), state and params donated.

  The residual is then updated in place in the donated memory; the result,
  the memory and the error ratio must be those of the EF14 recursion, and a
  second state of the same transform must not share a donated buffer.
  """
  rng = np.random.default_rng(7)
  lr, shape = 0.05, (256, 200)
  k = C.kept_count(0.001, 256 * 200)
  tx = C.error_feedback(C.top_k(0.001), learning_rate=lr)
  params = {"w": jnp.asarray(rng.normal(size=shape), jnp.float32)}
  other = tx.init(params)                        # never donated
  state = tx.init(params)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, g):
    upd, state = tx.update(g, state, params)
    return optax.apply_updates(params, upd), state

  w = np.asarray(params["w"]).copy()
  e = np.zeros(shape, np.float32)
  for _ in range(3):
    g = rng.normal(size=shape).astype(np.float32)
    params, state = step(params, state, {"w": jnp.asarray(g)})
    p = e + lr * g
    c = np_top_k(p, k)
    e, w = p - c, w - c
    np.testing.assert_allclose(state.local.memory["w"], e, rtol=1e-6,
                               atol=1e-7)
    np.testing.assert_allclose(params["w"], w, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(state.local.error_ratio,
                               np.linalg.norm(e) / np.linalg.norm(lr * g),
                               rtol=1e-4)
  # The other state is intact (its key buffer was not donated with state's).
  upd, _ = tx.update({"w": jnp.ones(shape)}, other, params)
  assert int(jnp.sum(upd["w"] != 0)) == k


# -------------------------------------------------------------- the math --


@pytest.mark.parametrize("variant", ["ef", "econtrol"])
def test_conservation_invariant_float64(variant):
  """n (x0 - xT) + sum_i e_i = lr sum_t sum_i g_i,t for EF with plain SGD.

  EControl: e_i + h_i grows by exactly lr g_i each step and the step is
  mean_i h_i, so the same identity holds with its error e_i.
  """
  n, d, steps, lr = 4, 20, 25, 0.05
  with jax.enable_x64(True):
    rng = np.random.default_rng(4)
    a = jnp.asarray(rng.normal(size=(n, d, d)) / math.sqrt(d))
    b = jnp.asarray(rng.normal(size=(n, d)))
    grad_fn = lambda x, i: jax.grad(
        lambda x: 0.5 * jnp.sum((a[i] @ x["w"] - b[i]) ** 2))(x)
    x0 = {"w": jnp.asarray(rng.normal(size=d))}
    tx = C.error_feedback(C.top_k(0.1), learning_rate=lr, variant=variant)
    x, states, grads = jax.jit(simulate, static_argnums=(0, 2, 3, 4))(
        tx, x0, grad_fn, n, steps)
    assert x["w"].dtype == jnp.float64
    lhs = n * (x0["w"] - x["w"]) + states.local.memory["w"].sum(0)
    rhs = lr * grads["w"].sum((0, 1))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-12, atol=1e-12)
    assert float(jnp.linalg.norm(states.local.memory["w"])) > 1e-3


# Three quadratics f_i(x) = x^T H_i x / 2 with a common minimiser x* = 0 and
# f = mean f_i strongly convex. From x0 = (1, 1.35, 1.35) every worker's
# largest gradient entry is its first one, and those cancel once x_0 = 0:
# top-1 without memory converges to (0, 1.35, 1.35), at 1.35 * sqrt(2) = 1.909
# from the optimum, forever; with error feedback (or EF21) the unsent
# coordinates accumulate until they are sent, and it converges.
QUAD_H = np.array([[[1., 2, 2], [2, 1, 0], [2, 0, 1]],
                   [[1., -2, -2], [-2, 1, 0], [-2, 0, 1]],
                   [[1., 0, 0], [0, 0, 0], [0, 0, 0]]], np.float32)
QUAD_X0 = np.array([1.0, 1.35, 1.35], np.float32)


@pytest.mark.parametrize("variant", ["none", "ef", "ef21", "econtrol", "dgc",
                                     "gd"])
def test_three_quadratics_top1_needs_error_feedback(variant):
  assert np.all(np.linalg.eigvalsh(QUAD_H.mean(0)) > 0.5)
  mesh = jax.make_mesh((3,), ("data",), devices=jax.devices()[:3])
  loss = lambda p, h: 0.5 * p["x"] @ h[0] @ p["x"]
  if variant == "gd":
    tx = optax.sgd(0.1)
  else:
    extra = dict(eta=0.1) if variant == "econtrol" else {}  # ~ k/d = 1/3
    tx = C.error_feedback(C.top_k(1 / 3), variant=variant, learning_rate=0.1,
                          axis_name="data", **extra)
  dp = C.make_data_parallel_step(loss, tx, mesh)
  params, state = dp.init({"x": QUAD_X0})
  batch = dp.shard_batch(QUAD_H)
  for _ in range(300):
    params, state, _ = dp.step(params, state, batch)
  dist = float(np.linalg.norm(np.asarray(params["x"])))
  if variant == "none":
    assert abs(dist - 1.35 * math.sqrt(2)) < 1e-4
  else:
    assert dist < 1e-4


def np_econtrol(grads, lr, eta, k, steps):
  """Algorithm 1 of the EControl paper, one worker, top-k, in numpy."""
  e = np.zeros_like(grads[0])
  h = np.zeros_like(grads[0])
  server = np.zeros_like(grads[0])
  outs = []
  for t in range(steps):
    g = lr * grads[t]
    delta = np_top_k(eta * e + g - h, k)
    e = e + g - h - delta
    h = h + delta
    server = server + delta           # x <- x - (h_t + Delta_t)
    outs.append(-server)
  return outs, e, h


def test_econtrol_matches_algorithm_1():
  rng = np.random.default_rng(1)
  lr, eta, k, steps = 0.1, 0.3, 2, 6
  grads = rng.normal(size=(steps, 3, 4)).astype(np.float32)
  tx = C.error_feedback(C.top_k(k / 12), variant="econtrol",
                        learning_rate=lr, eta=eta)
  params = {"w": jnp.zeros((3, 4))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  outs, e, h = np_econtrol(grads, lr, eta, k, steps)
  for t in range(steps):
    updates, state = update({"w": jnp.asarray(grads[t])}, state, params)
    np.testing.assert_allclose(updates["w"], outs[t], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.local.memory["w"], e, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.local.estimate["w"], h, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(state.server["w"], -outs[-1], rtol=1e-5)


def test_econtrol_converges_where_ef14_stalls():
  """EControl's setting: heterogeneous workers, a contractive compressor.

  Ten least-squares workers whose own gradients do not vanish at the common
  optimum, full gradients, top-1 of 20 coordinates, constant step. EF14 keeps
  oscillating ~1 away from the optimum (its error term never settles);
  EControl (default eta = 0.01, and 0.1) converges linearly, like EF21;
  eta = 1 (the whole error fed back every step) diverges.
  """
  n, d, lr, steps = 10, 20, 0.05, 3000
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(n, d, d)) / math.sqrt(d))
    b = jnp.asarray(rng.normal(size=(n, d)) * 3)
    h = np.einsum("nij,nik->jk", a, a)
    x_star = np.linalg.solve(h, np.einsum("nij,ni->j", a, b))
    grad_fn = lambda x, i: jax.grad(
        lambda x: 0.5 * jnp.sum((a[i] @ x["w"] - b[i]) ** 2))(x)
    x0 = {"w": jnp.zeros(d)}

    def dist(variant, **kw):
      tx = C.error_feedback(C.top_k(1 / d), variant=variant, learning_rate=lr,
                            **kw)
      x, _, _ = jax.jit(simulate, static_argnums=(0, 2, 3, 4))(
          tx, x0, grad_fn, n, steps)
      return float(np.linalg.norm(np.asarray(x["w"]) - x_star))

    assert dist("none") > 3.0
    assert dist("ef") > 0.3
    assert dist("econtrol") < 1e-9
    assert dist("econtrol", eta=0.1) < 1e-9
    assert dist("ef21") < 1e-9
    assert not dist("econtrol", eta=1.0) < 1e3   # diverges (inf/NaN or huge)


@pytest.mark.parametrize("eta", [None, 0.3])
def test_econtrol_skipped_step_keeps_both_memories(eta):
  # Bit for bit, after a few real steps (eta e + (1 - eta) e is not always
  # e in floating point: the skipped step must not compute it).
  tx = C.error_feedback(C.top_k(0.25), variant="econtrol", learning_rate=0.1,
                        eta=eta)
  params = {"w": jnp.zeros((64,))}
  state = tx.init(params)
  rng = np.random.default_rng(0)
  for _ in range(5):
    g = jnp.asarray(rng.normal(size=64), jnp.float32)
    _, state = tx.update({"w": g}, state, params)
  out, after = tx.update({"w": g.at[0].set(jnp.nan)}, state, params)
  for field in ("memory", "estimate"):
    np.testing.assert_array_equal(getattr(after.local, field)["w"],
                                  getattr(state.local, field)["w"])
  np.testing.assert_array_equal(out["w"], -state.server["w"])
  assert int(after.local.skipped) == 1


def test_eta_only_for_econtrol():
  with pytest.raises(ValueError, match="eta is only used by"):
    C.error_feedback(C.top_k(0.1), eta=0.5)
  with pytest.raises(ValueError, match="eta"):
    C.error_feedback(C.top_k(0.1), variant="econtrol", eta=1.5)


# ----------------------------------------------------------- bad input --


def test_unknown_variant():
  with pytest.raises(ValueError, match="unknown variant 'ef22'"):
    C.error_feedback(C.top_k(0.1), variant="ef22")


def test_axis_name_not_bound():
  tx = C.error_feedback(C.top_k(0.1), axis_name="data")
  params = {"w": jnp.zeros((10,))}
  state = tx.init(params)
  with pytest.raises(ValueError, match="axis_name='data' is not bound"):
    tx.update({"w": jnp.ones((10,))}, state, params)
  with pytest.raises(ValueError, match="not bound"):
    jax.jit(tx.update)({"w": jnp.ones((10,))}, state, params)


def test_bad_leaf_named_by_path():
  tx = C.error_feedback(C.nm(2, 4))
  params = {"layer": {"kernel": jnp.zeros((8, 3)), "bias": jnp.zeros((3,))}}
  with pytest.raises(ValueError, match=r"\['layer'\]\['bias'\].*\(3,\)"):
    tx.init(params)
  ok = C.error_feedback(C.nm(2, 4), mask=lambda p: jax.tree.map(
      lambda x: x.ndim == 2, p))
  ok.init(params)
  with pytest.raises(ValueError, match=r"\['n'\].*int32"):
    C.error_feedback(C.top_k(0.5)).init({"n": jnp.zeros((3,), jnp.int32)})


def test_bad_options():
  with pytest.raises(ValueError, match="Compressor"):
    C.error_feedback(0.1)
  with pytest.raises(ValueError, match="momentum is only used"):
    C.error_feedback(C.top_k(0.1), momentum=0.9)
  with pytest.raises(ValueError, match="momentum must be in"):
    C.error_feedback(C.top_k(0.1), variant="dgc", momentum=1.0)
  with pytest.raises(ValueError, match="warmup"):
    C.error_feedback(C.top_k(0.1), warmup_compressors=[C.top_k(0.5)])
  with pytest.raises(ValueError, match="learning_rate"):
    C.error_feedback(C.top_k(0.1), learning_rate=-1.0)
  with pytest.raises(ValueError, match="clip_norm"):
    C.error_feedback(C.top_k(0.1), clip_norm=0.0)
  with pytest.raises(ValueError, match="mask does not match"):
    C.error_feedback(C.top_k(0.1), mask={"a": True}).init(
        {"a": jnp.zeros(3), "b": jnp.zeros(3)})
