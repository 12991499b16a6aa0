"""A full train step with N:M projection every step, as a ratio to the dense step.

    python -m benchmarks.nm_train_step [--quick]

Same model, same batch, same Adam; the sparse step adds ``nm_projection`` (mask
recomputed from the magnitudes at EVERY step, head kept dense) after the optimizer,
with and without its per-step diagnostics (kept mass, flip rate).
Target (issue #3): <= 1.15x the dense step. Writes benchmarks/results/nm_train_step.json.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import optax

from benchmarks.timing import Report, time_fn
from sparse_jax.models import build_model
from sparse_jax.sparsity import default_filter, nm_projection
from sparse_jax.training.steps import init_train_state, make_standard_step, split_model

MODELS = {  # name: (model, kwargs, input shape, batch)
    "mlp 784-1024-1024": ("mlp", dict(hidden=(1024, 1024)), (28, 28, 1), 256),
    "resnet20 cifar": ("resnet", dict(blocks_per_stage=3), (32, 32, 3), 64),
    "cnn cifar": ("cnn", dict(features=(64, 128), dense=256), (32, 32, 3), 128),
}
PATTERNS = {"2:4": (2, 4, False), "T-2:4": (2, 4, True), "T-4:8": (4, 8, True)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args(argv)
  repeats = 5 if args.quick else 30
  report = Report("nm_train_step")
  rng = np.random.default_rng(0)
  for label, (name, kwargs, shape, batch) in MODELS.items():
    if args.quick and name != "mlp":
      continue
    graphdef, params, model_state = split_model(build_model(name, shape, 10, **kwargs))
    x = rng.normal(size=(batch,) + shape).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    dense_tx = optax.adam(1e-3)
    dense_state = init_train_state(params, model_state, dense_tx)
    dense_step = jax.jit(make_standard_step(graphdef, dense_tx))
    t_dense = time_fn(lambda: dense_step(dense_state, x, y), repeats=repeats)
    report.add(f"{label}: dense", t_dense, reference=t_dense)
    for pattern, (n, m, transposable) in PATTERNS.items():
      for diagnostics in (True, False):
        tx = optax.chain(optax.adam(1e-3), nm_projection(
            n, m, transposable=transposable, update_every=1, diagnostics=diagnostics,
            mask=default_filter(m, transposable=transposable, exclude="head")))
        state = init_train_state(params, model_state, tx)
        step = jax.jit(make_standard_step(graphdef, tx))
        t = time_fn(lambda: step(state, x, y), repeats=repeats)
        report.add(f"{label}: {pattern} projection"
                   + ("" if diagnostics else " (no diagnostics)"),
                   t, reference=t_dense, target=1.15)
  report.write()


if __name__ == "__main__":
  main()
