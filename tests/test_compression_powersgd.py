"""PowerSGD: exactness on low-rank gradients, a NumPy reference, n devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparse_jax.compression as C
from sparse_jax.compression.powersgd import low_rank_saves

N = 4


def np_powersgd(grads_per_worker, memories, q, lr, rank):
  """One step for n workers in NumPy: returns (approx, new memories, new q)."""
  mats = [e + lr * g for g, e in zip(grads_per_worker, memories)]
  p = np.mean([m @ q for m in mats], axis=0)
  p, _ = np.linalg.qr(p)
  q_new = np.mean([m.T @ p for m in mats], axis=0)
  approx = p @ q_new.T
  return approx, [m - approx for m in mats], q_new


def test_exact_on_gradients_of_rank_at_most_r():
  rng = np.random.default_rng(0)
  g = rng.normal(size=(12, 3)) @ rng.normal(size=(3, 9))
  tx = C.powersgd(3, learning_rate=0.5)
  params = {"w": jnp.zeros((12, 9))}
  upd, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, tx.init(params),
                         params)
  np.testing.assert_allclose(upd["w"], -0.5 * g, atol=1e-4)
  assert float(jnp.max(jnp.abs(state.local.memory["w"]))) < 1e-4


def test_single_worker_matches_numpy_reference():
  rng = np.random.default_rng(1)
  tx = C.powersgd(2, learning_rate=0.1)
  params = {"w": jnp.zeros((10, 3, 4)), "b": jnp.zeros((4,))}
  state = tx.init(params)
  q = np.asarray(state.q["w"], np.float64)
  e = np.zeros((30, 4))
  assert isinstance(state.q["b"], optax.MaskedNode)
  for _ in range(3):
    g = {"w": rng.normal(size=(10, 3, 4)).astype(np.float32),
         "b": rng.normal(size=(4,)).astype(np.float32)}
    upd, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
    approx, (e,), q = np_powersgd([g["w"].reshape(30, 4)], [e], q, 0.1, 2)
    np.testing.assert_allclose(upd["w"], -approx.reshape(10, 3, 4),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state.local.memory["w"], e.reshape(10, 3, 4),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(upd["b"], -0.1 * g["b"], rtol=1e-6)  # dense


def test_multi_device_matches_numpy_reference_and_bytes():
  rng = np.random.default_rng(2)
  mesh = jax.make_mesh((N,), ("data",), devices=jax.devices()[:N])
  x = rng.normal(size=(4 * N, 16)).astype(np.float32)
  y = rng.normal(size=(4 * N, 8)).astype(np.float32)
  loss = lambda p, b: 0.5 * jnp.mean(jnp.sum((b["x"] @ p["w"] - b["y"]) ** 2,
                                             axis=1))
  tx = C.powersgd(2, learning_rate=0.05, axis_name="data")
  dp = C.make_data_parallel_step(loss, tx, mesh)
  params = {"w": (0.1 * rng.normal(size=(16, 8))).astype(np.float32)}
  p, s = dp.init(params)
  q = np.asarray(s.q["w"], np.float64)
  batch = dp.shard_batch({"x": x, "y": y})
  w = params["w"].astype(np.float64)
  memories = [np.zeros((16, 8))] * N
  for _ in range(3):
    grads = [xs.T @ (xs @ w - ys) / 4 for xs, ys in
             zip(np.split(x, N), np.split(y, N))]
    approx, memories, q = np_powersgd(grads, memories, q, 0.05, 2)
    w = w - approx
    p, s, metrics = dp.step(p, s, batch)
  np.testing.assert_allclose(p["w"], w, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(s.local.memory["w"], np.stack(memories),
                             rtol=1e-3, atol=1e-5)
  expect = 2 * (N - 1) / N * 4 * (16 + 8) * 2
  assert float(metrics["bytes_sent"]) == pytest.approx(expect)
  assert float(metrics["bytes_dense"]) == pytest.approx(
      2 * (N - 1) / N * 4 * 128)
  ops = C.hlo_collectives(dp.lower(p, s, batch).compile().as_text())
  shapes = sorted(sh for op in ops if op.kind == "all-reduce"
                  for sh in op.shapes if sh[1])
  assert shapes == [("f32", (8, 2)), ("f32", (16, 2))]


def test_conservation_invariant_float64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    mesh = jax.make_mesh((N,), ("data",), devices=jax.devices()[:N])
    x = rng.normal(size=(4 * N, 12))
    y = rng.normal(size=(4 * N, 6))
    loss = lambda p, b: 0.5 * jnp.mean(
        jnp.sum((b["x"] @ p["w"] - b["y"]) ** 2, axis=1))
    lr = 0.05
    dp = C.make_data_parallel_step(
        loss, C.powersgd(1, learning_rate=lr, axis_name="data"), mesh)
    w0 = rng.normal(size=(12, 6))
    p, s = dp.init({"w": w0})
    batch = dp.shard_batch({"x": x, "y": y})
    total = np.zeros((12, 6))
    for _ in range(10):
      w = np.asarray(p["w"])
      total += sum(xs.T @ (xs @ w - ys) / 4 for xs, ys in
                   zip(np.split(x, N), np.split(y, N)))
      p, s, _ = dp.step(p, s, batch)
    lhs = N * (w0 - np.asarray(p["w"])) + np.asarray(
        s.local.memory["w"]).sum(0)
    np.testing.assert_allclose(lhs, lr * total, rtol=1e-10, atol=1e-12)


def test_small_leaves_stay_dense_and_bad_rank():
  assert not low_rank_saves((5,), 1)
  assert not low_rank_saves((4, 4), 2)        # (4 + 4) * 2 = 16 = 4 * 4
  assert low_rank_saves((4, 4), 1)
  with pytest.raises(ValueError, match="rank must be an int >= 1"):
    C.powersgd(0)
  tx = C.powersgd(2, axis_name="data")
  params = {"w": jnp.zeros((8, 8))}
  with pytest.raises(ValueError, match="not bound"):
    tx.update(params, tx.init(params), params)
