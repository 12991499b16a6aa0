"""Datasets and batching. Nothing is downloaded, ever.

``load_dataset(config.data)`` dispatches on ``name``: "digits" (sklearn's bundled
digits, the default), "mnist" / "cifar10" (local files in ``data_dir``), "teacher"
(synthetic teacher-student task), "python_text" (next-character prediction on
the standard library's own sources, shipped with every Python).
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

from sparse_jax.data.batching import BatchSchedule, WorkerSkewedSchedule
from sparse_jax.data.batching import iterate_batches
from sparse_jax.data.cifar import load_cifar10, read_cifar_batch
from sparse_jax.data.dataset import Dataset, make_dataset
from sparse_jax.data.digits import load_digits
from sparse_jax.data.mnist import load_mnist, read_idx
from sparse_jax.data.pytext import load_python_text
from sparse_jax.data.teacher import make_teacher_task

DATASETS = ("digits", "mnist", "cifar10", "teacher", "python_text")
"""The dataset names ``config.data.name`` (and :func:`load_dataset`) accepts."""


_LOADERS = {"digits": load_digits, "mnist": load_mnist, "cifar10": load_cifar10,
            "teacher": make_teacher_task, "python_text": load_python_text}


def load_dataset(spec: Mapping[str, Any]) -> Dataset:
  """Loads the dataset described by a config block (``config.data``).

  Args:
    spec: mapping with ``name`` and the keyword arguments of that dataset's loader:
      digits: ``num_train``, ``split_seed`` (:func:`load_digits`); mnist / cifar10:
      ``data_dir``; teacher: those of :func:`make_teacher_task`; python_text:
      those of :func:`load_python_text`.

  Returns:
    A :class:`Dataset`.
  """
  spec = dict(spec)
  name = spec.pop("name", None)
  if name not in _LOADERS:
    raise ValueError(f"config.data.name={name!r} is not a dataset; choose one of "
                     f"{list(DATASETS)}")
  loader = _LOADERS[name]
  known = set(inspect.signature(loader).parameters)
  unknown = sorted(set(spec) - known)
  if unknown:
    raise ValueError(f"config.data has keys {unknown} that dataset {name!r} does not "
                     f"take; it takes {sorted(known)}")
  if "teacher_hidden" in spec:
    spec["teacher_hidden"] = tuple(spec["teacher_hidden"])
  return loader(**spec)


__all__ = ["BatchSchedule", "WorkerSkewedSchedule", "DATASETS", "Dataset", "iterate_batches", "load_cifar10",
           "load_dataset", "load_digits", "load_mnist", "load_python_text", "make_dataset",
           "make_teacher_task", "read_cifar_batch", "read_idx"]
