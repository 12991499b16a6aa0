"""Shared timing helper for the benchmarks: warm-up, repeats, min/median, ratios.

Machines are noisy, so every benchmark reports RATIOS against a reference measured
in the same run (e.g. mask projection time / one elementwise pass over the same
array), and writes its numbers as JSON under ``benchmarks/results/``.

Example::

    from benchmarks.timing import Report, time_fn
    report = Report("my_benchmark")
    ref = time_fn(lambda: jnp.abs(x) * 2.0)
    t = time_fn(lambda: my_projection(x))
    report.add("projection", t, reference=ref, target=1.5)
    report.write()      # prints a table and writes benchmarks/results/my_benchmark.json
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Any, Callable

import jax

from sparse_jax.training.report import format_table

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _block(out: Any) -> Any:
  return jax.block_until_ready(out)


def time_fn(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 10,
            min_time: float = 0.0) -> dict[str, float]:
  """Times ``fn()`` (blocking on its outputs) after ``warmup`` untimed calls.

  Args:
    fn: a zero-argument callable; its result is passed to
      ``jax.block_until_ready`` so asynchronous dispatch is included.
    warmup: untimed calls first (compilation, caches).
    repeats: timed calls (at least this many).
    min_time: keep repeating until this many seconds were spent timing.

  Returns:
    ``{"min": s, "median": s, "repeats": k}`` in seconds.
  """
  for _ in range(warmup):
    _block(fn())
  times: list[float] = []
  start = time.perf_counter()
  while len(times) < repeats or time.perf_counter() - start < min_time:
    t0 = time.perf_counter()
    _block(fn())
    times.append(time.perf_counter() - t0)
  return {"min": min(times), "median": statistics.median(times),
          "repeats": len(times)}


def interleaved(fns: dict, *, rounds: int, repeats: int) -> dict:
  """time_fn over several rounds, alternating between the functions.

  The machine is shared and noisy; alternating keeps a load spike from
  landing on only one side of a ratio. Returns ``{name: {"min", "median"}}``
  with the min over all rounds and the median of the per-round minima.
  """
  per_round = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      per_round[name].append(time_fn(fn, repeats=repeats)["min"])
  return {name: {"min": min(v), "median": statistics.median(v),
                 "repeats": rounds * repeats} for name, v in per_round.items()}


class Report:
  """Collects timings and ratios for one benchmark and writes them as JSON."""

  def __init__(self, name: str, **meta: Any):
    self.name = name
    self.rows: list[dict[str, Any]] = []
    self.meta = {
        "benchmark": name,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        **meta,
    }

  def add(self, label: str, timing: dict[str, float] | None = None, *,
          reference: dict[str, float] | None = None,
          target: float | None = None, target_kind: str = "max",
          **extra: Any) -> dict[str, Any]:
    """Adds a row; with ``reference`` the row's ratio is min/min of the two.

    Args:
      label: row name.
      timing: the result of :func:`time_fn` (may be None for non-timing rows).
      reference: a :func:`time_fn` result measured in the same run.
      target: the ratio to reach, if any.
      target_kind: "max" (ratio must be <= target) or "min" (>= target).
      **extra: any other JSON-serialisable fields (sizes, bytes, accuracy).

    Returns:
      The row that was added.
    """
    row: dict[str, Any] = {"label": label, **extra}
    if timing is not None:
      row["min_s"] = timing["min"]
      row["median_s"] = timing["median"]
    if reference is not None and timing is not None:
      row["ratio"] = timing["min"] / reference["min"]
    if target is not None:
      row["target"] = target
      row["target_kind"] = target_kind
      value = row.get("ratio", extra.get("value"))
      if value is not None:
        row["meets_target"] = bool(value <= target if target_kind == "max"
                                   else value >= target)
    self.rows.append(row)
    return row

  def table(self) -> str:
    """Returns the rows as a plain-text table."""
    first = ["label", "min_s", "median_s", "ratio", "target", "meets_target"]
    rest = sorted({k for r in self.rows for k in r} - set(first) - {"target_kind"})
    columns = [c for c in first + rest if any(c in r for r in self.rows)]
    return format_table(self.rows, columns)

  def write(self, path: str | None = None) -> str:
    """Prints the table and writes ``{meta, rows}`` as JSON; returns the path."""
    path = path or os.path.join(RESULTS_DIR, f"{self.name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      json.dump({"meta": self.meta, "rows": self.rows}, f, indent=2)
    print(f"== {self.name} ({self.meta['backend']}) ==")
    print(self.table())
    print(f"wrote {path}")
    return path
