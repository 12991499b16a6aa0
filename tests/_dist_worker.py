"""One process of the multi-process test (launched by test_distributed.py).

Usage: python tests/_dist_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID OUT_DIR

Joins a jax.distributed run with 2 CPU devices per process (gloo collectives
over loopback), trains a small linear model data-parallel with error-feedback
top-k over all devices of all processes, and writes this process's copy of
the final parameters (raw bytes) and metrics to OUT_DIR.
"""

import json
import os
import sys

import numpy as np


def problem():
  """The data and model every process (and the test) uses."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(32, 24)).astype(np.float32)
  w_true = rng.normal(size=(24, 3)).astype(np.float32)
  y = x @ w_true + 0.1 * rng.normal(size=(32, 3)).astype(np.float32)
  params = {"w": np.zeros((24, 3), np.float32), "b": np.zeros((3,), np.float32)}
  return params, {"x": x, "y": y}


def loss_fn(params, batch):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  pred = batch["x"] @ params["w"] + params["b"]
  return jnp.mean((pred - batch["y"]) ** 2)


def make_optimizer():
  from sparse_jax import compression as C  # pylint: disable=g-import-not-at-top
  return C.error_feedback(C.top_k(0.1), variant="ef", learning_rate=0.05,
                          axis_name="data")


def train(num_steps=20):
  import jax  # pylint: disable=g-import-not-at-top
  from sparse_jax import compression as C  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  dp = C.make_data_parallel_step(loss_fn, make_optimizer(), mesh)
  params, batch = problem()
  params, state = dp.init(params)
  batch = dp.shard_batch(batch)
  for _ in range(num_steps):
    params, state, metrics = dp.step(params, state, batch)
  local = {k: np.asarray(v.addressable_shards[0].data) for k, v in
           params.items()}
  return local, {k: float(v.addressable_shards[0].data) for k, v in
                 metrics.items()}


def main(argv):
  coordinator, num_processes, process_id, out_dir = argv[1:5]
  from sparse_jax.compression import initialize_distributed  # pylint: disable=g-import-not-at-top
  initialize_distributed(coordinator, int(num_processes), int(process_id),
                         local_device_count=2)
  import jax  # pylint: disable=g-import-not-at-top
  params, metrics = train()
  metrics.update(device_count=jax.device_count(),
                 local_device_count=jax.local_device_count(),
                 process_index=jax.process_index())
  with open(os.path.join(out_dir, f"params_{process_id}.bin"), "wb") as f:
    for name in sorted(params):
      f.write(params[name].tobytes())
  with open(os.path.join(out_dir, f"metrics_{process_id}.json"), "w") as f:
    json.dump(metrics, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main(sys.argv)
