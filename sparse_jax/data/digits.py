"""scikit-learn's handwritten digits: 1,797 8x8 grey images shipped with sklearn."""

from __future__ import annotations

import numpy as np

from sparse_jax.data.dataset import Dataset, make_dataset


def load_digits(*, num_train: int = 1400, split_seed: int = 0) -> Dataset:
  """Loads sklearn's digits with a fixed, seeded train/test split.

  Inputs are ``data / 16`` (float32 in [0, 1]) shaped ``(N, 8, 8, 1)``. The split is
  ``np.random.default_rng(split_seed).permutation(1797)``: the first ``num_train``
  examples train, the rest test (1,400 / 397 by default, the protocol of
  ALGORITHMS.md D).

  Args:
    num_train: training examples (the rest are the test set).
    split_seed: seed of the split permutation.

  Returns:
    A :class:`Dataset` with 10 classes.
  """
  from sklearn.datasets import load_digits as sk_load_digits

  bunch = sk_load_digits()
  x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
  y = bunch.target.astype(np.int32)
  if not 0 < num_train < len(x):
    raise ValueError(f"config.data.num_train={num_train} must be in (0, {len(x)})")
  order = np.random.default_rng(split_seed).permutation(len(x))
  train, test = order[:num_train], order[num_train:]
  return make_dataset(x[train], y[train], x[test], y[test], 10, "digits")
