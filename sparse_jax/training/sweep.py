"""Runs a config over variants x seeds and tabulates mean +- std of the results.

Each run lives in ``workdir/<variant>/seed_<k>`` and is an ordinary resumable run:
rerunning a sweep skips completed runs and resumes interrupted ones. A run that
stops with a :class:`~sparse_jax.training.runs.RunError` (e.g. its loss diverged)
is recorded as ``status: "failed"`` with its one-line error, counted in the
summary's ``failed`` and left out of the means; the sweep goes on (a rerun retries
it). A run preempted by SIGTERM checkpoints and the sweep stops there (before, it
went on to the next run, so a killed sweep kept running); rerunning resumes it. The sweep
prints one line per run (its metrics and wall time; the run's own progress
lines and table are not shown) and the summary table. A run whose results hold
``subruns`` (``{label: {metric: value}}``, e.g. every stage of a conversion)
adds one summary row per label, named ``<variant>/<label>``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from sparse_jax.training.files import is_primary, write_json, write_text
from sparse_jax.training.report import format_table
from sparse_jax.training.runs import RunError

RunFn = Callable[[Any, str], dict[str, Any]]


def summarize(rows: Sequence[dict[str, Any]], metrics: Sequence[str]
              ) -> list[dict[str, Any]]:
  """Groups per-seed result rows by ``variant``: mean, std (ddof=1) and n per metric.

  A variant whose runs only hold ``subruns`` (none of ``metrics``) is left
  out: its ``<variant>/<label>`` rows stand for it.
  """
  out = []
  for variant in dict.fromkeys(r["variant"] for r in rows):
    group = [r for r in rows if r["variant"] == variant]
    if all(r.get("subruns") for r in group) and not any(
        r.get(m) is not None for r in group for m in metrics):
      continue
    summary: dict[str, Any] = {"variant": variant, "seeds": len(group)}
    failed = sum(r.get("status") == "failed" for r in group)
    if failed:   # e.g. diverged (non-finite loss): no metrics, counted here
      summary["failed"] = failed
    for metric in metrics:
      values = np.array([r[metric] for r in group if r.get(metric) is not None], float)
      if len(values):
        summary[metric] = float(values.mean())
        summary[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    out.append(summary)
  return out


def markdown_table(summary: Sequence[dict[str, Any]], metrics: Sequence[str], *,
                   percent: Sequence[str] = ()) -> str:
  """A markdown table ``variant | metric (mean +- std) | ...``."""
  lines = ["| variant | seeds | " + " | ".join(metrics) + " |",
           "|---|---|" + "---|" * len(metrics)]
  for row in summary:
    cells = []
    for m in metrics:
      if m not in row:
        cells.append("")
        continue
      scale = 100.0 if m in percent else 1.0
      cells.append(f"{scale * row[m]:.4g} +- {scale * row[m + '_std']:.2g}")
    seeds = str(row["seeds"]) + (f" ({row['failed']} failed)" if row.get("failed")
                                 else "")
    lines.append(f"| {row['variant']} | {seeds} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _say(text: str, end: str = "\n") -> None:
  if is_primary():
    print(text, end=end, flush=True)


def _completed(path: str) -> dict[str, Any] | None:
  """The results of a completed run (a torn or unfinished one is rerun)."""
  try:
    with open(path) as f:
      results = json.load(f)
  except (OSError, ValueError):
    return None
  return results if results.get("status") == "completed" else None


def run_sweep(make_config: Callable[[str], Any], variants: Sequence[str],
              seeds: Sequence[int], workdir: str, *, run: RunFn,
              metrics: Sequence[str] = ("test_accuracy",),
              percent: Sequence[str] = ("test_accuracy",)) -> list[dict[str, Any]]:
  """Runs every (variant, seed) and writes ``sweep.json`` and ``sweep.md``.

  Args:
    make_config: variant name -> config (e.g. ``lambda v: get_config(v)``).
    variants: variant names (used as sub-directory names too).
    seeds: seeds; each run sets ``config.seed``.
    workdir: sweep directory.
    run: ``run(config, workdir) -> results dict`` (e.g. ``train_and_evaluate``).
    metrics: result keys to aggregate.
    percent: metrics printed as percentages in the markdown table.

  Returns:
    The per-variant summary rows.
  """
  rows = []
  total, k = len(variants) * len(seeds), 0
  for variant in variants:
    for seed in seeds:
      k += 1
      run_dir = os.path.join(workdir, variant.replace(",", "+") or "base",
                             f"seed_{seed}")
      results = _completed(os.path.join(run_dir, "results.json"))
      label = f"[{k}/{total}] {variant or 'base'} seed {seed}"
      if results is None:
        config = make_config(variant)
        config.seed = int(seed)
        _say(f"{label} ...", end="")
        t0 = time.perf_counter()
        try:
          with contextlib.redirect_stdout(io.StringIO()):  # one line per run
            results = run(config, run_dir)
        except RunError as e:   # e.g. diverged: a result of the sweep, not a crash
          _say(f"  failed: {e}")
          rows.append({"variant": variant, "seed": int(seed), "status": "failed",
                       "error": str(e)})
          continue
        if results.get("status") == "preempted":   # SIGTERM: the job is ending
          _say("  preempted (SIGTERM): the sweep stops here; rerun it to resume")
          return summarize(rows, metrics)
        done = f" {time.perf_counter() - t0:.0f} s"
      else:
        _say(label, end="")
        done = " (done before)"
      shown = [f"{m} {results[m]:.4g}" for m in metrics
               if isinstance(results.get(m), (int, float))]
      if not shown and results.get("subruns"):
        shown = [f"{len(results['subruns'])} results, one row each below"]
      _say("  " + "  ".join(shown) + done)
      rows.append({"variant": variant, "seed": int(seed), **results})
      for sub, values in (results.get("subruns") or {}).items():
        rows.append({"variant": f"{variant}/{sub}", "seed": int(seed),
                     "status": results.get("status"), **values})
  summary = summarize(rows, metrics)
  table = markdown_table(summary, metrics, percent=percent)
  if is_primary():
    write_json(os.path.join(workdir, "sweep.json"), {"runs": rows, "summary": summary})
    write_text(os.path.join(workdir, "sweep.md"), table + "\n")
    print(format_table(summary))
  return summary
