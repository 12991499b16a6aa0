"""Training plumbing: train/eval steps, loop, checkpoints, metrics, sweeps.

``run_experiment(config, workdir)`` runs a config with the runner it names
(``config.runner``, default "supervised").
"""

from __future__ import annotations

from typing import Any, Callable

from sparse_jax.training import transforms as _transforms  # registers names
from sparse_jax.training.continual import run_continual
from sparse_jax.training.conversion import layer_calibration, run_conversion
from sparse_jax.training.loop import STEP_BUILDERS, train_and_evaluate
from sparse_jax.training.optim import (TRANSFORMS, BuildContext, build_optimizer,
                                       make_schedule, register_transform)
from sparse_jax.training.steps import (TrainState, evaluate, init_train_state,
                                       make_eval_step, make_standard_step, split_model)

RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "supervised": train_and_evaluate, "continual": run_continual,
    "convert": run_conversion}
"""Experiment runners by ``config.runner``: ``runner(config, workdir) -> results``."""


def run_experiment(config, workdir: str, **kwargs) -> dict[str, Any]:
  """Runs ``config`` in ``workdir`` with the runner named by ``config.runner``."""
  name = config.get("runner", "supervised")
  if name not in RUNNERS:
    raise ValueError(f"config.runner={name!r} is not one of {sorted(RUNNERS)}")
  return RUNNERS[name](config, workdir, **kwargs)


__all__ = ["BuildContext", "RUNNERS", "STEP_BUILDERS", "TRANSFORMS", "TrainState",
           "build_optimizer", "evaluate", "init_train_state", "layer_calibration",
           "make_eval_step",
           "make_schedule", "make_standard_step", "register_transform",
           "run_continual", "run_conversion", "run_experiment", "split_model", "train_and_evaluate"]
