"""MNIST from local IDX files (optionally gzipped); nothing is downloaded."""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from sparse_jax.data.dataset import Dataset, check_labels, make_dataset

FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"),
           0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str) -> np.ndarray:
  """Reads one IDX file (the MNIST format), gzipped if its name ends in ``.gz``.

  Args:
    path: the file.

  Returns:
    The array with the file's dtype and shape.
  """
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except FileNotFoundError:
    raise
  except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
    raise ValueError(f"{path}: cannot be read as "
                     f"{'gzipped ' if path.endswith('.gz') else ''}IDX "
                     f"({type(e).__name__}: {e})") from None
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
    raise ValueError(f"{path} is not an IDX file (bad magic {raw[:4]!r})")
  dtype, ndim = np.dtype(_DTYPES[raw[2]]), raw[3]
  if len(raw) < 4 + 4 * ndim:
    raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes for "
                     f"{ndim} dimensions)")
  dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
  offset = 4 + 4 * ndim
  expected = int(np.prod(dims)) * dtype.itemsize
  if len(raw) - offset != expected:
    raise ValueError(f"{path}: header says {tuple(dims)} ({expected} bytes) but "
                     f"the file holds {len(raw) - offset} bytes of data")
  return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(dims)


def _find(data_dir: str, name: str) -> str:
  for candidate in (name, name + ".gz", name.replace("-idx", ".idx")):
    path = os.path.join(data_dir, candidate)
    if os.path.exists(path):
      return path
  raise FileNotFoundError(
      f"MNIST file not found: expected {os.path.join(data_dir, name)} (or .gz). "
      "Nothing is downloaded: put the four IDX files in config.data.data_dir.")


def load_mnist(data_dir: str = "") -> Dataset:
  """Loads MNIST from ``data_dir`` holding the four standard IDX files.

  Inputs are scaled to [0, 1] and shaped ``(N, 28, 28, 1)``.

  Args:
    data_dir: directory with ``train-images-idx3-ubyte[.gz]``,
      ``train-labels-idx1-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]``,
      ``t10k-labels-idx1-ubyte[.gz]``.

  Returns:
    A :class:`Dataset` with 10 classes.

  Raises:
    FileNotFoundError: naming the expected path of a missing file.
    ValueError: naming the file that is corrupt (not IDX, bad gzip, wrong
      size) or holds a label outside [0, 10).
  """
  if not data_dir:
    raise FileNotFoundError("config.data.data_dir is empty: MNIST is read from local "
                            "IDX files and never downloaded")
  paths = {k: _find(data_dir, v) for k, v in FILES.items()}
  arrays = {k: read_idx(path) for k, path in paths.items()}
  for split in ("y_train", "y_test"):
    check_labels(arrays[split], 10, paths[split])
  for split in ("train", "test"):
    images = arrays[f"x_{split}"]
    if images.ndim != 3:
      raise ValueError(f"MNIST {split} images must be (N, H, W), got {images.shape}")
    arrays[f"x_{split}"] = images.astype(np.float32)[..., None] / 255.0
  return make_dataset(arrays["x_train"], arrays["y_train"], arrays["x_test"],
                      arrays["y_test"], 10, "mnist")
