"""Gradient compression benchmark: selection speed, bytes on the wire, step cost.

Run from the repository root::

    python -m benchmarks.compression            # full sizes (~1-2 minutes)
    python -m benchmarks.compression --quick    # smoke run, seconds
    python -m benchmarks.compression --only step   # the train-step rows only

Rows (ratios against references measured in the same run):

* ``top_k 0.1%``: exact top-k selection (``top_k(0.001).compress``) of an
  11M-element gradient / one elementwise pass (``jnp.abs(x) * 2``) over it;
  target <= 2.5. ``lax.top_k`` alone is reported for comparison.
* ``lognormal 99.9%`` and ``threshold``: one-shot selection / elementwise;
  target <= 1.5.
* ``bytes 8 workers 0.1%``: bytes each device receives per step for the
  compressed exchange / a dense ring all-reduce of the same gradients, from
  the analytic formula and from the all-gathers in the compiled step's HLO;
  target <= 1%.
* ``fp8`` / ``fp4`` quantisation of the same 11M floats (per-tensor scale,
  rounding, uint8 codes) / elementwise; target <= 2; the lognormal format
  choice (fit + expected-error minimisation + fp8), target <= 1.5.
* ``bytes 8 workers FP8``: FP8 dense messages by reduce-scatter + all-gather
  / the fp32 ring all-reduce; target <= 26%.
* ``EControl step / EF step`` (target <= 1.1) and ``EF threshold step`` at
  the default ``max_fraction`` / dense SGD (target <= 1.5).
* ``EF top-k step``: a jitted train step of an MLP (784-1024-1024-10, 1.86M
  parameters) with error feedback top-k 0.1% / the dense SGD step of the same
  model; target <= 1.3. On one device at batch 256 and 1024 (the compression
  cost grows with the parameters only, so the ratio falls with the batch),
  and, without a target, data-parallel on 8 CPU devices of this machine
  (every device compresses a whole gradient for 1/8 of the batch, and there
  is no network to save). The single-device steps run like a real training
  loop (``sparse_jax.training`` does the same): params and optimizer state
  are donated to the step and each call takes the previous call's outputs,
  so the residual is updated in place and the error-feedback state evolves
  as in training.

``--only step`` (or ``selection``, ``bytes``) runs one group of rows and
writes ``results/partial/compression-step.json`` (etc.), leaving
``results/compression.json`` (and the docs built from ``results/*.json``)
alone.

All timings alternate between the functions compared (several rounds, min):
the machine is shared, and a load spike should not land on one side only.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks.timing import (  # noqa: E402
    RESULTS_DIR, Report, interleaved, time_fn)
import sparse_jax.compression as C  # noqa: E402


def selection_rows(report: Report, d: int, repeats: int) -> None:
  x = jax.random.normal(jax.random.key(0), (d,))
  key = jax.random.key(1)
  elementwise = jax.jit(lambda x: jnp.abs(x) * 2.0)
  ref = time_fn(lambda: elementwise(x), repeats=repeats)
  report.add("elementwise |x|*2 (reference)", ref, reference=ref, size=d)

  k = C.kept_count(0.001, d)
  lax_top_k = jax.jit(lambda x: jax.lax.top_k(jnp.abs(x), k))
  report.add("lax.top_k |x| 0.1% (for comparison)",
             time_fn(lambda: lax_top_k(x), repeats=repeats), reference=ref,
             size=d, k=k)
  top_k = jax.jit(C.top_k(0.001).compress)
  # Exactness on this very input, before timing it.
  got = np.sort(np.asarray(top_k(x, key).indices))
  want = np.sort(np.asarray(lax_top_k(x)[1]))
  assert np.array_equal(got, want), "top_k is not exact"
  report.add("top_k 0.1% (exact)", time_fn(lambda: top_k(x, key),
                                           repeats=repeats),
             reference=ref, target=2.5, size=d, k=k)

  # Lognormal magnitudes (the model of Chmiel et al.), random signs.
  g = jnp.sign(x) * jnp.exp(-8.0 + 1.5 * jax.random.normal(
      jax.random.key(2), (d,)))
  lognormal = jax.jit(C.lognormal(0.999).compress)
  dense = C.lognormal(0.999).decompress(lognormal(g, key), (d,))
  kept = float(jnp.mean(dense != 0))
  report.add("lognormal 99.9% selection (lognormal data)",
             time_fn(lambda: lognormal(g, key), repeats=repeats),
             reference=ref, target=1.5, size=d, kept_fraction=kept)
  tau = float(jnp.sort(jnp.abs(x))[-k])      # keeps ~0.1%
  threshold = jax.jit(C.threshold(tau, max_fraction=0.002).compress)
  report.add("threshold selection (0.1% pass)",
             time_fn(lambda: threshold(x, key), repeats=repeats),
             reference=ref, target=1.5, size=d)

  # Low-precision formats: per-tensor max scale + rounding + uint8 codes.
  for label, comp, target in [
      ("fp8 e4m3 quantisation (nearest)", C.fp_quantize(4, 3), 2.0),
      ("fp8 e4m3 quantisation (stochastic)",
       C.fp_quantize(4, 3, rounding="stochastic"), 2.0),
      ("fp4 radix-4 quantisation (stochastic)", C.fp4(), 2.0),
      ("lognormal format choice + fp8 (lognormal_fp 8)", C.lognormal_fp(8),
       1.5)]:
    fn = jax.jit(comp.compress)
    report.add(label, time_fn(lambda fn=fn: fn(x, key), repeats=repeats),
               reference=ref, target=target, size=d,
               wire_bytes=comp.wire_bytes((d,)))


def init_mlp(sizes, seed=0):
  rng = np.random.default_rng(seed)
  params = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    params[f"w{i}"] = (rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32)
    params[f"b{i}"] = np.zeros((b,), np.float32)
  return params


def mlp_loss(params, batch):
  h = batch["x"]
  n = len(params) // 2
  for i in range(n):
    h = h @ params[f"w{i}"] + params[f"b{i}"]
    if i < n - 1:
      h = jax.nn.relu(h)
  return optax.softmax_cross_entropy_with_integer_labels(h, batch["y"]).mean()


def kernels_only(params):
  return {k: k.startswith("w") for k in params}


def bytes_rows(report: Report, sizes, batch_size: int) -> None:
  n = 8
  params = init_mlp(sizes)
  d = sum(v.size for v in params.values())
  mesh = jax.make_mesh((n,), ("data",))
  tx = C.error_feedback(C.top_k(0.001), learning_rate=0.05, axis_name="data")
  dp = C.make_data_parallel_step(mlp_loss, tx, mesh)
  p, s = dp.init(params)
  rng = np.random.default_rng(1)
  batch = dp.shard_batch({
      "x": rng.normal(size=(batch_size, sizes[0])).astype(np.float32),
      "y": rng.integers(0, sizes[-1], size=(batch_size,)).astype(np.int32)})
  analytic = C.exchange_bytes(C.top_k(0.001), params, num_workers=n)
  hlo = dp.lower(p, s, batch).compile().as_text()
  from_hlo = C.hlo_wire_bytes(hlo)
  _, _, metrics = dp.step(p, s, batch)
  ratio = analytic.received / analytic.dense
  report.add("bytes 8 workers 0.1%: received / dense ring all-reduce",
             value=ratio, target=0.01, params=d,
             received_bytes=analytic.received, dense_bytes=analytic.dense,
             metric_received=float(metrics["bytes_received"]),
             hlo_all_gather_bytes=from_hlo.get("all-gather", 0.0),
             hlo_all_reduce_bytes=from_hlo.get("all-reduce", 0.0))
  assert abs(from_hlo["all-gather"] - analytic.received) < 1e-6 * (
      analytic.received), (from_hlo, analytic)

  # FP8 (e4m3) dense messages: reduce-scatter (all-to-all of chunk messages)
  # + all-gather of the re-encoded mean chunks, vs fp32's ring all-reduce.
  fp8 = C.fp_quantize(4, 3)
  tx = C.error_feedback(fp8, learning_rate=0.05, axis_name="data")
  dp = C.make_data_parallel_step(mlp_loss, tx, mesh)
  p, s = dp.init(params)
  _, _, metrics = dp.step(p, s, batch)
  hlo = C.hlo_wire_bytes(dp.lower(p, s, batch).compile().as_text())
  plan = C.exchange_plan(fp8, params, num_workers=n)
  report.add("bytes 8 workers FP8 reduce-scatter: received / fp32 ring "
             "all-reduce", value=float(metrics["bytes_received"]
                                       / metrics["bytes_dense"]),
             target=0.26, params=d,
             collectives=sorted({kind for _, kind, _ in plan}),
             metric_received=float(metrics["bytes_received"]),
             hlo_all_to_all_bytes=hlo.get("all-to-all", 0.0),
             hlo_all_gather_bytes=hlo.get("all-gather", 0.0))

  # For comparison: PowerSGD rank 4 (two all-reduces per matrix).
  tx = C.powersgd(4, learning_rate=0.05, axis_name="data")
  dp = C.make_data_parallel_step(mlp_loss, tx, mesh)
  p, s = dp.init(params)
  _, _, metrics = dp.step(p, s, batch)
  hlo = C.hlo_wire_bytes(dp.lower(p, s, batch).compile().as_text())
  report.add("bytes 8 workers PowerSGD rank 4: received / dense (no target)",
             value=float(metrics["bytes_received"] / metrics["bytes_dense"]),
             params=d, metric_received=float(metrics["bytes_received"]),
             hlo_all_reduce_bytes=hlo.get("all-reduce", 0.0))


def step_rows(report: Report, sizes, batch_size: int, repeats: int,
              rounds: int) -> None:
  params = init_mlp(sizes)
  rng = np.random.default_rng(2)
  batch = {"x": jnp.asarray(rng.normal(size=(batch_size, sizes[0])),
                            jnp.float32),
           "y": jnp.asarray(rng.integers(0, sizes[-1], size=(batch_size,)))}
  d = sum(v.size for v in params.values())

  class TrainLoop:
    """A donated jitted step whose every call continues from the last one."""

    def __init__(self, tx, batch):
      def step(params, state, batch):
        grads = jax.grad(mlp_loss)(params, batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state
      self.step = jax.jit(step, donate_argnums=(0, 1))
      self.params = jax.tree.map(jnp.array, params)   # own buffers
      self.state = jax.tree.map(jnp.array, tx.init(self.params))
      self.batch = batch

    def __call__(self):
      self.params, self.state = self.step(self.params, self.state, self.batch)
      return self.params

  dense_tx = optax.sgd(0.05)
  ef_tx = C.error_feedback(C.top_k(0.001), learning_rate=0.05,
                           mask=kernels_only)
  # The compression cost grows with the parameters, the step with the batch
  # too: the ratio is measured at two batch sizes.
  big = {"x": jnp.tile(batch["x"], (4, 1)), "y": jnp.tile(batch["y"], 4)}
  times = interleaved({"dense": TrainLoop(dense_tx, batch),
                       "ef": TrainLoop(ef_tx, batch),
                       "dense_big": TrainLoop(dense_tx, big),
                       "ef_big": TrainLoop(ef_tx, big)},
                      rounds=rounds, repeats=repeats)
  # EControl vs EF, and error feedback with the threshold compressor at its
  # default buffer (1%), tau = the 99th percentile of |g| at initialisation.
  econtrol_tx = C.error_feedback(C.top_k(0.001), variant="econtrol",
                                 learning_rate=0.05, mask=kernels_only)
  g0 = jax.grad(mlp_loss)(params, batch)
  tau = float(np.quantile(np.concatenate(
      [np.abs(np.asarray(v)).ravel() for k, v in g0.items()
       if k.startswith("w")]), 0.99))
  threshold_tx = C.error_feedback(C.threshold(tau), learning_rate=0.05,
                                  mask=kernels_only)
  more = interleaved({"ef": TrainLoop(ef_tx, batch),
                      "econtrol": TrainLoop(econtrol_tx, batch),
                      "dense": TrainLoop(dense_tx, batch),
                      "threshold": TrainLoop(threshold_tx, batch)},
                     rounds=rounds, repeats=repeats)
  report.add(f"EControl top-k 0.1% step / EF step, batch {batch_size}",
             more["econtrol"], reference=more["ef"], target=1.1, params=d,
             batch=batch_size)
  report.add(f"EF threshold step (tau: 1% pass at init), default "
             f"max_fraction, batch {batch_size}", more["threshold"],
             reference=more["dense"], target=1.5, params=d, batch=batch_size,
             tau=tau)
  for suffix, size in (("", batch_size), ("_big", 4 * batch_size)):
    report.add(f"dense SGD step, 1 device, batch {size} (reference)",
               times["dense" + suffix], reference=times["dense" + suffix],
               params=d, batch=size)
    report.add(f"EF top-k 0.1% step, 1 device, batch {size}",
               times["ef" + suffix], reference=times["dense" + suffix],
               target=1.3, params=d, batch=size)

  # Data-parallel on 8 CPU devices of this one 2-core machine: every device
  # compresses its whole gradient while it computes only 1/8 of the batch,
  # and there is no network to save, so this ratio is an upper bound of the
  # compute overhead, not the cost at scale (reported, no target).
  n = 8
  mesh = jax.make_mesh((n,), ("data",))
  dense_dp = C.make_data_parallel_step(mlp_loss, optax.sgd(0.05), mesh)
  ef_dp = C.make_data_parallel_step(
      mlp_loss, C.error_feedback(C.top_k(0.001), learning_rate=0.05,
                                 axis_name="data", mask=kernels_only), mesh)
  host_batch = jax.tree.map(np.asarray, batch)
  pd, sd = dense_dp.init(params)
  pe, se = ef_dp.init(params)
  bd, be = dense_dp.shard_batch(host_batch), ef_dp.shard_batch(host_batch)
  times = interleaved({"dense": lambda: dense_dp.step(pd, sd, bd),
                       "ef": lambda: ef_dp.step(pe, se, be)},
                      rounds=rounds, repeats=repeats)
  report.add("dense SGD step, 8 devices data-parallel (reference)",
             times["dense"], reference=times["dense"], params=d,
             batch=batch_size)
  report.add("EF top-k 0.1% step, 8 devices data-parallel (no target)",
             times["ef"], reference=times["dense"], params=d,
             batch=batch_size)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="small sizes: a smoke run in seconds")
  parser.add_argument("--only", choices=("selection", "bytes", "step"),
                      help="run one group of rows only")
  args = parser.parse_args(argv)
  if args.quick:
    d, repeats, rounds = 1 << 20, 3, 1
    sizes, batch_size = (256, 512, 512, 10), 64
  else:
    d, repeats, rounds = 11_000_000, 10, 5
    sizes, batch_size = (784, 1024, 1024, 10), 256
  report = Report("compression", quick=args.quick, only=args.only)
  if args.only in (None, "selection"):
    selection_rows(report, d, repeats)
  if args.only in (None, "bytes"):
    bytes_rows(report, sizes, batch_size)
  if args.only in (None, "step"):
    step_rows(report, sizes, batch_size, repeats, rounds)
  # A partial run leaves the full run's results/compression.json alone, and
  # stays out of results/*.json, which benchmarks/report.py turns into docs.
  report.write(None if args.only is None else os.path.join(
      RESULTS_DIR, "partial", f"compression-{args.only}.json"))


if __name__ == "__main__":
  main()
