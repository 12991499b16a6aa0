"""CIFAR-10 from the local python-pickle batches; nothing is downloaded."""

from __future__ import annotations

import os
import pickle

import numpy as np

from sparse_jax.data.dataset import Dataset, check_labels, make_dataset

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
SUBDIR = "cifar-10-batches-py"


def read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads one pickled CIFAR-10 batch into ``(images (N, 32, 32, 3) uint8, labels)``."""
  try:
    with open(path, "rb") as f:
      batch = pickle.load(f, encoding="bytes")
  except FileNotFoundError:
    raise
  except Exception as e:  # noqa: BLE001 - unpickling fails in many ways
    raise ValueError(f"{path}: not a readable CIFAR-10 pickle batch "
                     f"({type(e).__name__}: {e})") from None
  if not isinstance(batch, dict):
    raise ValueError(f"{path}: not a CIFAR-10 batch (a {type(batch).__name__})")
  data = batch.get(b"data", batch.get("data"))
  labels = batch.get(b"labels", batch.get("labels"))
  if data is None or labels is None:
    raise ValueError(f"{path}: not a CIFAR-10 batch (no 'data'/'labels' keys)")
  data = np.asarray(data, np.uint8)
  if data.ndim != 2 or data.shape[1] != 3072:
    raise ValueError(f"{path}: data must be (N, 3072), got {data.shape}")
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  check_labels(labels, 10, path)
  if len(labels) != len(images):
    raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels")
  return images, np.asarray(labels, np.int32)


def load_cifar10(data_dir: str = "", *, train_batches: tuple[str, ...] = TRAIN_BATCHES
                 ) -> Dataset:
  """Loads CIFAR-10 from ``data_dir`` (or ``data_dir/cifar-10-batches-py``).

  Inputs are scaled to [0, 1], shaped ``(N, 32, 32, 3)`` (NHWC).

  Args:
    data_dir: directory holding ``data_batch_1..5`` and ``test_batch``.
    train_batches: which training batch files to read.

  Returns:
    A :class:`Dataset` with 10 classes.

  Raises:
    FileNotFoundError: naming the expected path of a missing batch.
  """
  if not data_dir:
    raise FileNotFoundError("config.data.data_dir is empty: CIFAR-10 is read from "
                            "local pickle batches and never downloaded")
  root = data_dir
  if not os.path.exists(os.path.join(root, TEST_BATCH)) and os.path.isdir(
      os.path.join(root, SUBDIR)):
    root = os.path.join(root, SUBDIR)

  def read(name):
    path = os.path.join(root, name)
    if not os.path.exists(path):
      raise FileNotFoundError(f"CIFAR-10 batch not found: expected {path}. Nothing "
                              "is downloaded: unpack cifar-10-python there.")
    return read_cifar_batch(path)

  train = [read(name) for name in train_batches]
  x_test, y_test = read(TEST_BATCH)
  x_train = np.concatenate([x for x, _ in train])
  y_train = np.concatenate([y for _, y in train])
  return make_dataset(x_train / 255.0, y_train, x_test / 255.0, y_test, 10,
                      "cifar10")
