"""The supervised training loop: config in, workdir out, resumable.

``train_and_evaluate(config, workdir)`` writes into ``workdir``:

- ``config.json``: the resolved config;
- ``metrics.jsonl`` and ``tensorboard/``: train metrics every ``log_every`` steps,
  test metrics every ``eval_every`` steps;
- ``checkpoints/``: orbax checkpoints every ``checkpoint_every`` steps, at the end,
  and when the process receives SIGTERM;
- ``results.json``: the final summary (also printed as a table).

Rerunning the same command on the same ``workdir`` resumes from the last checkpoint
and reaches the same final parameters and metrics as an uninterrupted run: batches
are a pure function of ``(seed, step)`` and the whole state is checkpointed.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging

from sparse_jax.data import BatchSchedule, load_dataset
from sparse_jax.models import build_model
from sparse_jax.training.checkpoint import Checkpointer
from sparse_jax.training.metrics import MetricWriter
from sparse_jax.training.optim import build_forward, build_optimizer
from sparse_jax.training.progress import Progress
from sparse_jax.training.report import format_table
from sparse_jax.training.steps import (init_train_state, evaluate, make_eval_step,
                                       make_standard_step, split_model)


def _standard_builder(graphdef, tx, config):
  return make_standard_step(graphdef, tx,
                            loss_reduction=config.train.get("loss_reduction") or "mean",
                            forward=build_forward(config.train.get("forward", ())))


def _foovb_builder(graphdef, tx, config):
  from sparse_jax.training.continual import foovb_step_options, make_foovb_step
  return make_foovb_step(graphdef, tx,
                         loss_reduction=config.train.get("loss_reduction") or "sum",
                         **foovb_step_options(config))


STEP_BUILDERS: dict[str, Callable[..., Callable]] = {"standard": _standard_builder,
                                                      "foovb": _foovb_builder}
"""``config.train.step`` -> ``builder(graphdef, tx, config) -> step(state, x, y)``."""


class _Preemption:
  """Turns SIGTERM into a flag the loop polls, so it can checkpoint first."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: checkpointing before exit")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def num_params(params) -> int:
  return int(sum(np.size(leaf) for leaf in jax.tree.leaves(params)))


def build_run(config):
  """Dataset, model graph, optimizer and step-0 state of a supervised config.

  Returns:
    ``(data, graphdef, tx, state)``; ``state`` is also the template to restore a
    checkpoint of this config into.
  """
  data = load_dataset(config.data)
  model_kwargs = dict(config.model)
  model = build_model(model_kwargs.pop("name"), data.input_shape, data.num_classes,
                      seed=config.seed, **model_kwargs)
  graphdef, params, model_state = split_model(model)
  tx = build_optimizer(config.optimizer, int(config.train.num_steps))
  return data, graphdef, tx, init_train_state(params, model_state, tx)


def train_and_evaluate(config, workdir: str, *,
                       stop_after_step: int | None = None) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint).

  Args:
    config: an ``ml_collections.ConfigDict`` (see ``configs/``).
    workdir: the run directory; created if missing.
    stop_after_step: stop (with a checkpoint) once this step is reached, as an
      interrupted run would; the rest of the run resumes on the next call.

  Returns:
    The results summary (also written to ``workdir/results.json``). ``status`` is
    "completed", "stopped" (``stop_after_step``) or "preempted" (SIGTERM).
  """
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  train_cfg = config.train
  num_steps = int(train_cfg.num_steps)

  data, graphdef, tx, state = build_run(config)
  ckpt = Checkpointer(workdir)
  state = ckpt.restore_latest(state)
  start = int(state.step)
  if start:
    logging.info("resuming from the checkpoint at step %d in %s", start, workdir)
  writer = MetricWriter(workdir)
  writer.truncate_after(start)

  builder = STEP_BUILDERS.get(train_cfg.step)
  if builder is None:
    raise ValueError(f"config.train.step={train_cfg.step!r} is not one of "
                     f"{sorted(STEP_BUILDERS)}")
  step_fn = jax.jit(builder(graphdef, tx, config), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(graphdef,
                                     forward=build_forward(train_cfg.get("forward", ()))))
  schedule = BatchSchedule(len(data.x_train), int(train_cfg.batch_size),
                           seed=config.seed)

  def run_eval(split_x, split_y):
    return evaluate(eval_step, state.params, state.model_state, split_x, split_y,
                    batch_size=int(train_cfg.eval_batch_size))

  progress = Progress(num_steps, start, every_secs=float(train_cfg.progress_every_secs))
  status = "completed"
  t0 = time.perf_counter()
  last_test: dict[str, float] = {}
  with _Preemption() as preemption:
    step = start
    while step < num_steps:
      idx = schedule.indices(step)
      state, metrics = step_fn(state, data.x_train[idx], data.y_train[idx])
      step += 1
      if step % train_cfg.log_every == 0 or step == num_steps:
        metrics = jax.device_get(metrics)
        writer.write(step, "train", metrics)
        progress.update(step, f"loss {float(metrics['loss']):.4f}")
      if step % train_cfg.eval_every == 0 or step == num_steps:
        last_test = run_eval(data.x_test, data.y_test)
        writer.write(step, "test", last_test)
        logging.info("step %d: test %s", step, last_test)
      if step % train_cfg.checkpoint_every == 0 or step == num_steps:
        ckpt.save(step, state)
      if preemption.requested or (stop_after_step is not None
                                  and step >= stop_after_step and step < num_steps):
        ckpt.save(step, state)
        status = "preempted" if preemption.requested else "stopped"
        break
  wall = time.perf_counter() - t0

  forward = build_forward(train_cfg.get("forward", ()))
  weights = state.params if forward is None else forward(state.params)
  nonzero = int(sum(np.count_nonzero(np.asarray(w)) for w in jax.tree.leaves(weights)))
  results: dict[str, Any] = {
      "name": config.get("name", ""), "status": status, "step": int(state.step),
      "num_steps": num_steps, "wall_s": wall, "num_params": num_params(state.params),
      "density": nonzero / max(num_params(state.params), 1),
      "backend": jax.default_backend(),
  }
  if status == "completed":
    n_train_eval = min(len(data.x_train), int(train_cfg.train_eval_examples))
    train_metrics = run_eval(data.x_train[:n_train_eval], data.y_train[:n_train_eval])
    results.update({"test_accuracy": last_test["accuracy"],
                    "test_loss": last_test["loss"],
                    "train_accuracy": train_metrics["accuracy"],
                    "train_loss": train_metrics["loss"]})
    _write_json(os.path.join(workdir, "results.json"), results)
    print(format_table([{k: v for k, v in results.items()}]))
  writer.close()
  ckpt.close()
  return results
