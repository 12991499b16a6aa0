"""Metric writing: JSONL (one record per line) and TensorBoard event files."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np


def _plain(value: Any) -> Any:
  if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "dtype"):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()
  return value


class MetricWriter:
  """Writes ``{"step", "split", **metrics}`` records to ``metrics.jsonl`` and TensorBoard.

  TensorBoard events go to ``workdir/tensorboard`` via tensorboardX (no TensorFlow
  needed); scalar tags are ``split/name``.

  Args:
    workdir: the run directory.
    tensorboard: also write TensorBoard events.
    enabled: False makes every method a no-op (non-primary processes of a
      multi-process run).
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    self._tb = None
    if tensorboard and enabled:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def truncate_after(self, step: int) -> None:
    """Drops records past ``step`` (a resumed run rewrites them identically)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(self.path, "w") as f:
      f.writelines(keep)

  def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split,
              **{k: _plain(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for name, value in record.items():
        if name not in ("step", "split") and isinstance(value, (int, float)):
          self._tb.add_scalar(f"{split}/{name}", value, int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All records of ``workdir/metrics.jsonl``."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
