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
