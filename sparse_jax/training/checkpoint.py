"""Orbax checkpoints of the whole :class:`TrainState` pytree."""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores one run's state under ``workdir/checkpoints``.

  Args:
    workdir: the run directory.
    max_to_keep: how many recent checkpoints to keep.

  Example::

    ckpt = Checkpointer(workdir)
    state = ckpt.restore_latest(state)   # unchanged when nothing was saved yet
    ckpt.save(int(state.step), state)
  """

  def __init__(self, workdir: str, *, max_to_keep: int = 2):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any) -> None:
    """Saves ``state`` (any NamedTuple/dict pytree of arrays) at ``step``; blocks."""
    if self._manager.latest_step() == step:
      return
    self._manager.save(step, args=ocp.args.StandardSave(_to_tree(state)), force=True)
    self._manager.wait_until_finished()

  def restore_latest(self, template: Any) -> Any:
    """The latest checkpoint restored into ``template``'s structure, or ``template``."""
    step = self._manager.latest_step()
    if step is None:
      return template
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_tree(template))
    restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    if hasattr(template, "_fields"):
      return type(template)(**restored)
    return restored

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
