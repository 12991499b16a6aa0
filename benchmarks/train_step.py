"""Train-step time of every model on CPU, as a ratio to its own eval forward pass.

    python -m benchmarks.train_step [--quick]

For each model (MLP, CNN, ResNet, ViT) on 8x8x1 digits-shaped inputs (and 32x32x3
with --shapes=all) it times one jitted train step (forward + backward + Adam update)
and, in the same run, one jitted eval forward pass on the same batch; the ratio is
step / forward. Writes benchmarks/results/train_step.json.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from benchmarks.timing import Report, time_fn
from sparse_jax.models import MODELS, build_model
from sparse_jax.training.optim import build_optimizer
from sparse_jax.training.steps import (init_train_state, make_eval_step,
                                       make_standard_step, split_model)

SPEC = dict(name="adam", learning_rate=1e-3, schedule="constant", pre=(), post=())


def model_kwargs(name: str, shape: tuple[int, ...]) -> dict:
  return {"patch": 2 if shape[0] == 8 else 4} if name == "vit" else {}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quick", action="store_true", help="few repeats")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--shapes", choices=["digits", "all"], default="digits")
  args = parser.parse_args(argv)
  shapes = [(8, 8, 1)] + ([(32, 32, 3)] if args.shapes == "all" else [])
  repeats = 3 if args.quick else 20
  report = Report("train_step", batch=args.batch)
  rng = np.random.default_rng(0)
  for shape in shapes:
    x = rng.normal(size=(args.batch,) + shape).astype(np.float32)
    y = rng.integers(0, 10, args.batch).astype(np.int32)
    for name in sorted(MODELS):
      model = build_model(name, shape, 10, **model_kwargs(name, shape))
      graphdef, params, model_state = split_model(model)
      tx = build_optimizer(SPEC, 1000)
      state = init_train_state(params, model_state, tx)
      step = jax.jit(make_standard_step(graphdef, tx))
      forward = jax.jit(make_eval_step(graphdef))
      valid = np.ones(args.batch, bool)
      t_fwd = time_fn(lambda: forward(params, model_state, x, y, valid), repeats=repeats)
      t_step = time_fn(lambda: step(state, x, y), repeats=repeats)
      report.add(f"{name} {shape}", t_step, reference=t_fwd,
                 params=int(sum(p.size for p in jax.tree.leaves(params))),
                 steps_per_s=1.0 / t_step["min"])
  report.write()


if __name__ == "__main__":
  main()
