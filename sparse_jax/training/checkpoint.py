"""Verified orbax checkpoints of the whole :class:`TrainState` pytree.

Each save first writes a SHA-256 digest of every array (path, dtype, shape and
bytes) to ``workdir/checkpoint_digests/<step>.json``, then the orbax checkpoint
(which orbax finalises atomically), then adds the SHA-256 of every file orbax
wrote. A restore first checks those files (a flipped byte or a truncated file
is caught before orbax reads it), then recomputes the digest of the arrays it
read. A checkpoint that fails is reported in one line, moved to
``workdir/corrupt_checkpoints/`` and the next older one is tried. Nothing is
ever restored silently wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from sparse_jax.training.files import is_primary, write_json


class CheckpointError(RuntimeError):
  """No checkpoint of a run can be restored intact."""


def tree_digest(tree: Any) -> str:
  """SHA-256 over every leaf's path, dtype, shape and bytes (flatten order).

  Arrays spread over several processes are gathered first (every process must
  call this, as for a save).
  """
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(leaf, jax.Array):
      if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
      if not leaf.is_fully_addressable:
        from jax.experimental import multihost_utils
        leaf = multihost_utils.process_allgather(leaf, tiled=True)
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _file_digests(root: str) -> dict[str, str]:
  """``{relative path: sha256}`` of every file under ``root``."""
  out = {}
  for directory, _, names in os.walk(root):
    for name in names:
      path = os.path.join(directory, name)
      h = hashlib.sha256()
      with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          h.update(block)
      out[os.path.relpath(path, root)] = h.hexdigest()
  return out


def _file_problem(expected: dict[str, str], actual: dict[str, str]) -> str | None:
  for name, digest in sorted(expected.items()):
    if name not in actual:
      return f"its file {name} is missing"
    if actual[name] != digest:
      return f"its file {name} changed since it was written"
  return None


def _first_line(e: BaseException, limit: int = 160) -> str:
  text = " ".join(str(e).split())
  text = text if len(text) <= limit else text[:limit] + "..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


class Checkpointer:
  """Saves and restores one run's state under ``workdir/checkpoints``, verified.

  Args:
    workdir: the run directory.
    max_to_keep: how many recent checkpoints to keep (at least 2, so a corrupt
      latest one has an intact one to fall back to).

  Example::

    ckpt = Checkpointer(workdir)
    state = ckpt.restore_latest(state)   # unchanged when nothing was saved yet
    ckpt.save(int(state.step), state)
  """

  def __init__(self, workdir: str, *, max_to_keep: int = 2):
    if max_to_keep < 2:
      raise ValueError(f"max_to_keep must be >= 2 (a fallback), got {max_to_keep}")
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    self.digests = os.path.join(self.workdir, "checkpoint_digests")
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def _digest_path(self, step: int) -> str:
    return os.path.join(self.digests, f"{step}.json")

  def save(self, step: int, state: Any) -> None:
    """Saves ``state`` (any NamedTuple/dict pytree of arrays) at ``step``; blocks."""
    if step in self._manager.all_steps():
      return
    tree = _to_tree(state)
    digest = tree_digest(tree)
    if is_primary():  # the digest first: a checkpoint never exists without one
      write_json(self._digest_path(step), {"step": int(step), "sha256": digest})
    self._manager.save(step, args=ocp.args.StandardSave(tree), force=True)
    self._manager.wait_until_finished()
    if is_primary():
      # the files as written, checked before orbax reads them...
      write_json(self._digest_path(step),
                 {"step": int(step), "sha256": digest,
                  "files": _file_digests(self._step_dir(step))})
      # ...and no digests of checkpoints orbax has rotated out
      keep = {f"{s}.json" for s in self._manager.all_steps()} | {f"{step}.json"}
      for name in os.listdir(self.digests):
        if name.endswith(".json") and name not in keep:
          os.remove(os.path.join(self.digests, name))

  def _restore(self, step: int, template: Any) -> tuple[Any, str | None]:
    """``(restored tree, problem)``; problem is None when it verified."""
    try:
      with open(self._digest_path(step)) as f:
        record = json.load(f)
      expected = record["sha256"]
    except FileNotFoundError:
      record = expected = None
    except (OSError, ValueError, KeyError, TypeError) as e:
      return None, f"its digest file is unreadable ({_first_line(e)})"
    if record is not None and "files" in record:
      problem = _file_problem(record["files"], _file_digests(self._step_dir(step)))
      if problem is not None:
        return None, problem
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_tree(template))
    try:
      restored = self._manager.restore(step,
                                       args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # noqa: BLE001 - any read failure means corrupt
      return None, f"unreadable ({_first_line(e)})"
    if expected is None:
      absl_logging.warning("checkpoint %s has no digest (written by an older "
                           "sparse_jax); restored unverified", self._step_dir(step))
      return restored, None
    if tree_digest(restored) != expected:
      return None, "its arrays do not match the digest written with it"
    return restored, None

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _quarantine(self, step: int) -> None:
    if not is_primary():
      return
    target = os.path.join(self.workdir, "corrupt_checkpoints",
                          f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.exists(self._step_dir(step)):
      shutil.move(self._step_dir(step), target)
    if os.path.exists(self._digest_path(step)):
      os.remove(self._digest_path(step))

  def restore_latest(self, template: Any) -> Any:
    """The newest INTACT checkpoint restored into ``template``'s structure.

    Returns ``template`` when nothing was saved yet. A checkpoint that cannot be
    read or fails its digest is logged in one line naming its path and moved
    to ``workdir/corrupt_checkpoints/``; the next older one is tried.

    Raises:
      CheckpointError: checkpoints exist but none is intact (they are left in
        place; move ``workdir/checkpoints`` away to start the run over).
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    problems = []
    for step in steps:
      restored, problem = self._restore(step, template)
      if problem is None:
        for bad, why in problems:   # one line each, then moved aside
          absl_logging.warning("checkpoint %s is corrupt: %s; restored step %d",
                               self._step_dir(bad), why, step)
          self._quarantine(bad)
        if problems:
          self._manager.reload()
        if hasattr(template, "_fields"):
          return type(template)(**restored)
        return restored
      problems.append((step, problem))
    if problems:
      self.close()   # (orbax's threads would complain at exit)
      detail = "; ".join(f"step {s}: {p}" for s, p in problems)
      raise CheckpointError(
          f"no intact checkpoint in {self.directory} ({detail}); move that "
          "directory away to start the run over")
    return template

  def close(self) -> None:
    self._manager.close()


def _to_tree(state: Any) -> Any:
  return state._asdict() if hasattr(state, "_asdict") else state


def quiet_orbax_logging() -> None:
  """Drops orbax's INFO chatter (a dozen lines per checkpoint) from the absl log.

  Orbax's warnings and errors, and every other module's INFO lines, still show.
  """
  logging.getLogger("absl").addFilter(
      lambda r: r.levelno >= logging.WARNING or "orbax" not in r.pathname)
