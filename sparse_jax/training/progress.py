"""Progress lines with throughput and ETA for long runs (printed to stdout)."""

from __future__ import annotations

import time

from sparse_jax.training.files import is_primary


def format_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
  """Prints ``step/total, steps/s, elapsed, ETA`` at most every ``every_secs`` s.

  One line per update, on process 0 only; the runners' default output is these
  lines and the results table.

  Args:
    total: the last step of the run.
    start: the step the run (re)starts from.
    every_secs: minimum seconds between two log lines.
  """

  def __init__(self, total: int, start: int = 0, *, every_secs: float = 10.0):
    self.total, self.start, self.every_secs = total, start, every_secs
    self.t0 = self.last = time.perf_counter()

  def eta(self, step: int) -> float:
    done = step - self.start
    if done <= 0:
      return float("nan")
    return (time.perf_counter() - self.t0) / done * (self.total - step)

  def update(self, step: int, extra: str = "") -> None:
    now = time.perf_counter()
    if now - self.last < self.every_secs and step < self.total:
      return
    self.last = now
    elapsed = now - self.t0
    rate = (step - self.start) / max(elapsed, 1e-9)
    eta = self.eta(step)
    eta_text = format_seconds(eta) if eta == eta else "?"
    if is_primary():
      print(f"step {step}/{self.total} ({100.0 * step / max(self.total, 1):.0f}%)  "
            f"{rate:.1f} steps/s  elapsed {format_seconds(elapsed)}  ETA {eta_text}  "
            f"{extra}".rstrip(), flush=True)
