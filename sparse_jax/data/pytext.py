"""Character-level text that ships with every Python: the standard library's sources.

A fixed, sorted list of standard-library modules is read as bytes from the
running interpreter's ``Lib`` directory (nothing is downloaded); whole files are
held out for the test split. Characters are bytes: ASCII keeps its code, every
other byte becomes 0 (a vocabulary of 128). The text differs slightly between
Python releases, so the loader records the SHA-256 of what it read in the
dataset's name; :data:`REFERENCE_SHA256` is the corpus of Python 3.11.7 that the
reported results used.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig

import numpy as np
from absl import logging

from sparse_jax.data.dataset import Dataset, make_dataset

TRAIN_MODULES = ("argparse", "ast", "calendar", "configparser", "csv", "dataclasses",
                 "datetime", "difflib", "enum", "functools", "gettext", "heapq",
                 "inspect", "ipaddress", "os", "pickle", "random", "shutil", "string",
                 "subprocess", "tarfile", "threading", "typing", "uuid")
"""Modules (``<name>.py`` in the standard library) whose text trains."""

TEST_MODULES = ("fractions", "pprint", "statistics", "textwrap", "tokenize")
"""Held-out modules: the test split (about 9% of the characters)."""

VOCAB_SIZE = 128
"""Byte values 0..127; non-ASCII bytes map to 0."""

REFERENCE_SHA256 = "2524c7d50c8834916d929f3e770dd440d97558ba6c3e246ab9e0e1cba7030e1f"
"""SHA-256 of the corpus (train text, a NUL byte, test text) of Python 3.11.7."""
REFERENCE_PYTHON = "3.11.7"


def stdlib_dir() -> str:
  """The running interpreter's standard-library directory."""
  return sysconfig.get_paths()["stdlib"]


def _read(root: str, modules: tuple[str, ...]) -> bytes:
  chunks = []
  for name in sorted(modules):
    path = os.path.join(root, f"{name}.py")
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"config.data (python_text): {path} does not exist; this Python "
          f"({sys.version.split()[0]}) lays out its standard library differently "
          "- pass root= a directory with the listed modules, or other modules")
    with open(path, "rb") as f:
      chunks.append(f.read())
  return b"\n".join(chunks)


def encode(text: bytes) -> np.ndarray:
  """Bytes -> int32 codes in ``[0, 128)`` (non-ASCII bytes become 0)."""
  codes = np.frombuffer(text, np.uint8).astype(np.int32)
  return np.where(codes < VOCAB_SIZE, codes, 0)


def decode(codes) -> str:
  """Codes -> text (code 0 shows as ``"?"``)."""
  codes = np.asarray(codes).astype(np.int64).ravel().tolist()
  return "".join(chr(c) if c else "?" for c in codes)


def _windows(codes: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Non-overlapping ``(x, y)`` windows: ``y`` is ``x`` shifted by one character."""
  count = (len(codes) - 1) // seq_len
  if count < 1:
    raise ValueError(f"python_text: {len(codes)} characters are too few for one "
                     f"window of seq_len={seq_len}")
  x = codes[:count * seq_len].reshape(count, seq_len)
  y = codes[1:count * seq_len + 1].reshape(count, seq_len)
  return x, y


def load_python_text(*, seq_len: int = 64, root: str | None = None,
                     train_modules: tuple[str, ...] = TRAIN_MODULES,
                     test_modules: tuple[str, ...] = TEST_MODULES) -> Dataset:
  """Next-character prediction on the standard library's own sources.

  Args:
    seq_len: characters per example; ``x`` holds ``seq_len`` codes and ``y`` the
      next character at every position (labels of shape ``(N, seq_len)``).
    root: directory holding ``<module>.py`` files (default: this interpreter's
      standard library).
    train_modules / test_modules: the modules of each split (disjoint).

  Returns:
    A :class:`Dataset` with float32 codes ``x`` of shape ``(N, seq_len)``,
    int32 labels ``(N, seq_len)``, 128 classes, and a name carrying the first
    12 hex digits of the corpus' SHA-256 (compare with :data:`REFERENCE_SHA256`).
    Held-out bits per character are ``test_loss / ln 2``.
  """
  if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
    raise ValueError(f"config.data.seq_len must be an int >= 1, got {seq_len!r}")
  overlap = sorted(set(train_modules) & set(test_modules))
  if overlap:
    raise ValueError(f"python_text: modules {overlap} are in both splits")
  default_corpus = (root is None and tuple(train_modules) == TRAIN_MODULES
                    and tuple(test_modules) == TEST_MODULES)
  root = stdlib_dir() if root is None else root
  train_text, test_text = _read(root, tuple(train_modules)), _read(root, tuple(test_modules))
  digest = hashlib.sha256(train_text + b"\0" + test_text).hexdigest()
  if default_corpus and digest != REFERENCE_SHA256:
    logging.warning("python_text: this Python's standard library (%s) differs from "
                    "the reference corpus of Python %s (sha256 %s... vs %s...); bits "
                    "per character are comparable only roughly", root,
                    REFERENCE_PYTHON, digest[:12], REFERENCE_SHA256[:12])
  x_train, y_train = _windows(encode(train_text), seq_len)
  x_test, y_test = _windows(encode(test_text), seq_len)
  return make_dataset(x_train, y_train, x_test, y_test, VOCAB_SIZE,
                      f"python_text-{digest[:12]}", sequence=True)
