"""Atomic file writes for the runners: a reader never sees half a file.

Every file a runner writes (``config.json``, ``results.json``, the rewrite of
``metrics.jsonl``, ``sweep.json``, checkpoint digests, figures) goes through
:func:`write_bytes`: the text is written to a temporary file in the same
directory, flushed to disk, and renamed over the target, so a kill at any moment
leaves either the old file or the new one. Only process 0 of a multi-process run
writes (:func:`is_primary`).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import jax


def is_primary() -> bool:
  """True on process 0, the only process that writes run files."""
  return jax.process_index() == 0


def write_text(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` atomically (temp file + fsync + rename).

  Raises:
    OSError: naming ``path`` when its directory is not writable.
  """
  write_bytes(path, text.encode())


def write_bytes(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically (temp file + fsync + rename).

  Raises:
    OSError: naming ``path`` when its directory is not writable.
  """
  directory = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-",
                               suffix="-" + os.path.basename(path))
  except OSError as e:
    raise OSError(f"cannot write {path}: {e.strerror or e}") from e
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json(path: str, obj: Any) -> None:
  """``obj`` as indented, key-sorted JSON, written atomically."""
  write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
