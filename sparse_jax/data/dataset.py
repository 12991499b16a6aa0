"""The in-memory dataset container shared by every loader."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Dataset(NamedTuple):
  """Train/test arrays of a classification task, held in host memory.

  Attributes:
    x_train: float32 inputs ``(N, *input_shape)``.
    y_train: int32 labels ``(N,)``, or ``(N, T)`` for a sequence task (a class
      per position, e.g. the next character).
    x_test: float32 inputs ``(N_test, *input_shape)``.
    y_test: int32 labels ``(N_test,)`` (or ``(N_test, T)``).
    num_classes: number of classes.
    name: a short description.
  """
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  name: str

  @property
  def input_shape(self) -> tuple[int, ...]:
    return tuple(self.x_train.shape[1:])


def check_labels(labels, num_classes: int, where: str, *,
                 sequence: bool = False) -> None:
  """Raises a ValueError naming ``where`` unless labels are ints in [0, num_classes).

  Labels must be a 1-D integer array (one class index per example), or 2-D
  ``(N, T)`` with ``sequence`` (one class per position).
  """
  y = np.asarray(labels)
  if y.ndim != (2 if sequence else 1):
    what = "2-D (examples, positions)" if sequence else "1-D"
    raise ValueError(f"{where}: labels must be {what} class indices, got shape {y.shape}")
  if y.size and not np.issubdtype(y.dtype, np.integer):
    if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
      raise ValueError(f"{where}: labels must be integer class indices, got "
                       f"{y.dtype} values such as {y[~(y == np.round(y))][:1]}")
  flat = y.ravel()
  bad = np.flatnonzero((flat < 0) | (flat >= num_classes)) if y.size else []
  if len(bad):
    at = np.unravel_index(bad[0], y.shape)
    at = at[0] if y.ndim == 1 else tuple(int(i) for i in at)
    raise ValueError(f"{where}: label {flat[bad[0]].item()!r} at index {at} is outside "
                     f"[0, {num_classes}) ({len(bad)} such labels)")


def make_dataset(x_train, y_train, x_test, y_test, num_classes: int,
                 name: str, *, sequence: bool = False) -> Dataset:
  """Builds a :class:`Dataset`, casting to float32 / int32 and checking shapes.

  ``sequence``: labels are ``(N, T)``, one class per input position (``T``
  must equal the inputs' second axis).

  Raises:
    ValueError: mismatched counts or shapes, or a label outside
      ``[0, num_classes)`` (naming the split, the value and its index).
  """
  check_labels(y_train, num_classes, f"{name} train labels", sequence=sequence)
  check_labels(y_test, num_classes, f"{name} test labels", sequence=sequence)
  arrays = [np.asarray(x_train, np.float32), np.asarray(y_train, np.int32),
            np.asarray(x_test, np.float32), np.asarray(y_test, np.int32)]
  if arrays[0].shape[0] != arrays[1].shape[0]:
    raise ValueError(f"{name}: {arrays[0].shape[0]} train inputs but "
                     f"{arrays[1].shape[0]} labels")
  if arrays[2].shape[0] != arrays[3].shape[0]:
    raise ValueError(f"{name}: {arrays[2].shape[0]} test inputs but "
                     f"{arrays[3].shape[0]} labels")
  if sequence and arrays[0].shape[1:2] != arrays[1].shape[1:]:
    raise ValueError(f"{name}: train inputs {arrays[0].shape} and per-position "
                     f"labels {arrays[1].shape} differ in length")
  if arrays[0].shape[1:] != arrays[2].shape[1:]:
    raise ValueError(f"{name}: train inputs {arrays[0].shape[1:]} and test inputs "
                     f"{arrays[2].shape[1:]} differ in shape")
  return Dataset(*arrays, num_classes=int(num_classes), name=name)
