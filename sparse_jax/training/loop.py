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

import inspect
import math
import os
import signal
import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
from absl import logging

from sparse_jax.data import BatchSchedule, WorkerSkewedSchedule, load_dataset
from sparse_jax.models import build_model
from sparse_jax.sparsity import find_mask_states, sparsity_diagnostics
from sparse_jax.training.checkpoint import Checkpointer
from sparse_jax.training.config import validate
from sparse_jax.training.files import is_primary, write_json
from sparse_jax.training.metrics import MetricWriter, read_metrics
from sparse_jax.training.optim import build_forward, build_optimizer
from sparse_jax.training.progress import Progress
from sparse_jax.training.report import format_table
from sparse_jax.training.runs import NonFiniteGuard, begin
from sparse_jax.training.steps import (TrainState, cross_entropy, evaluate,
                                       init_train_state, initial_params, make_apply,
                                       make_eval_step,
                                       make_standard_step, split_model)


def _standard_builder(graphdef, tx, config, *, forward=None):
  if forward is None:
    forward = build_forward(config.train.get("forward", ()))
  return make_standard_step(graphdef, tx,
                            loss_reduction=config.train.get("loss_reduction") or "mean",
                            forward=forward,
                            forward_until=config.train.get("forward_until", None))


def _foovb_builder(graphdef, tx, config):
  from sparse_jax.training.continual import foovb_step_options, make_foovb_step
  return make_foovb_step(graphdef, tx,
                         loss_reduction=config.train.get("loss_reduction") or "sum",
                         **foovb_step_options(config))


class StepPlan(NamedTuple):
  """A train step that needs more than ``jax.jit`` (e.g. state placed on a mesh).

  Attributes:
    prepare: places a fresh step-0 :class:`TrainState` (before a checkpoint is
      restored into it as template).
    step: ``(state, x, y) -> (state, metrics)``, already compiled.
    eval_params: maps the params to what single-device evaluation uses.
  """
  prepare: Callable[[TrainState], TrainState]
  step: Callable
  eval_params: Callable = lambda params: params


def _data_parallel_builder(graphdef, tx, config, *, forward=None):
  from sparse_jax.compression import make_data_parallel_step

  n = int(config.train.num_devices)
  devices = jax.devices()
  if n < 1 or n > len(devices):
    raise ValueError(f"config.train.num_devices={n} but {len(devices)} devices exist "
                     "(on CPU, fake more with XLA_FLAGS="
                     "--xla_force_host_platform_device_count=8 or "
                     "jax_num_cpu_devices)")
  mesh = jax.sharding.Mesh(np.array(devices[:n]), ("data",))
  apply = make_apply(graphdef)
  if forward is None:
    forward = build_forward(config.train.get("forward", ())) or (lambda p: p)

  def loss_fn(params, batch):  # train.forward (e.g. nm_ste) as the standard step
    logits, _ = apply(forward(params), {}, batch["x"], True)
    return cross_entropy(logits, batch["y"]).mean()

  dp = make_data_parallel_step(loss_fn, tx, mesh)

  def prepare(state):
    if jax.tree.leaves(state.model_state):
      raise ValueError("config.train.step='data_parallel' needs a model without "
                       "BatchNorm statistics (model_state must be empty)")
    params, opt_state = dp.init(state.params)
    return state._replace(params=params, opt_state=opt_state)

  def step(state, x, y):
    params, opt_state, metrics = dp.step(state.params, state.opt_state,
                                         dp.shard_batch({"x": x, "y": y}))
    return state._replace(step=state.step + 1, params=params,
                          opt_state=opt_state), metrics

  single = devices[0]
  return StepPlan(prepare=prepare, step=step,
                  eval_params=lambda params: jax.device_put(params, single))


STEP_BUILDERS: dict[str, Callable[..., Any]] = {"standard": _standard_builder,
                                                "foovb": _foovb_builder,
                                                "data_parallel": _data_parallel_builder}
"""Train-step builders by ``config.train.step`` name: standard, foovb, data_parallel.

Each is ``builder(graphdef, tx, config)`` returning a pure ``step(state, x, y) ->
(state, metrics)`` (the loop jits it) or a :class:`StepPlan`. A builder with a
``forward`` keyword receives the loop's ``config.train.forward`` (built with the
run's initial params)."""


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


def _wire_totals(workdir: str, log_every: int, num_steps: int) -> dict[str, Any]:
  """Total bytes on the wire per device over the run, from the per-step metrics.

  Exact when every step was logged (``log_every=1``, what the data-parallel configs
  use); otherwise the logged steps are extrapolated and the keys say ``estimated``.
  """
  records = [r for r in read_metrics(workdir)
             if r["split"] == "train" and "bytes_received" in r]
  if not records:
    return {}
  exact = log_every == 1 and len(records) == num_steps
  scale = 1.0 if exact else num_steps / len(records)
  suffix = "" if exact else "_estimated"
  return {f"total_{key}{suffix}": scale * sum(r[key] for r in records)
          for key in ("bytes_sent", "bytes_received", "bytes_dense")}


def mask_diagnostics(params, opt_state) -> dict[str, float]:
  """Flat ``{"<layer>/<metric>": value}`` of ``sparse_jax.sparsity.sparsity_diagnostics``
  (achieved sparsity, mask sparsity, kept-magnitude ratio, flip rate per layer)."""
  diagnostics = jax.device_get(sparsity_diagnostics(params, opt_state))
  return {f"{layer}/{name}": float(value) for layer, values in diagnostics.items()
          for name, value in values.items()}


CALIBRATION_SAMPLES = 16
"""Posterior samples behind the ``*_bma`` results of a K-sample ("foovb") run."""


def calibration(graphdef, state: TrainState, x, y, *, bayesian: bool,
                batch_size: int = 1000, forward=None,
                params=None) -> dict[str, float]:
  """Test-set NLL and ECE (15 bins) next to accuracy, for the results table.

  Every run: ``nll`` / ``ece`` of the weights it ends with (for FOO-VB and
  IVON, the posterior mean; ``params`` overrides ``state.params``, e.g. the
  evaluation copy of a data-parallel run). A K-sample run (``config.train.step =
  "foovb"``) also gets the Bayesian model average of
  :data:`CALIBRATION_SAMPLES` posterior samples: ``accuracy_bma``,
  ``nll_bma``, ``ece_bma`` (``sparse_jax.bayes.evaluate_logits``).
  """
  from sparse_jax.bayes import evaluate_logits, foovb_sample

  apply = make_apply(graphdef)
  model_state = state.model_state
  params = state.params if params is None else params
  logits_fn = jax.jit(lambda p, xb: apply(p if forward is None else forward(p),
                                          model_state, xb, False)[0])
  samples = (foovb_sample(state.opt_state, CALIBRATION_SAMPLES) if bayesian
             else jax.tree.map(lambda p: p[None], params))
  many = jax.jit(jax.vmap(logits_fn, in_axes=(0, None)))
  mean_logits, logits = [], []
  for start in range(0, len(x), batch_size):
    xb = np.asarray(x[start:start + batch_size])
    mean_logits.append(np.asarray(logits_fn(params, xb)))
    logits.append(np.asarray(many(samples, xb)))
  mean_logits, logits = np.concatenate(mean_logits), np.concatenate(logits, axis=1)
  classes = mean_logits.shape[-1]   # sequence tasks: every position is a label
  m = jax.device_get(evaluate_logits(mean_logits.reshape(-1, classes),
                                     logits.reshape(len(logits), -1, classes),
                                     np.asarray(y).reshape(-1)))
  out = {"nll": float(m["nll_mean"]), "ece": float(m["ece_mean"])}
  if bayesian:
    out.update({"accuracy_bma": float(m["accuracy_bma"]),
                "nll_bma": float(m["nll_bma"]), "ece_bma": float(m["ece_bma"])})
  return out


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
  params = initial_params(params, config)
  tx = build_optimizer(config.optimizer, int(config.train.num_steps),
                       seed=config.seed)
  return data, graphdef, tx, init_train_state(params, model_state, tx)


def _print_results(results: dict[str, Any]) -> None:
  print(format_table([results]))


def train_and_evaluate(config, workdir: str, *,
                       stop_after_step: int | None = None) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint).

  Rerunning a completed workdir re-emits its results without training; a run
  killed at any moment resumes to the same ``results.json`` (up to ``wall_s``).

  Args:
    config: an ``ml_collections.ConfigDict`` (see ``configs/``).
    workdir: the run directory; created if missing.
    stop_after_step: stop (with a checkpoint) once this step is reached, as an
      interrupted run would; the rest of the run resumes on the next call.

  Returns:
    The results summary (also written to ``workdir/results.json``). ``status`` is
    "completed", "stopped" (``stop_after_step``) or "preempted" (SIGTERM).

  Raises:
    ValueError: a config the loop cannot honour (``validate``).
    RunError: a workdir of another completed run, or too many consecutive
      non-finite losses.
    CheckpointError: checkpoints exist but none is intact.
  """
  validate(config)
  stored = begin(config, workdir)
  if stored is not None:
    _print_results(stored)
    return stored
  primary = is_primary()
  train_cfg = config.train
  num_steps = int(train_cfg.num_steps)

  data, graphdef, tx, state = build_run(config)
  builder = STEP_BUILDERS.get(train_cfg.step)
  if builder is None:
    raise ValueError(f"config.train.step={train_cfg.step!r} is not one of "
                     f"{sorted(STEP_BUILDERS)}")
  forward = build_forward(train_cfg.get("forward", ()), init_params=state.params)
  accepts_forward = "forward" in inspect.signature(builder).parameters
  plan = (builder(graphdef, tx, config, forward=forward) if accepts_forward
          else builder(graphdef, tx, config))
  if not isinstance(plan, StepPlan):
    plan = StepPlan(prepare=lambda s: s, step=jax.jit(plan, donate_argnums=0))
  state = plan.prepare(state)
  ckpt = Checkpointer(workdir)
  state = ckpt.restore_latest(state)
  start = int(state.step)
  if start:
    logging.info("resuming from the checkpoint at step %d in %s", start, workdir)
  writer = MetricWriter(workdir, enabled=primary, start_step=start)
  writer.truncate_after(start)

  def save(step):
    writer.flush()  # TensorBoard events up to the checkpoint are on disk
    ckpt.save(step, state)

  step_fn = plan.step
  forward_until = train_cfg.get("forward_until", None)
  eval_steps = {}

  def forward_at(step):  # the forward-pass weights' map at ``step`` (None: dense)
    return None if forward_until is not None and step >= forward_until else forward

  def eval_step_at(step):
    sparse = forward_at(step) is not None
    if sparse not in eval_steps:
      eval_steps[sparse] = jax.jit(make_eval_step(
          graphdef, forward=forward if sparse else None))
    return eval_steps[sparse]
  alpha = train_cfg.get("dirichlet_alpha", None)
  if alpha is None or math.isinf(alpha):
    schedule = BatchSchedule(len(data.x_train), int(train_cfg.batch_size),
                             seed=config.seed)
  else:   # heterogeneous data-parallel workers
    schedule = WorkerSkewedSchedule(
        data.y_train, int(train_cfg.batch_size),
        num_workers=int(train_cfg.num_devices), alpha=float(alpha),
        seed=config.seed)

  def run_eval(split_x, split_y):
    return evaluate(eval_step_at(int(state.step)), plan.eval_params(state.params),
                    state.model_state, split_x, split_y,
                    batch_size=int(train_cfg.eval_batch_size))

  track_masks = bool(find_mask_states(state.opt_state))
  progress = Progress(num_steps, start, every_secs=float(train_cfg.progress_every_secs))
  guard = NonFiniteGuard(int(train_cfg.get("max_nonfinite_steps", 0)))
  status = "completed"
  t0 = time.perf_counter()
  last_test: dict[str, float] = {}
  try:
    with _Preemption() as preemption:
      step = start
      while step < num_steps:
        idx = schedule.indices(step)
        state, metrics = step_fn(state, data.x_train[idx], data.y_train[idx])
        step += 1
        guard.check(step, float(metrics["loss"]))
        if step % train_cfg.log_every == 0 or step == num_steps:
          metrics = jax.device_get(metrics)
          writer.write(step, "train", metrics)
          if track_masks and (step % train_cfg.eval_every == 0 or step == num_steps):
            writer.write(step, "sparsity",
                         mask_diagnostics(state.params, state.opt_state))
          progress.update(step, f"loss {float(metrics['loss']):.4f}")
        if step % train_cfg.eval_every == 0 or step == num_steps:
          last_test = run_eval(data.x_test, data.y_test)
          writer.write(step, "test", last_test)
          logging.info("step %d: test %s", step, last_test)
        if guard.finite and (step % train_cfg.checkpoint_every == 0
                             or step == num_steps):
          save(step)
        if preemption.requested or (stop_after_step is not None
                                    and step >= stop_after_step and step < num_steps):
          if guard.finite:
            save(step)
          status = "preempted" if preemption.requested else "stopped"
          break
  except BaseException:
    writer.close()   # events so far are kept
    ckpt.close()
    raise
  writer.flush()
  wall = time.perf_counter() - t0
  if status == "completed" and not last_test:  # killed after the final checkpoint
    last_test = run_eval(data.x_test, data.y_test)
  final_forward = forward_at(int(state.step))
  weights = state.params if final_forward is None else final_forward(state.params)
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
    if data.y_test.ndim == 2:   # language modelling: held-out bits per character
      results["test_bpc"] = last_test["loss"] / math.log(2)
    results.update(calibration(
        graphdef, state, data.x_test, data.y_test,
        bayesian=train_cfg.step == "foovb", forward=final_forward,
        batch_size=int(train_cfg.eval_batch_size),
        params=plan.eval_params(state.params)))
    if primary:
      results.update(_wire_totals(workdir, int(train_cfg.log_every), num_steps))
      write_json(os.path.join(workdir, "results.json"), results)
      _print_results(results)
  writer.close()
  ckpt.close()
  return results
