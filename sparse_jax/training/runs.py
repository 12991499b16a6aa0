"""What every runner does with its workdir: start, re-emit a finished run, guard.

* :func:`begin` prepares the workdir and, when it already holds a COMPLETED run
  of the same config, returns that run's results so the runner re-emits them
  without training (a rerun is idempotent).
* :class:`NonFiniteGuard` stops a run after too many consecutive non-finite
  losses, before a non-finite state is checkpointed.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from absl import logging

from sparse_jax.training.files import is_primary, write_text


class RunError(RuntimeError):
  """A run cannot go on; the message names the culprit and what to do."""


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out: dict[str, Any] = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def config_differences(old: dict, new: dict, limit: int = 3) -> list[str]:
  """Up to ``limit`` ``"key: old -> new"`` lines between two config dicts."""
  a, b = _flat(old), _flat(new)
  keys = [k for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")]
  return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in keys[:limit]]


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise RunError(f"{path} is unreadable ({e}); move it away to rerun") from None


def begin(config, workdir: str) -> dict[str, Any] | None:
  """Prepares ``workdir`` for ``config``; the stored results of a finished run.

  Returns:
    The ``results.json`` of a completed run of the same config (the runner
    re-emits it and returns), else None after writing ``config.json``
    (atomically, process 0 only).

  Raises:
    RunError: the workdir cannot be created or written, or it holds a completed
      run of a different config (naming the first differing keys).
  """
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise RunError(f"cannot create the workdir {workdir}: {e.strerror or e}") from None
  if is_primary() and not os.access(workdir, os.W_OK):
    raise RunError(f"the workdir {workdir} is not writable")
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  new = json.loads(text)
  old = _read_json(os.path.join(workdir, "config.json"))
  diff = config_differences(old, new) if old is not None else []
  results = _read_json(os.path.join(workdir, "results.json"))
  if results is not None and results.get("status") == "completed":
    if diff:
      raise RunError(f"{workdir} holds a completed run of a different config "
                     f"({'; '.join(diff)}); use a new --workdir")
    logging.info("%s holds a completed run of this config: re-emitting its "
                 "results without training", workdir)
    return results
  if diff:
    logging.warning("%s: resuming with a changed config (%s)", workdir, "; ".join(diff))
  if is_primary():
    write_text(os.path.join(workdir, "config.json"), text + "\n")
  return None


class NonFiniteGuard:
  """Counts consecutive non-finite losses; raises after ``limit`` of them.

  Args:
    limit: consecutive non-finite steps tolerated (``config.train.
      max_nonfinite_steps``); 0 disables the guard.
  """

  def __init__(self, limit: int):
    self.limit = int(limit)
    self.run = 0
    self.first = None

  @property
  def finite(self) -> bool:
    """Whether the last step's loss was finite (only such states are saved)."""
    return self.run == 0

  def check(self, step: int, loss: float) -> None:
    if math.isfinite(loss):
      self.run, self.first = 0, None
      return
    self.run += 1
    self.first = step if self.first is None else self.first
    if self.limit and self.run >= self.limit:
      raise RunError(
          f"the loss was non-finite for {self.run} consecutive steps "
          f"({self.first}..{step}); the last checkpoint before them is kept. "
          "Lower the learning rate, check the data, or raise "
          "config.train.max_nonfinite_steps")
