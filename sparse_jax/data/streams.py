"""Continual-learning task streams built from a base dataset (digits or MNIST).

A :class:`TaskStream` is a list of tasks (each a :class:`Dataset` over the same input
shape) and the order in which the learner sees training batches. The learner is never
told task boundaries; the stream only exposes ``batches()`` (what the learner sees)
and ``boundaries`` (for oracle baselines such as online EWC, and for evaluation).

Streams:
- permuted: task t applies a fixed pixel permutation (task 0: identity); one shared
  head (domain-incremental).
- split: 5 tasks of 2 classes ((0,1), (2,3), ...); ``scenario`` "domain" (labels 0/1
  within each task, shared 2-way head), "class" (original labels, 10-way head),
  "task" (original labels, evaluation restricted to the task's classes: multi-head).
- continuous: the permuted tasks blended gradually: the probability that a training
  example comes from task t is a trapezoid in time (ramps of ``blend`` of a task's
  length), so there is no boundary to detect.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

import numpy as np

from sparse_jax.data.dataset import Dataset, make_dataset


class Batch(NamedTuple):
  x: np.ndarray
  y: np.ndarray
  task: int  # the task whose segment this batch belongs to (for oracles and logging)


class TaskStream:
  """Tasks plus a reproducible batch order.

  Args:
    tasks: the tasks (same input shape).
    batch_size: training batch size.
    epochs: passes over each task's training set.
    seed: batch-order seed (``np.random.default_rng(100 + seed)``, drawn once per run).
    num_classes: width of the shared head.
    task_classes: for task-incremental evaluation, each task's class ids (else None).
    name: a short description.
    blend: for the continuous stream, the trapezoid ramp as a fraction of a task's
      segment (0 gives a discrete stream).
  """

  def __init__(self, tasks: Sequence[Dataset], *, batch_size: int, epochs: int,
               seed: int, num_classes: int,
               task_classes: Sequence[Sequence[int]] | None = None, name: str = "",
               blend: float = 0.0):
    if not tasks:
      raise ValueError("a task stream needs at least one task")
    if not 0.0 <= blend <= 0.5:
      raise ValueError(f"config.stream.blend={blend} must be in [0, 0.5]")
    self.tasks = list(tasks)
    self.batch_size, self.epochs, self.seed = batch_size, epochs, seed
    self.num_classes = num_classes
    self.task_classes = None if task_classes is None else [list(c) for c in task_classes]
    self.name = name
    self.blend = blend

  @property
  def num_tasks(self) -> int:
    return len(self.tasks)

  @property
  def input_shape(self) -> tuple[int, ...]:
    return self.tasks[0].input_shape

  def steps_per_task(self) -> list[int]:
    """Training batches of each task's segment (last batch of an epoch may be short)."""
    return [self.epochs * -(-len(t.x_train) // self.batch_size) for t in self.tasks]

  def batches(self, start_task: int = 0) -> Iterator[Batch]:
    """Yields the training batches of tasks ``start_task..`` in order.

    The order is a pure function of the seed: starting at ``start_task`` replays the
    random draws of the earlier tasks without yielding them, so a resumed run sees
    the same batches.
    """
    rng = np.random.default_rng(100 + self.seed)
    for t, task in enumerate(self.tasks):
      n = len(task.x_train)
      for epoch in range(self.epochs):
        order = rng.permutation(n)
        mix_rng = np.random.default_rng([self.seed, t, epoch]) if self.blend else None
        if t < start_task:
          continue
        for b, start in enumerate(range(0, n, self.batch_size)):
          idx = order[start:start + self.batch_size]
          if mix_rng is None:
            yield Batch(task.x_train[idx], task.y_train[idx], t)
          else:
            per_epoch = -(-n // self.batch_size)
            frac = (epoch * per_epoch + b + 0.5) / (self.epochs * per_epoch)
            yield self._blended(t, idx, frac, mix_rng)

  def _blended(self, t: int, idx: np.ndarray, frac: float, rng) -> Batch:
    """A batch at position ``frac`` in [0, 1) of task t's segment, mixed with neighbours.

    The share of task t-1 falls linearly from 1/2 to 0 over the first ``blend`` of the
    segment and the share of task t+1 rises from 0 to 1/2 over the last ``blend``, so
    the mixture is continuous in time (each task's share is a trapezoid).
    """
    x, y = self.tasks[t].x_train[idx].copy(), self.tasks[t].y_train[idx].copy()
    p_prev = max(0.0, (self.blend - frac) / (2 * self.blend)) if t > 0 else 0.0
    p_next = (max(0.0, (frac - 1 + self.blend) / (2 * self.blend))
              if t + 1 < self.num_tasks else 0.0)
    source = rng.choice(3, size=len(idx), p=[p_prev, 1 - p_prev - p_next, p_next])
    for which, other in ((0, t - 1), (2, t + 1)):
      sel = np.flatnonzero(source == which)
      if len(sel):
        pick = rng.integers(0, len(self.tasks[other].x_train), len(sel))
        x[sel] = self.tasks[other].x_train[pick]
        y[sel] = self.tasks[other].y_train[pick]
    return Batch(x, y, t)


def permutations(num_tasks: int, size: int) -> list[np.ndarray]:
  """Task 0: identity; task t: ``np.random.default_rng(1000 + t).permutation(size)``."""
  return [np.arange(size)] + [np.random.default_rng(1000 + t).permutation(size)
                              for t in range(1, num_tasks)]


def permuted_tasks(base: Dataset, num_tasks: int) -> list[Dataset]:
  """Pixel-permuted copies of ``base`` (permutation over all input features)."""
  shape = base.input_shape
  size = int(np.prod(shape))
  tasks = []
  for t, perm in enumerate(permutations(num_tasks, size)):
    def apply(x):
      return x.reshape(len(x), size)[:, perm].reshape((len(x),) + shape)
    tasks.append(make_dataset(apply(base.x_train), base.y_train, apply(base.x_test),
                              base.y_test, base.num_classes, f"{base.name}-perm{t}"))
  return tasks


def split_tasks(base: Dataset, *, scenario: str = "domain",
                classes_per_task: int = 2) -> tuple[list[Dataset], list[list[int]], int]:
  """Splits ``base`` into tasks of ``classes_per_task`` consecutive classes.

  Returns:
    ``(tasks, task_classes, num_classes)``: with scenario "domain" the labels are
    the class index within the task and the head has ``classes_per_task`` outputs;
    with "class" and "task" labels stay global and the head has all classes.
  """
  if scenario not in ("domain", "class", "task"):
    raise ValueError(f"config.stream.scenario={scenario!r} must be 'domain', 'class' "
                     "or 'task'")
  groups = [list(range(c, c + classes_per_task))
            for c in range(0, base.num_classes, classes_per_task)]
  tasks = []
  for t, group in enumerate(groups):
    tr = np.isin(base.y_train, group)
    te = np.isin(base.y_test, group)
    y_train, y_test = base.y_train[tr], base.y_test[te]
    if scenario == "domain":
      y_train, y_test = y_train - group[0], y_test - group[0]
    tasks.append(make_dataset(base.x_train[tr], y_train, base.x_test[te], y_test,
                              base.num_classes, f"{base.name}-split{t}"))
  num_classes = classes_per_task if scenario == "domain" else base.num_classes
  return tasks, groups, num_classes


def make_stream(base: Dataset, *, kind: str, num_tasks: int = 10, batch_size: int = 32,
                epochs: int = 10, seed: int = 0, scenario: str = "domain",
                blend: float = 0.25) -> TaskStream:
  """Builds a stream of ``kind`` "permuted", "split" or "continuous" from ``base``.

  Args:
    base: the dataset (digits or MNIST).
    kind: stream kind.
    num_tasks: tasks of the permuted / continuous streams.
    batch_size: training batch size.
    epochs: epochs per task.
    seed: batch-order seed.
    scenario: split stream scenario ("domain", "class", "task").
    blend: trapezoid ramp of the continuous stream (fraction of a task's segment).

  Returns:
    A :class:`TaskStream`.
  """
  if kind in ("permuted", "continuous"):
    return TaskStream(permuted_tasks(base, num_tasks), batch_size=batch_size,
                      epochs=epochs, seed=seed, num_classes=base.num_classes,
                      name=f"{kind} {base.name} x{num_tasks}",
                      blend=blend if kind == "continuous" else 0.0)
  if kind == "split":
    tasks, groups, num_classes = split_tasks(base, scenario=scenario)
    return TaskStream(tasks, batch_size=batch_size, epochs=epochs, seed=seed,
                      num_classes=num_classes,
                      task_classes=groups if scenario == "task" else None,
                      name=f"split {base.name} ({scenario}-incremental)")
  raise ValueError(f"config.stream.kind={kind!r} must be 'permuted', 'split' or "
                   "'continuous'")
