"""Seeded, reproducible batching that can be resumed at any step."""

from __future__ import annotations

import numpy as np


class BatchSchedule:
  """The batch of every training step, a pure function of ``(seed, step)``.

  Epoch ``e`` visits the examples in ``np.random.default_rng([seed, e]).permutation``
  order; step ``s`` is batch ``s % steps_per_epoch`` of epoch
  ``s // steps_per_epoch``. No iterator state: a resumed run sees exactly the batches
  an uninterrupted run would have seen.

  Args:
    num_examples: dataset size.
    batch_size: examples per batch.
    seed: shuffling seed.
    drop_remainder: drop the last partial batch of each epoch (fixed shapes under jit).

  Example:
    >>> sched = BatchSchedule(10, 4, seed=0)
    >>> sched.steps_per_epoch, sched.indices(2).shape
    (2, (4,))
  """

  def __init__(self, num_examples: int, batch_size: int, *, seed: int,
               drop_remainder: bool = True):
    if batch_size < 1:
      raise ValueError(f"config.train.batch_size={batch_size} must be >= 1")
    if drop_remainder and batch_size > num_examples:
      raise ValueError(f"config.train.batch_size={batch_size} exceeds the "
                       f"{num_examples} training examples")
    self.num_examples = num_examples
    self.batch_size = batch_size
    self.seed = seed
    self.drop_remainder = drop_remainder
    full, rest = divmod(num_examples, batch_size)
    self.steps_per_epoch = full + (0 if drop_remainder or rest == 0 else 1)
    self._cache: tuple[int, np.ndarray] | None = None

  def order(self, epoch: int) -> np.ndarray:
    """The example order of one epoch."""
    if self._cache is None or self._cache[0] != epoch:
      perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
      self._cache = (epoch, perm)
    return self._cache[1]

  def indices(self, step: int) -> np.ndarray:
    """Example indices of training step ``step``."""
    epoch, i = divmod(step, self.steps_per_epoch)
    return self.order(epoch)[i * self.batch_size:(i + 1) * self.batch_size]


def iterate_batches(x: np.ndarray, y: np.ndarray, batch_size: int):
  """Yields ``(x, y)`` batches in order, the last one possibly smaller (evaluation)."""
  for start in range(0, len(x), batch_size):
    yield x[start:start + batch_size], y[start:start + batch_size]


class WorkerSkewedSchedule:
  """Data-parallel batches where worker ``i`` sees its own label distribution.

  Heterogeneous workers, the setting where error feedback matters: each of
  ``num_workers`` workers draws a label distribution ``q_i ~ Dirichlet(alpha
  * 1_K)`` over the ``K`` classes once (seeded); at every step each worker's
  ``batch_size / num_workers`` examples are drawn by label from ``q_i``, then
  uniformly (with replacement) among the training examples of that label.
  The global batch is the workers' batches concatenated in worker order, so
  ``make_data_parallel_step``'s shard ``i`` is worker ``i``'s. Small
  ``alpha`` (0.1) gives each worker one or two classes; ``alpha = inf`` is
  the i.i.d. case (use :class:`BatchSchedule`). A pure function of
  ``(seed, step)``, like :class:`BatchSchedule`: resumable.

  Args:
    labels: int training labels.
    batch_size: the global batch size, divisible by ``num_workers``.
    num_workers: the data-parallel workers.
    alpha: Dirichlet concentration, ``> 0``.
    seed: the run's seed.

  Example:
    >>> import numpy as np
    >>> y = np.repeat(np.arange(10), 50)
    >>> sched = WorkerSkewedSchedule(y, 80, num_workers=8, alpha=0.1, seed=0)
    >>> sched.indices(0).shape, sched.label_distribution.shape
    ((80,), (8, 10))
  """

  def __init__(self, labels, batch_size: int, *, num_workers: int,
               alpha: float, seed: int):
    labels = np.asarray(labels)
    if batch_size < 1 or batch_size % num_workers:
      raise ValueError(f"config.train.batch_size={batch_size} must be a "
                       f"positive multiple of the {num_workers} workers")
    if not alpha > 0:
      raise ValueError(f"config.train.dirichlet_alpha={alpha!r} must be > 0 "
                       "(None: i.i.d. workers)")
    self.classes = np.unique(labels)
    self.pools = [np.flatnonzero(labels == c) for c in self.classes]
    self.num_workers = int(num_workers)
    self.per_worker = batch_size // num_workers
    self.batch_size = batch_size
    self.seed = seed
    rng = np.random.default_rng([seed, 0x5EED, 1])
    self.label_distribution = rng.dirichlet(
        np.full(len(self.classes), float(alpha)), size=self.num_workers)
    self.steps_per_epoch = max(1, len(labels) // batch_size)

  def indices(self, step: int) -> np.ndarray:
    """Example indices of training step ``step`` (worker-major order)."""
    rng = np.random.default_rng([self.seed, 0x5EED, 2, step])
    out = []
    for q in self.label_distribution:
      counts = rng.multinomial(self.per_worker, q)
      for pool, k in zip(self.pools, counts):
        if k:
          out.append(pool[rng.integers(len(pool), size=k)])
    return np.concatenate(out)
