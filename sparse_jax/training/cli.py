"""Command-line entry for the experiment scripts: one line per failure.

``run_main(main)`` runs an absl ``main``; any error (a missing or corrupt file,
an unknown variant, a bad value, an unwritable workdir, a corrupt checkpoint)
exits with status 1 and ONE line naming the culprit. ``--verbosity=1`` shows
the traceback instead. A ``SystemExit`` (e.g. preemption's 143) passes through.
"""

from __future__ import annotations

import re
import sys
import traceback
from typing import Callable

from absl import app, flags, logging


def _verbose() -> bool:
  if flags.FLAGS.is_parsed():
    return flags.FLAGS.verbosity >= 1
  for arg in sys.argv[1:]:  # flag parsing itself failed
    for prefix in ("--verbosity=", "-v="):
      if arg.startswith(prefix):
        try:
          return int(arg[len(prefix):]) >= 1
        except ValueError:
          return False
  return False


def _is_config_override_error(exc: BaseException) -> bool:
  """A mistyped ``--config.x.y=`` key fails inside ml_collections' flag parser."""
  frames = traceback.extract_tb(exc.__traceback__)
  return any("config_flags" in f.filename for f in frames)


def _missing_config(text: str) -> str | None:
  """The one line for ml_collections' "config file not found", if it is that."""
  missing = re.search(r"No such file or directory: (\S+)", text)
  if missing and "config" in text.lower():
    return f"error: config file not found: {missing.group(1)}"
  return None


def describe(exc: BaseException) -> str:
  """``exc`` as one line (the config-override errors of ml_collections cleaned)."""
  message = str(exc.args[0] if len(exc.args) == 1 else exc)
  if _missing_config(message):
    return _missing_config(message)
  if _is_config_override_error(exc):
    message = message.replace("\\n", " ").replace("\\", "").replace("'", "")
    message = " ".join(message.split()).replace(" Did you", ". Did you")
    return f"error in a --config override: {message}"
  message = " ".join(message.split())
  if isinstance(exc, (FileNotFoundError, PermissionError)) and exc.filename:
    message = f"{exc.strerror}: {exc.filename}"
  return f"error: {message or type(exc).__name__}"


def run_main(main: Callable) -> None:
  """``absl.app.run(main)``, turning any exception into one line and exit 1.

  Without an explicit ``--verbosity`` only warnings and errors are logged, so
  the output is the runner's progress lines and results table.
  """
  def quiet_main(argv):
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    return main(argv)

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      # ml_collections puts the config file's whole traceback in the message:
      # its last line is the error itself.
      lines = [line.strip() for line in str(e).splitlines() if line.strip()]
      if _missing_config(str(e)):
        sys.exit(_missing_config(str(e)))
      if len(lines) == 1:
        sys.exit(f"error: {lines[0]}")
      first = lines[0].split(":", 1)[0] if lines else "flags"
      sys.exit(f"error in {first}: {lines[-1] if lines else e}")

  try:
    app.run(quiet_main, flags_parser=parse)
  except Exception as e:  # noqa: BLE001 - every failure becomes one line
    if _verbose():
      raise
    sys.exit(describe(e) + "  (--verbosity=1 shows the traceback)")
