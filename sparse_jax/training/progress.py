"""Progress logging with throughput and ETA for long runs."""

from __future__ import annotations

import time

from absl import logging


def format_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
  """Logs ``step/total, steps/s, elapsed, ETA`` at most every ``every_secs`` seconds.

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
    logging.info("step %d/%d (%.0f%%)  %.1f steps/s  elapsed %s  ETA %s  %s", step,
                 self.total, 100.0 * step / max(self.total, 1), rate,
                 format_seconds(elapsed), eta_text, extra)
