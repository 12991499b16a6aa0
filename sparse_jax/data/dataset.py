"""The in-memory dataset container shared by every loader."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Dataset(NamedTuple):
  """Train/test arrays of a classification task, held in host memory.

  Attributes:
    x_train: float32 inputs ``(N, *input_shape)``.
    y_train: int32 labels ``(N,)``.
    x_test: float32 inputs ``(N_test, *input_shape)``.
    y_test: int32 labels ``(N_test,)``.
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


def make_dataset(x_train, y_train, x_test, y_test, num_classes: int,
                 name: str) -> Dataset:
  """Builds a :class:`Dataset`, casting to float32 / int32 and checking shapes."""
  arrays = [np.asarray(x_train, np.float32), np.asarray(y_train, np.int32),
            np.asarray(x_test, np.float32), np.asarray(y_test, np.int32)]
  if arrays[0].shape[0] != arrays[1].shape[0]:
    raise ValueError(f"{name}: {arrays[0].shape[0]} train inputs but "
                     f"{arrays[1].shape[0]} labels")
  if arrays[2].shape[0] != arrays[3].shape[0]:
    raise ValueError(f"{name}: {arrays[2].shape[0]} test inputs but "
                     f"{arrays[3].shape[0]} labels")
  if arrays[0].shape[1:] != arrays[2].shape[1:]:
    raise ValueError(f"{name}: train inputs {arrays[0].shape[1:]} and test inputs "
                     f"{arrays[2].shape[1:]} differ in shape")
  return Dataset(*arrays, num_classes=int(num_classes), name=name)
