"""Continual-learning runner: one learner over a task stream, no task boundaries given.

``run_continual(config, workdir)`` trains on the stream of ``config.stream`` (see
``sparse_jax.data.streams.make_stream``) with the method of ``config.train.step``:

- "standard": any optax optimizer of ``config.optimizer`` (SGD, Adam, ...);
- "ewc": online EWC (Schwarz et al. 2018, arXiv:1805.06370) - an ORACLE baseline: it
  is told the task boundaries, and at each one accumulates the diagonal empirical
  Fisher ``F <- gamma F + F_t`` and re-anchors ``theta*``; the loss adds
  ``lambda/2 * sum F (theta - theta*)^2``;
- "foovb": FOO-VB / BGD (``config.optimizer.name = "foovb"``): K parameter samples
  from the posterior, K gradients of the summed batch loss, one fixed-point update.

The learner only sees batches. After each task's segment it is evaluated on every
task's test set (mean weights), filling the accuracy matrix ``acc[i, j]``. Outputs in
``workdir``: ``metrics.jsonl`` (+ TensorBoard), ``accuracy_matrix.png``,
``results.json`` (average final accuracy, forgetting, backward transfer, the matrix),
checkpoints after every task (a killed run resumes at the last finished task).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from sparse_jax.data import load_dataset
from sparse_jax.data.streams import make_stream
from sparse_jax.models import build_model
from sparse_jax.training.checkpoint import Checkpointer
from sparse_jax.training.config import validate
from sparse_jax.training.files import is_primary, write_json
from sparse_jax.training.cl_metrics import (average_accuracy, backward_transfer,
                                            forgetting, plot_accuracy_matrix)
from sparse_jax.training.metrics import MetricWriter
from sparse_jax.training.runs import NonFiniteGuard, begin
from sparse_jax.training.optim import build_optimizer
from sparse_jax.training.progress import Progress
from sparse_jax.training.report import format_table
from sparse_jax.training.steps import (TrainState, cross_entropy, evaluate,
                                       init_train_state, initial_params, make_apply,
                                       make_eval_step,
                                       make_loss_fn, make_standard_step, split_model)

PyTree = Any


class EWCState(NamedTuple):
  """Online-EWC memory: accumulated diagonal Fisher and the anchor parameters."""
  fisher: PyTree
  anchor: PyTree


class ContinualState(NamedTuple):
  """What a continual run checkpoints after every task."""
  train: TrainState
  ewc: EWCState
  acc: jax.Array        # (T, T), NaN where not yet evaluated
  tasks_done: jax.Array  # int32 scalar


def ewc_penalty(strength: float):
  """``penalty(params, ewc_state) = strength/2 * sum F (params - anchor)^2``."""
  def penalty(params, ewc: EWCState):
    terms = jax.tree.map(lambda p, f, a: jnp.sum(f * (p - a) ** 2), params,
                         ewc.fisher, ewc.anchor)
    return 0.5 * strength * sum(jax.tree.leaves(terms))
  return penalty


def make_fisher_fn(graphdef):
  """``fisher(params, model_state, x, y) -> mean over examples of per-example grad^2``.

  The empirical Fisher diagonal (log-likelihood of the true labels).
  """
  apply = make_apply(graphdef)

  def example_loss(params, model_state, x, y):
    logits, _ = apply(params, model_state, x[None], False)
    return cross_entropy(logits, y[None])[0]

  def fisher(params, model_state, x, y):
    grads = jax.vmap(jax.grad(example_loss), in_axes=(None, None, 0, 0))(
        params, model_state, x, y)
    return jax.tree.map(lambda g: jnp.mean(g ** 2, axis=0), grads)

  return fisher


def make_foovb_step(graphdef, tx: optax.GradientTransformation, *, num_samples: int,
                    iterations: int = 1, loss_reduction: str = "sum"):
  """FOO-VB train step ``step(state, x, y, penalty_args=None, logit_mask=None)``.

  K posterior samples -> K gradients of the (summed) batch loss via vmap -> one
  fixed-point update (``sparse_jax.bayes.foovb_step``). BatchNorm statistics are not
  touched by the K samples; one forward pass at the new mean updates them.
  """
  from sparse_jax.bayes import foovb_step

  loss_fn = make_loss_fn(graphdef, reduction=loss_reduction)

  def with_state(params, model_state, x, y, logit_mask):
    loss, (new_model_state, _, _) = loss_fn(params, model_state, x, y, logit_mask)
    return loss, new_model_state

  def step(state: TrainState, x, y, penalty_args=None, logit_mask=None):
    del penalty_args
    stateful = bool(jax.tree.leaves(state.model_state))
    if stateful:
      fn, extra = with_state, {"model_state": state.model_state}
    else:
      fn, extra = (lambda p, *a: with_state(p, state.model_state, *a)[0]), {}
    params, opt_state, model_state, loss = foovb_step(
        tx, fn, state.params, state.opt_state, x, y, logit_mask,
        num_samples=num_samples, iterations=iterations, **extra)
    if not stateful:
      model_state = state.model_state
    per_example = loss / x.shape[0] if loss_reduction == "sum" else loss
    return (TrainState(step=state.step + 1, params=params, model_state=model_state,
                       opt_state=opt_state), {"loss": per_example})

  return step


def foovb_step_options(config) -> dict[str, int]:
  """``num_samples`` / ``iterations`` of the FOO-VB step, from ``config.optimizer.kwargs``."""
  kwargs = config.optimizer.get("kwargs", None) or {}
  return {"num_samples": int(kwargs.get("num_samples", 10)),
          "iterations": int(kwargs.get("fixed_point_iterations", 1))}


def _print_results(results: dict[str, Any]) -> None:
  print(format_table([{k: results.get(k) for k in
                       ("name", "stream", "method", "average_accuracy", "forgetting",
                        "backward_transfer", "wall_s")}]))


def run_continual(config, workdir: str, *,
                  stop_after_task: int | None = None) -> dict[str, Any]:
  """Runs a continual-learning config (see the module docstring).

  Args:
    config: ConfigDict with ``data``, ``stream``, ``model``, ``optimizer``, ``train``
      (``step``: "standard" | "ewc" | "foovb"; ``loss_reduction``; for foovb,
      K is ``optimizer.kwargs.num_samples``), ``ewc`` (``strength``, ``gamma``, ``fisher_examples``).
    workdir: run directory; resumes at the last finished task.
    stop_after_task: stop (checkpointed) after this many tasks, as a killed run would.

  Returns:
    The results (also ``workdir/results.json``).
  """
  validate(config)
  stored = begin(config, workdir)
  if stored is not None:
    _print_results(stored)
    return stored
  stream = make_stream(load_dataset(config.data), seed=config.seed, **config.stream)
  model_kwargs = dict(config.model)
  model = build_model(model_kwargs.pop("name"), stream.input_shape, stream.num_classes,
                      seed=config.seed, **model_kwargs)
  graphdef, params, model_state = split_model(model)
  params = initial_params(params, config)
  total_steps = sum(stream.steps_per_task())
  tx = build_optimizer(config.optimizer, total_steps, seed=config.seed)
  method = config.train.step
  reduction = (config.train.get("loss_reduction")
               or ("sum" if method == "foovb" else "mean"))
  if method == "foovb":
    step_fn = make_foovb_step(graphdef, tx, loss_reduction=reduction,
                              **foovb_step_options(config))
  elif method in ("standard", "ewc"):
    penalty = ewc_penalty(float(config.ewc.strength)) if method == "ewc" else None
    step_fn = make_standard_step(graphdef, tx, loss_reduction=reduction, penalty=penalty)
  else:
    raise ValueError(f"config.train.step={method!r} must be 'standard', 'ewc' or "
                     "'foovb' for the continual runner")
  step_fn = jax.jit(step_fn)
  eval_step = jax.jit(make_eval_step(graphdef))
  fisher_fn = jax.jit(make_fisher_fn(graphdef))

  t = stream.num_tasks
  zeros = jax.tree.map(jnp.zeros_like, params)
  state = ContinualState(train=init_train_state(params, model_state, tx),
                         ewc=EWCState(fisher=zeros, anchor=params),
                         acc=jnp.full((t, t), jnp.nan, jnp.float32),
                         tasks_done=jnp.zeros((), jnp.int32))
  ckpt = Checkpointer(workdir)
  state = ckpt.restore_latest(state)
  start_task = int(state.tasks_done)
  writer = MetricWriter(workdir, enabled=is_primary(),
                        start_step=int(state.train.step))
  writer.truncate_after(int(state.train.step))
  guard = NonFiniteGuard(int(config.train.get("max_nonfinite_steps", 0)))
  acc = np.array(state.acc)
  masks = (None if stream.task_classes is None else
           [np.isin(np.arange(stream.num_classes), c) for c in stream.task_classes])

  def eval_task(train_state, j):
    task = stream.tasks[j]
    return evaluate(eval_step, train_state.params, train_state.model_state,
                    task.x_test, task.y_test,
                    logit_mask=None if masks is None else masks[j])["accuracy"]

  progress = Progress(total_steps, int(state.train.step),
                      every_secs=float(config.train.progress_every_secs))
  train_state, ewc = state.train, state.ewc
  current = start_task
  t0 = time.perf_counter()
  status = "completed"
  for batch in stream.batches(start_task):
    if batch.task != current:  # the segment of task `current` is over
      train_state, ewc, acc = _end_of_task(current, train_state, ewc, acc, stream,
                                           config, fisher_fn, eval_task, writer)
      writer.flush()
      ckpt.save(current + 1, ContinualState(train_state, ewc, jnp.asarray(acc),
                                            jnp.asarray(current + 1, jnp.int32)))
      current = batch.task
      if stop_after_task is not None and current >= stop_after_task:
        status = "stopped"
        break
    logit_mask = None if masks is None else masks[batch.task]
    train_state, metrics = step_fn(train_state, batch.x, batch.y, ewc, logit_mask)
    step = int(train_state.step)
    guard.check(step, float(metrics["loss"]))
    if step % int(config.train.log_every) == 0:
      metrics = jax.device_get(metrics)
      writer.write(step, "train", {**metrics, "task": batch.task})
      progress.update(step, f"task {batch.task} loss {float(metrics['loss']):.4f}")
  else:
    if current < t and np.isnan(acc[t - 1]).any():
      train_state, ewc, acc = _end_of_task(current, train_state, ewc, acc, stream,
                                           config, fisher_fn, eval_task, writer)
      writer.flush()
      ckpt.save(t, ContinualState(train_state, ewc, jnp.asarray(acc),
                                  jnp.asarray(t, jnp.int32)))
  wall = time.perf_counter() - t0
  results: dict[str, Any] = {"name": config.get("name", ""), "status": status,
                             "stream": stream.name,
                             # the K-sample step trains FOO-VB or IVON
                             "method": (str(config.optimizer.name)
                                        if method == "foovb" else method),
                             "wall_s": wall, "steps": int(train_state.step)}
  if status == "completed":
    results.update({
        "average_accuracy": average_accuracy(acc),
        "forgetting": forgetting(acc),
        "backward_transfer": backward_transfer(acc),
        "final_accuracies": acc[-1].tolist(),
        "accuracy_matrix": acc.tolist(),
    })
    if is_primary():
      plot_accuracy_matrix(acc, os.path.join(workdir, "accuracy_matrix.png"),
                           title=f"{config.get('name', '')}: test accuracy (%)")
      write_json(os.path.join(workdir, "results.json"), results)
      _print_results(results)
  writer.close()
  ckpt.close()
  return results


def _end_of_task(task, train_state, ewc, acc, stream, config, fisher_fn, eval_task,
                 writer):
  """Evaluates on every task; for EWC, folds this task's Fisher into the memory."""
  acc = acc.copy()
  acc[task] = [eval_task(train_state, j) for j in range(stream.num_tasks)]
  record = {f"task_{j}": float(acc[task, j]) for j in range(stream.num_tasks)}
  record.update(after_task=task, average_seen=float(acc[task, :task + 1].mean()))
  writer.write(int(train_state.step), "test", record)
  logging.info("after task %d: accuracy on seen tasks %.4f", task,
               record["average_seen"])
  if config.train.step == "ewc":
    data = stream.tasks[task]
    n = min(len(data.x_train), int(config.ewc.fisher_examples))
    f_new = fisher_fn(train_state.params, train_state.model_state, data.x_train[:n],
                      data.y_train[:n])
    gamma = float(config.ewc.gamma)
    ewc = EWCState(fisher=jax.tree.map(lambda f, g: gamma * f + g, ewc.fisher, f_new),
                   anchor=train_state.params)
  return train_state, ewc, acc
