"""Metric writing: JSONL (one record per line) and TensorBoard event files.

Durability: each record is appended as one line, so a kill can at worst leave
a torn LAST line, which readers drop with a warning. The resume-time rewrite
(:meth:`MetricWriter.truncate_after`) is atomic. TensorBoard events are flushed
by :meth:`MetricWriter.flush` (the loop calls it at every checkpoint and on
SIGTERM), and a resumed writer purges the events past the resume step.
"""

from __future__ import annotations

import json
import logging as pylogging
import os
import re
import time
from typing import Any, Mapping

import numpy as np
from absl import logging

from sparse_jax.training.files import write_text

_KEY = re.compile(r"\['([^']*)'\]|\[(\d+)\]|\.([A-Za-z_]\w*)")
_ILLEGAL = re.compile(r"[^A-Za-z0-9_./-]")


def tag_name(name: str) -> str:
  """A TensorBoard-legal tag: ``['hidden'][0]['kernel']/x`` -> ``hidden.0.kernel/x``.

  ``jax.tree_util.keystr`` parts become dot-separated names; any character
  TensorBoard rejects becomes ``_``.
  """
  def dotted(part: str) -> str:
    keys = [a or b or c for a, b, c in _KEY.findall(part)]
    rest = _KEY.sub("", part)
    return ".".join(keys) if keys and not rest else part
  return _ILLEGAL.sub("_", "/".join(dotted(p) for p in name.split("/")))


def _plain(value: Any) -> Any:
  if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "dtype"):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()
  return value


def _parse_lines(path: str) -> list[dict[str, Any]]:
  """The records of a JSONL file; a torn (undecodable) LAST line is dropped.

  Raises:
    ValueError: naming the file and line when an earlier line is corrupt.
  """
  with open(path) as f:
    lines = [line for line in f.read().split("\n") if line.strip()]
  records = []
  for i, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:
        logging.warning("%s: dropped a torn last line (a kill mid-write): %.60r",
                        path, line)
        break
      raise ValueError(f"{path}: line {i + 1} is not JSON ({e.msg}); the file "
                       "is corrupt beyond a torn last line") from None
  return records


class _EventFile:
  """TensorBoard scalars written synchronously (tensorboardX's event format).

  tensorboardX's ``SummaryWriter`` queues events for a background thread and
  its ``flush`` does not drain that queue, so a SIGKILL loses what is queued;
  here every ``flush`` puts all events so far on disk.
  """

  def __init__(self, logdir: str, purge_step: int | None):
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto import event_pb2
    from tensorboardX.summary import scalar
    # A NaN metric (e.g. error_ratio on a skipped step) is recorded as NaN; do
    # not let tensorboardX warn once per scalar (the run reports it once).
    pylogging.getLogger("tensorboardX.x2num").setLevel(pylogging.ERROR)
    os.makedirs(logdir, exist_ok=True)
    self._event, self._scalar = event_pb2, scalar
    self._writer = EventsWriter(os.path.join(logdir, "events"))
    if purge_step:  # TensorBoard hides older events at steps >= purge_step
      self._writer.write_event(event_pb2.Event(
          step=purge_step, wall_time=time.time(),
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    self._writer.write_event(self._event.Event(
        wall_time=time.time(), step=step, summary=self._scalar(tag, value)))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class MetricWriter:
  """Writes ``{"step", "split", **metrics}`` records to ``metrics.jsonl`` and TensorBoard.

  TensorBoard events go to ``workdir/tensorboard`` in tensorboardX's format
  (no TensorFlow needed), written synchronously; scalar tags are
  ``split/name`` made legal with :func:`tag_name`. The JSONL keys are the same
  names.

  Args:
    workdir: the run directory.
    tensorboard: also write TensorBoard events.
    enabled: False makes every method a no-op (non-primary processes of a
      multi-process run).
    start_step: the step a resumed run restarts from; TensorBoard discards
      the events the interrupted run logged past it.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool = True,
               start_step: int = 0):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if tensorboard:  # a resumed run rewrites the steps after start_step
      self._tb = _EventFile(os.path.join(workdir, "tensorboard"),
                            purge_step=start_step + 1 if start_step else None)

  def truncate_after(self, step: int) -> None:
    """Drops records past ``step`` (a resumed run rewrites them identically).

    The rewrite is atomic; a torn last line is dropped with a warning.
    """
    if not self.enabled or not os.path.exists(self.path):
      return
    records = _parse_lines(self.path)
    keep = [r for r in records if r["step"] <= step]
    write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))

  def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split,
              **{tag_name(k): _plain(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for name, value in record.items():
        if name not in ("step", "split") and isinstance(value, (int, float)):
          self._tb.add_scalar(tag_name(f"{split}/{name}"), value, int(step))

  def flush(self) -> None:
    """Puts every TensorBoard event so far on disk."""
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All records of ``workdir/metrics.jsonl`` (a torn last line is dropped)."""
  return _parse_lines(os.path.join(workdir, "metrics.jsonl"))
