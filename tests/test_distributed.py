"""Data-parallel error feedback over real collectives: 8 fake CPU devices in
one process, and 2 processes x 2 devices over loopback (gloo)."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparse_jax.compression as C
from tests import _dist_worker

N = 8


def mesh_of(n):
  return jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])


def regression(n, seed=0, d_in=16, d_out=4, per_worker=4):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n * per_worker, d_in)).astype(np.float32)
  y = rng.normal(size=(n * per_worker, d_out)).astype(np.float32)
  params = {"w": rng.normal(size=(d_in, d_out)).astype(np.float32) * 0.1,
            "b": np.zeros((d_out,), np.float32)}
  return params, {"x": x, "y": y}


def loss_fn(params, batch):
  pred = batch["x"] @ params["w"] + params["b"]
  return jnp.mean((pred - batch["y"]) ** 2)


def simulate(tx, params, batch, n, steps):
  """The same n workers, one process, no collectives (vmap + mean)."""
  shards = jax.tree.map(lambda a: a.reshape((n, -1) + a.shape[1:]), batch)
  states = jax.vmap(lambda _: tx.init(params))(jnp.arange(n))
  x = params
  for _ in range(steps):
    grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(x, shards)
    upd, states = jax.vmap(lambda g, s: tx.update(g, s, x))(grads, states)
    x = jax.tree.map(lambda a, u: a + u.mean(0), x, upd)
  return x, states


@pytest.mark.parametrize("variant", ["ef", "ef21", "econtrol", "dgc", "none"])
def test_multi_device_equals_single_process_simulation(variant):
  params, batch = regression(N)
  mask = {"w": True, "b": False}
  make = lambda axis: C.error_feedback(
      C.top_k(0.1), variant=variant, learning_rate=0.05, axis_name=axis,
      mask=mask)
  dp = C.make_data_parallel_step(loss_fn, make("data"), mesh_of(N))
  p, s = dp.init(params)
  b = dp.shard_batch(batch)
  for _ in range(6):
    p, s, metrics = dp.step(p, s, b)
  ref_p, ref_s = simulate(make(None), params, batch, N, 6)
  for name in ("w", "b"):
    np.testing.assert_allclose(p[name], ref_p[name], rtol=2e-5, atol=1e-6)
  if variant != "none":   # per-device residuals == per-worker residuals
    np.testing.assert_allclose(s.local.memory["w"], ref_s.local.memory["w"],
                               rtol=2e-5, atol=1e-6)
  if variant == "econtrol":
    np.testing.assert_allclose(s.local.estimate["w"],
                               ref_s.local.estimate["w"], rtol=2e-5, atol=1e-6)
    assert s.local.memory["w"].shape == (N, 16, 4)
    assert s.local.memory["w"].sharding.spec[0] == "data"
  np.testing.assert_allclose(metrics["error_ratio"],
                             ref_s.local.error_ratio.mean(), rtol=1e-4)


def test_duplicate_indices_are_scatter_added():
  """All workers pick the same coordinates: the update is their mean."""
  params = {"w": np.zeros((32,), np.float32)}
  dp = C.make_data_parallel_step(
      lambda p, b: jnp.sum(p["w"] * b[0]),
      C.error_feedback(C.top_k(1 / 32), variant="none", learning_rate=1.0,
                       axis_name="data"), mesh_of(N))
  p, s = dp.init(params)
  grads = np.zeros((N, 32), np.float32)
  grads[:, 5] = np.arange(1, N + 1)        # everybody sends index 5
  grads[:, 7] = 0.5
  p, s, _ = dp.step(p, s, dp.shard_batch(grads))
  expect = np.zeros(32, np.float32)
  expect[5] = -np.mean(np.arange(1, N + 1))
  np.testing.assert_allclose(p["w"], expect, rtol=1e-6)


def test_check_vma_rejects_an_update_that_differs_across_devices():
  """Without the exchange the update varies by device: shard_map refuses it."""
  params, batch = regression(N)
  tx = C.error_feedback(C.top_k(0.1), learning_rate=0.05, axis_name=None)
  dp = C.make_data_parallel_step(loss_fn, tx, mesh_of(N))
  p, s = dp.init(params)
  with pytest.raises(ValueError, match="not the same on every device") as err:
    dp.step(p, s, dp.shard_batch(batch))
  assert "replicated across mesh axis 'data'" in str(err.value.__cause__)


def test_mesh_without_the_axis():
  with pytest.raises(ValueError, match="not 'data'"):
    C.make_data_parallel_step(loss_fn, optax.sgd(0.1),
                              jax.make_mesh((N,), ("batch",)))


def test_batch_not_divisible():
  dp = C.make_data_parallel_step(loss_fn, optax.sgd(0.1), mesh_of(N))
  with pytest.raises(ValueError, match=r"\['x'\].*divisible by the 8"):
    dp.shard_batch({"x": np.zeros((12, 3))})


@pytest.mark.parametrize("fraction", [0.001, 0.02])
def test_wire_bytes_formula_metrics_and_hlo_agree(fraction):
  rng = np.random.default_rng(5)
  params = {"w1": rng.normal(size=(256, 128)).astype(np.float32) * 0.05,
            "w2": rng.normal(size=(128, 10)).astype(np.float32) * 0.05,
            "b": np.zeros((10,), np.float32)}
  mask = {"w1": True, "w2": True, "b": False}

  def mlp_loss(p, batch):
    h = jnp.tanh(batch["x"] @ p["w1"])
    return jnp.mean((h @ p["w2"] + p["b"] - batch["y"]) ** 2)

  tx = C.error_feedback(C.top_k(fraction), learning_rate=0.1,
                        axis_name="data", mask=mask)
  dp = C.make_data_parallel_step(mlp_loss, tx, mesh_of(N))
  p, s = dp.init(params)
  batch = dp.shard_batch({"x": rng.normal(size=(16, 256)).astype(np.float32),
                          "y": rng.normal(size=(16, 10)).astype(np.float32)})
  _, _, metrics = dp.step(p, s, batch)

  # 1. The analytic formula, by hand.
  ks = [C.kept_count(fraction, 256 * 128), C.kept_count(fraction, 128 * 10)]
  gather = sum((N - 1) * 8 * k for k in ks)
  dense_b = 2 * (N - 1) / N * 4 * 10
  dense_all = 2 * (N - 1) / N * 4 * (256 * 128 + 128 * 10 + 10)
  expect = C.exchange_bytes(C.top_k(fraction), params, num_workers=N,
                            mask=mask)
  assert expect.received == expect.sent == pytest.approx(gather + dense_b)
  assert expect.dense == pytest.approx(dense_all)
  # 2. The metrics of the step.
  assert float(metrics["bytes_received"]) == pytest.approx(expect.received)
  assert float(metrics["bytes_sent"]) == pytest.approx(expect.sent)
  assert float(metrics["bytes_dense"]) == pytest.approx(dense_all)
  # 3. The collectives XLA compiled.
  hlo = dp.lower(p, s, batch).compile().as_text()
  ops = C.hlo_collectives(hlo)
  gathers = [op for op in ops if op.kind == "all-gather"]
  assert {op.group_size for op in ops} == {N}
  got_shapes = sorted(shape for op in gathers for shape in op.shapes)
  want_shapes = sorted([("f32", (N, k)) for k in ks]
                       + [("s32", (N, k)) for k in ks])
  assert got_shapes == want_shapes
  assert sum(op.bytes_per_device for op in gathers) == pytest.approx(gather)
  # The only all-reduce carries the dense bias gradient (+ 2 scalar metrics).
  reduces = [op for op in ops if op.kind == "all-reduce"]
  reduced = sum(op.result_bytes for op in reduces)
  assert reduced == 4 * 10 + 2 * 4
  assert not [op for op in ops if op.kind not in ("all-gather", "all-reduce")]


def test_dense_baseline_all_reduces_the_gradients():
  params, batch = regression(N)
  dp = C.make_data_parallel_step(loss_fn, optax.sgd(0.05), mesh_of(N))
  p, s = dp.init(params)
  b = dp.shard_batch(batch)
  p1, _, metrics = dp.step(p, s, b)
  grads = jax.grad(loss_fn)(params, batch)   # mean over the full batch
  np.testing.assert_allclose(p1["w"], params["w"] - 0.05 * grads["w"],
                             rtol=1e-5, atol=1e-7)
  assert float(metrics["bytes_dense"]) == pytest.approx(
      2 * (N - 1) / N * 4 * (16 * 4 + 4))
  hlo = dp.lower(p, s, b).compile().as_text()
  assert [op.kind for op in C.hlo_collectives(hlo)] == ["all-reduce"]


def test_dgc_warmup_under_shard_map():
  params, batch = regression(N, d_in=32)
  tx = C.error_feedback(C.top_k(0.01), variant="dgc", learning_rate=0.05,
                        axis_name="data", mask={"w": True, "b": False},
                        warmup_compressors=[C.top_k(0.25), C.top_k(0.0625)],
                        warmup_steps=2)
  dp = C.make_data_parallel_step(loss_fn, tx, mesh_of(N))
  p, s = dp.init(params)
  b = dp.shard_batch(batch)
  received = []
  for _ in range(5):
    p, s, m = dp.step(p, s, b)
    received.append(float(m["bytes_received"]))
  dense_b = 2 * (N - 1) / N * 16
  ks = [32, 32, 8, 8, 1]    # 25%, 25%, 6.25%, 6.25%, 1% of 128 entries
  # The cheaper collective per level: at 25% a dense all-reduce of the
  # decompressed tensor (2 * 7/8 * 4 * 128 = 896 bytes) beats the all-gather.
  dense_w = 2 * (N - 1) / N * 4 * 128
  assert received == pytest.approx([min((N - 1) * 8 * k, dense_w) + dense_b
                                     for k in ks])


def test_conservation_invariant_multi_device_float64():
  """n (x0 - xT) + sum_i e_i = lr sum_t sum_i g_i,t with 8 real devices."""
  lr, steps = 0.05, 12
  with jax.enable_x64(True):
    params, batch = regression(N, seed=6)
    params = jax.tree.map(lambda a: a.astype(np.float64), params)
    batch = jax.tree.map(lambda a: a.astype(np.float64), batch)
    tx = C.error_feedback(C.top_k(0.05), learning_rate=lr, axis_name="data")
    dp = C.make_data_parallel_step(loss_fn, tx, mesh_of(N))
    p, s = dp.init(params)
    b = dp.shard_batch(batch)
    shards = jax.tree.map(lambda a: a.reshape((N, -1) + a.shape[1:]), batch)
    grad_sum = jax.tree.map(np.zeros_like, params)
    for _ in range(steps):
      host = jax.tree.map(np.asarray, p)
      g = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(host, shards)
      grad_sum = jax.tree.map(lambda acc, x: acc + np.asarray(x).sum(0),
                              grad_sum, g)
      p, s, _ = dp.step(p, s, b)
    for name in ("w", "b"):
      assert p[name].dtype == jnp.float64
      lhs = N * (params[name] - np.asarray(p[name])) + np.asarray(
          s.local.memory[name]).sum(0)
      np.testing.assert_allclose(lhs, lr * grad_sum[name], rtol=1e-10,
                                 atol=1e-12)


def _free_port():
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def test_two_processes_two_devices_each(tmp_path):
  port = _free_port()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(root, "tests", "_dist_worker.py"),
       f"127.0.0.1:{port}", "2", str(i), str(tmp_path)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  logs = []
  for proc in procs:
    try:
      out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    logs.append(out.decode(errors="replace")[-3000:])
  assert all(proc.returncode == 0 for proc in procs), "\n".join(logs)
  blobs = [(tmp_path / f"params_{i}.bin").read_bytes() for i in range(2)]
  assert blobs[0] == blobs[1]                       # byte-identical
  metrics = [json.loads((tmp_path / f"metrics_{i}.json").read_text())
             for i in range(2)]
  assert [m["device_count"] for m in metrics] == [4, 4]
  assert [m["local_device_count"] for m in metrics] == [2, 2]
  # The same 4 workers on 4 devices of this one process.
  params, batch = _dist_worker.problem()
  dp = C.make_data_parallel_step(_dist_worker.loss_fn,
                                 _dist_worker.make_optimizer(), mesh_of(4))
  p, s = dp.init(params)
  b = dp.shard_batch(batch)
  for _ in range(20):
    p, s, m = dp.step(p, s, b)
  local = np.concatenate([np.asarray(p[k]).ravel() for k in sorted(p)])
  np.testing.assert_allclose(np.frombuffer(blobs[0], np.float32), local,
                             rtol=1e-5, atol=1e-7)
  assert metrics[0]["bytes_received"] == float(m["bytes_received"])


def test_chained_optimizer_after_error_feedback():
  """chain(error_feedback(axis), sgd(lr)) == error_feedback(lr, axis) on 8."""
  params, batch = regression(N, seed=7)
  results = []
  for tx in (C.error_feedback(C.top_k(0.1), learning_rate=0.05,
                              axis_name="data"),
             optax.chain(C.error_feedback(C.top_k(0.1), axis_name="data"),
                         optax.sgd(0.05))):
    dp = C.make_data_parallel_step(loss_fn, tx, mesh_of(N))
    p, s = dp.init(params)
    b = dp.shard_batch(batch)
    for _ in range(5):
      p, s, _ = dp.step(p, s, b)
    results.append(p)
  for name in ("w", "b"):
    np.testing.assert_allclose(results[0][name], results[1][name], rtol=1e-5,
                               atol=1e-7)


# ------------------------------------------- fixed-layout messages (FP8) --


def linear_problem(d, seed=0):
  """f_i(x) = <x, b_i>: constant, heterogeneous per-worker gradients."""
  rng = np.random.default_rng(seed)
  b = (rng.normal(size=(N, d)) * np.exp(2 * rng.normal(size=(N, d)))
       ).astype(np.float32)
  loss = lambda p, batch: jnp.sum(p["w"] * batch["b"][0])
  return {"w": np.zeros((d,), np.float32)}, {"b": b}, loss


@pytest.mark.parametrize("variant,comp", [("ef", "fp8"), ("ef", "fp4n"),
                                          ("econtrol", "fp4n"), ("ef21", "fp8"),
                                          ("none", "fp4")])
def test_reduce_scatter_exchange_loses_nothing(variant, comp):
  """The mean chunk is re-encoded on its device, with server-side EF.

  EF: n (x0 - xT) + sum_i e_i + n s = lr sum_t sum_i g_i holds exactly (s:
  the devices' server errors); every variant ends where the exact
  all-gather exchange ends, up to the re-encoding (and nothing diverges:
  FP4 with EF did, when the server error went into a worker's memory).
  """
  d, lr, steps = 1001, 0.1, 12            # 1001: chunks are padded
  params, batch, loss = linear_problem(d)
  make = {"fp8": lambda: C.fp_quantize(4, 3),
          "fp4n": lambda: C.fp4(rounding="nearest"), "fp4": C.fp4}[comp]

  def run(collective):
    tx = C.error_feedback(make(), variant=variant, learning_rate=lr,
                          axis_name="data", collective=collective)
    dp = C.make_data_parallel_step(loss, tx, mesh_of(N))
    p, s = dp.init(params)
    b = dp.shard_batch(batch)
    for _ in range(steps):
      p, s, metrics = dp.step(p, s, b)
    return np.asarray(p["w"], np.float64), s, metrics

  x, s, metrics = run("auto")
  plan = C.exchange_plan(make(), params, num_workers=N)
  assert plan[0][1] == "reduce_scatter"
  assert float(metrics["bytes_received"]) == pytest.approx(plan[0][2])
  assert np.all(np.isfinite(x))
  rhs = lr * steps * batch["b"].astype(np.float64).sum(0)
  if variant == "ef":
    server = np.asarray(s.local.server_error["w"], np.float64)
    assert np.abs(server).max() > 0
    own = (np.abs(server) > 0).sum(1)          # each device: its chunk only
    assert own.max() <= -(-d // N)
    lhs = (-N * x + np.asarray(s.local.memory["w"], np.float64).sum(0)
           + N * server.sum(0))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5,
                               atol=1e-5 * np.abs(rhs).max())
  exact, _, _ = run("all_gather")
  scale = np.abs(exact).max()
  tol = 0.05 if comp == "fp8" else 0.35
  assert np.abs(x - exact).max() < tol * scale


def test_fp8_reduce_scatter_moves_a_quarter_of_fp32_bytes_in_hlo():
  d = 1 << 14
  params, batch, loss = linear_problem(d, seed=1)
  tx = C.error_feedback(C.fp_quantize(4, 3), learning_rate=0.1,
                        axis_name="data")
  dp = C.make_data_parallel_step(loss, tx, mesh_of(N))
  p, s = dp.init(params)
  b = dp.shard_batch(batch)
  _, _, metrics = dp.step(p, s, b)
  ops = C.hlo_collectives(dp.lower(p, s, b).compile().as_text())
  big = [op for op in ops if op.result_bytes >= d // N]
  assert sorted(op.kind for op in big) == ["all-gather", "all-to-all"]
  assert all(shape[0] == "u8" for op in big for shape in op.shapes)
  hlo_bytes = sum(op.bytes_per_device for op in big)
  assert hlo_bytes == pytest.approx(2 * (N - 1) / N * d)
  # + the per-chunk float32 scales (all-to-all and all-gather of 8 each).
  assert float(metrics["bytes_received"]) == pytest.approx(
      hlo_bytes + 2 * (N - 1) * 4)
  ratio = float(metrics["bytes_received"]) / float(metrics["bytes_dense"])
  assert 0.25 <= ratio <= 0.26


def test_auto_picks_the_cheapest_collective():
  params = {"w": jnp.zeros((256, 128))}
  plan = lambda comp, **kw: C.exchange_plan(comp, params, num_workers=N, **kw)
  assert plan(C.top_k(0.001))[0][1] == "all_gather"
  assert plan(C.nm(2, 4))[0][1] == "all_reduce"     # 2.5 B/value x 7 > 7/4 x 4
  assert plan(C.fp4())[0][1] == "reduce_scatter"
  assert plan(C.compose(C.top_k(0.01), C.fp_quantize(4, 3)))[0][1] == (
      "all_gather")
  forced = plan(C.nm(2, 4), collective="all_gather")[0]
  assert forced[1:] == ("all_gather", (N - 1) * 256 * 128 // 2 * 5)
  with pytest.raises(ValueError, match="needs fixed-layout compressors"):
    C.error_feedback(C.top_k(0.1), collective="reduce_scatter")
  # N:M at 8 workers: every worker decompresses, one dense all-reduce.
  rng = np.random.default_rng(2)
  w = {"w": rng.normal(size=(64, 16)).astype(np.float32)}
  x = rng.normal(size=(N * 2, 64)).astype(np.float32)
  loss = lambda p, b: jnp.mean((b["x"] @ p["w"]) ** 2)
  for collective in ("auto", "all_gather"):
    tx = C.error_feedback(C.nm(2, 4), learning_rate=0.1, axis_name="data",
                          collective=collective)
    dp = C.make_data_parallel_step(loss, tx, mesh_of(N))
    p, s = dp.init(w)
    b = dp.shard_batch({"x": x})
    p1, _, _ = dp.step(p, s, b)
    kinds = {op.kind for op in C.hlo_collectives(
        dp.lower(p, s, b).compile().as_text()) if op.result_bytes > 64}
    assert kinds == ({"all-reduce"} if collective == "auto"
                     else {"all-gather"})
    if collective == "auto":
      first = p1
    else:   # the same update either way
      np.testing.assert_allclose(p1["w"], first["w"], rtol=1e-5, atol=1e-7)


def test_chosen_formats_are_logged_per_leaf():
  rng = np.random.default_rng(3)
  params = {"a": {"kernel": (rng.normal(size=(64, 32)) * 0.1).astype(np.float32)},
            "b": np.zeros(32, np.float32)}
  loss = lambda p, b: jnp.mean((b["x"] @ p["a"]["kernel"] + p["b"]) ** 2)
  tx = C.error_feedback(C.lognormal_fp(8), learning_rate=0.1,
                        axis_name="data", collective="all_gather")
  dp = C.make_data_parallel_step(loss, tx, mesh_of(N))
  p, s = dp.init(params)
  b = dp.shard_batch({"x": rng.normal(size=(16, 64)).astype(np.float32)})
  grads = jax.grad(loss)(params, jax.tree.map(np.asarray, {
      "x": np.asarray(b["x"])[:2]}))
  _, s, metrics = dp.step(p, s, b)
  # Worker 0's kernel message is the whole tensor: its chosen split.
  want = int(C.lognormal_fp(8).compress(grads["a"]["kernel"], None).scale[1])
  assert float(np.asarray(s.local.exponent_bits["a"]["kernel"])[0]) == want
  assert set(k for k in metrics if k.startswith("exponent_bits/")) == {
      "exponent_bits/a/kernel", "exponent_bits/b"}
  assert 1 <= float(metrics["exponent_bits/a/kernel"]) <= 7
  fixed = C.error_feedback(C.top_k(0.1)).init(params)
  assert all(isinstance(x, optax.MaskedNode) for x in jax.tree.leaves(
      fixed.local.exponent_bits, is_leaf=lambda x: isinstance(x, optax.MaskedNode)))
