"""Writes ``docs/RESULTS.md`` and ``docs/figures/*.png`` from the results JSON.

Run from the repository root::

    python benchmarks/report.py
    python benchmarks/report.py --results=benchmarks/results --docs=docs/results \
        --out=docs/RESULTS.md

Inputs: the benchmark JSON ``{meta, rows}`` written by ``benchmarks/timing.py``
(``--results``) and the sweep JSON ``{runs, summary}`` written by
``experiments/sweep.py`` and copied to ``docs/results/NAME.json`` (``--docs``):

- ``nm_*.json`` (N:M training sweeps, variants ``PATTERN,METHOD`` and ``dense``):
  accuracy vs density n/m per method, plain and transposable;
- ``nm_convert*.json``: accuracy after each post-training conversion stage;
- ``compress_*.json``: test accuracy vs total bytes received per device;
- ``cl_*.json``: continual-learning metrics; ``cl_*_matrices.json`` (``{variant:
  accuracy matrix}``) or the runs' own ``accuracy_matrix``: one heatmap per variant;
- any other sweep JSON: a table of its metrics;
- every benchmark row with a ratio or a target: measured vs target, met or not.

Each section names the command that produced its data (``meta.command`` in the
JSON when present, else the table below). The output is deterministic (no dates,
sorted inputs) and a missing or unreadable input is reported, never fatal.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Run as a script, sys.path[0] is benchmarks/, whose compression.py would shadow the
# `compression` package jax tries to import: import from the repository root instead.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.join(REPO, "benchmarks"):
  sys.path[0] = REPO
elif REPO not in sys.path:
  sys.path.insert(0, REPO)
DPI = 100

# How each known input is produced (used when the JSON has no ``meta.command``).
BENCHMARK_COMMANDS = {
    name: f"python -m benchmarks.{name}"
    for name in ("compression", "foovb", "nm_dense", "nm_mask", "nm_train_step",
                 "train_step", "transposable")
}


def _sweep_command(config: str, name: str, extra: str = "") -> str:
  return (f"python experiments/sweep.py --config=configs/{config}.py{extra} "
          f"--workdir=workdirs/{name} && cp workdirs/{name}/sweep.json "
          f"docs/results/{name}.json")


SWEEP_COMMANDS = {
    "nm_teacher": _sweep_command("nm_teacher", "nm_teacher"),
    "nm_convert": _sweep_command("nm_convert", "nm_convert"),
    "compress_digits": _sweep_command("compress_digits", "compress_digits"),
    "compress_teacher": _sweep_command("compress_digits", "compress_teacher",
                                       " --base=teacher"),
    "compress_hetero": _sweep_command(
        "compress_digits", "compress_hetero",
        ' --variants="$(python configs/compress_digits.py hetero)"'),
    "compress_formats": _sweep_command(
        "compress_digits", "compress_formats",
        ' --variants="$(python configs/compress_digits.py formats)"'),
    "cl_permuted_digits": _sweep_command("cl_permuted_digits", "cl_permuted_digits"),
    "cl_continuous_digits": _sweep_command("cl_permuted_digits", "cl_continuous_digits",
                                           " --base=continuous"),
    "cl_split_digits": _sweep_command("cl_split_digits", "cl_split_digits"),
    "cl_reference_digits": _sweep_command(
        "cl_permuted_digits", "cl_reference_digits",
        ' --variants="$(python configs/cl_permuted_digits.py reference)"'),
    "mlp_digits_calibration": _sweep_command(
        "mlp_digits", "mlp_digits_calibration",
        ' --variants=";bgd;foovb_kron;ivon" '
        "--metrics=test_accuracy,nll,ece,accuracy_bma,nll_bma,ece_bma"),
    "charlm": _sweep_command("charlm", "charlm"),
    "cl_tiny_digits": _sweep_command(
        "cl_permuted_digits", "cl_tiny_digits",
        " --variants='sgd,tiny;adam,tiny;bgd,tiny;foovb_kron,tiny;foovb_full,tiny'"),
}
EXPECTED_SWEEPS = ("nm_teacher", "nm_convert", "compress_digits", "compress_teacher")

NM_METHODS = {"proj": "projection", "ste": "STE", "srste": "SR-STE", "sste": "S-STE"}
CONVERT_STAGES = {"one_shot": "one-shot", "one_shot_bn": "one-shot + BN",
                  "reconstructed": "reconstructed",
                  "reconstructed_bn": "reconstructed + BN"}
CL_METRICS = ("average_accuracy", "forgetting", "backward_transfer")
STATISTICS = {"paper": "papers' statistic", "centred": "centred statistic"}
REFERENCE_BASELINES = {"bgd_ref": "FOO-VB diagonal (BGD), std_init 0.05, K=10",
                       "sgd_ref": "SGD, lr 0.01", "adam": "Adam, lr 1e-3"}
_PERCENT_WORDS = ("accuracy", "forgetting", "transfer")


# ---------------------------------------------------------------- small helpers


def _display(path: str) -> str:
  """A path relative to the repository root when inside it (stable output)."""
  path = os.path.abspath(path)
  rel = os.path.relpath(path, REPO)
  return path if rel.startswith("..") else rel


def _load(path: str) -> tuple[Any, str | None]:
  try:
    with open(path) as f:
      return json.load(f), None
  except (OSError, ValueError) as e:
    return None, f"{type(e).__name__}: {e}"


def _num(x: Any) -> float | None:
  if isinstance(x, bool) or not isinstance(x, (int, float)):
    return None
  return float(x)


def _fmt(x: Any, digits: int = 4) -> str:
  v = _num(x)
  if v is None:
    return "" if x is None else str(x)
  return f"{v:.{digits}g}"


def _pm(mean: float | None, std: float | None, *, percent: bool = False) -> str:
  if mean is None:
    return ""
  scale = 100.0 if percent else 1.0
  if percent:
    text = f"{scale * mean:.2f}"
    return text if std is None else f"{text} ± {scale * std:.2f}"
  return _fmt(mean) if std is None else f"{_fmt(mean)} ± {_fmt(std, 2)}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
  def cell(x):
    return str(x).replace("|", "\\|")
  lines = ["| " + " | ".join(cell(h) for h in header) + " |",
           "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
  return lines


def _is_percent(metric: str) -> bool:
  return any(w in metric for w in _PERCENT_WORDS)


def _short(label: str, width: int = 58) -> str:
  return label if len(label) <= width else label[:width - 1] + "…"


class _Summary:
  """Per-variant mean / std / seeds of a sweep, from its summary or its runs."""

  def __init__(self, data: dict[str, Any]):
    self.runs = [r for r in data.get("runs", []) if isinstance(r, dict)]
    self.rows: dict[str, dict[str, Any]] = {}
    for row in data.get("summary", []):
      if isinstance(row, dict) and "variant" in row:
        self.rows[str(row["variant"])] = dict(row)
    for run in self.runs:
      self.rows.setdefault(str(run.get("variant", "")), {"variant": run.get("variant")})

  @property
  def variants(self) -> list[str]:
    return list(self.rows)

  def metrics(self) -> list[str]:
    """Metrics the summary aggregates (keys with a ``_std`` twin), in order."""
    keys = dict.fromkeys(k for row in self.rows.values() for k in row)
    return [k for k in keys if f"{k}_std" in keys and not k.endswith("_std")]

  def get(self, variant: str, metric: str) -> tuple[float | None, float | None, int]:
    """(mean, std, seeds) of ``metric``; recomputed from the runs if not summarised."""
    row = self.rows.get(variant, {})
    if _num(row.get(metric)) is not None:
      return (float(row[metric]), _num(row.get(f"{metric}_std")),
              int(row.get("seeds", 0) or 0))
    values = [_num(r.get(metric)) for r in self.runs
              if str(r.get("variant", "")) == variant]
    values = np.array([v for v in values if v is not None], float)
    if not len(values):
      return None, None, 0
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return float(values.mean()), std, len(values)

  def seeds(self, variant: str) -> int:
    row = self.rows.get(variant, {})
    if row.get("seeds") is not None:
      return int(row["seeds"])
    return sum(str(r.get("variant", "")) == variant for r in self.runs)


# ---------------------------------------------------------------- the report


class ResultsReport:
  """Builds the markdown and the figures; ``write()`` saves them."""

  def __init__(self, results_dir: str, docs_dir: str, out: str):
    self.results_dir = results_dir
    self.docs_dir = docs_dir
    self.out = out
    self.fig_dir = os.path.join(os.path.dirname(os.path.abspath(out)), "figures")
    self.lines: list[str] = []
    self.missing: list[str] = []
    self.figures: list[str] = []
    self._used: set[str] = set()

  # -- output plumbing

  def _add(self, *lines: str) -> None:
    self.lines.extend(lines)

  def _command(self, data: Any, name: str, default: dict[str, str]) -> str:
    meta = data.get("meta", {}) if isinstance(data, dict) else {}
    if isinstance(meta, dict) and meta.get("command"):
      return str(meta["command"])
    return default.get(name, "")

  def _say_command(self, command: str, source: str) -> None:
    if command:
      self._add(f"Data: `{source}`, produced by", "", f"    {command}", "")
    else:
      self._add(f"Data: `{source}` (the command that produced it is not recorded: "
                "no `meta.command` in the JSON).", "")

  def _save(self, fig, name: str) -> str:
    os.makedirs(self.fig_dir, exist_ok=True)
    path = os.path.join(self.fig_dir, name)
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    self.figures.append(path)
    return path

  def _image(self, path: str, alt: str) -> None:
    rel = os.path.relpath(path, os.path.dirname(os.path.abspath(self.out)))
    self._add(f"![{alt}]({rel.replace(os.sep, '/')})", "")

  def _sweep_files(self, pattern: str) -> list[str]:
    return sorted(glob.glob(os.path.join(self.docs_dir, pattern)))

  def _read_sweep(self, path: str) -> dict[str, Any] | None:
    self._used.add(os.path.abspath(path))
    data, err = _load(path)
    if err is None and not (isinstance(data, dict) and
                            ("summary" in data or "runs" in data)):
      err = "not a sweep JSON (no 'runs' or 'summary')"
    if err is not None:
      self._add(f"`{_display(path)}` could not be read: {err}.", "")
      self.missing.append(f"`{_display(path)}` unreadable ({err})")
      return None
    return data

  def _sweeps(self, paths: Sequence[str]):
    """Yields ``(name, data)`` of each readable sweep, after its heading and command."""
    for path in paths:
      data = self._read_sweep(path)
      if data is None:
        continue
      name = os.path.splitext(os.path.basename(path))[0]
      self._add(f"### {name}", "")
      self._say_command(self._command(data, name, SWEEP_COMMANDS), _display(path))
      yield name, data

  # -- sections

  def build(self) -> str:
    self._add("# Results", "",
              "Generated by `python benchmarks/report.py` from the JSON in "
              f"`{_display(self.docs_dir)}` (experiments) and "
              f"`{_display(self.results_dir)}` (benchmarks); do not edit by hand. "
              "Accuracies are test accuracies in %, mean ± std over seeds "
              "(std with ddof=1).", "")
    header_at = len(self.lines)
    self._charlm()
    self._nm_training()
    self._nm_convert()
    self._compression()
    self._continual()
    self._other_sweeps()
    self._benchmarks()
    for name in EXPECTED_SWEEPS:
      path = os.path.join(self.docs_dir, f"{name}.json")
      if not os.path.exists(path):
        self.missing.append(f"`{_display(path)}` (`{SWEEP_COMMANDS[name]}`)")
    inputs = ["## Missing inputs", ""]
    inputs += ([f"- {m}" for m in self.missing] if self.missing
               else ["None: every expected input was found."])
    self.lines[header_at:header_at] = inputs + [""]
    return "\n".join(self.lines).rstrip() + "\n"

  def _charlm(self) -> None:
    self._add("## N:M on a character-level Transformer LM (the flagship)", "")
    path = os.path.join(self.docs_dir, "charlm.json")
    if not os.path.exists(path):
      self._add("No `charlm.json`. Produce it with", "",
                f"    {SWEEP_COMMANDS['charlm']}", "")
      return
    for name, data in self._sweeps([path]):
      s = _Summary(data)
      metric = "test_bpc"
      self._add("Held-out bits per character (lower is better), mean ± std over "
                "seeds.", "")
      trained: dict[tuple[str, str], tuple] = {}
      patterns: dict[str, tuple[int, int, bool]] = {}
      other = []
      for v in s.variants:
        parsed = _parse_nm_variant(v)
        if parsed is not None:
          label, n, m, transposable, method = parsed
          patterns.setdefault(label, (n, m, transposable))
          trained[(label, method)] = s.get(v, metric)
        elif s.get(v, metric)[0] is not None:
          other.append(v)
      methods = [k for k in NM_METHODS if any(k == mm for _, mm in trained)]
      order = sorted(patterns, key=lambda p: (patterns[p][2], patterns[p][1], patterns[p][0]))
      rows = [[lab] + [_pm(*trained[(lab, mm)][:2]) if (lab, mm) in trained else ""
                       for mm in methods] for lab in order]
      self._add("Trained sparse from scratch (1000 AdamW steps):", "")
      self._add(*_md_table(["pattern"] + [NM_METHODS[mm] for mm in methods], rows), "")
      if other:
        self._add("Dense, one-shot conversion of the dense model, dense fine-tuning:",
                  "")
        self._add(*_md_table(["variant", "seeds", "bits per char"],
                             [[v, s.get(v, metric)[2], _pm(*s.get(v, metric)[:2])]
                              for v in other]), "")
      points = []
      from sparse_jax.masks import mask_diversity
      for lab in order:
        n, m, transposable = patterns[lab]
        if (lab, "srste") in trained and trained[(lab, "srste")][0] is not None:
          md = mask_diversity(n, m, transposable=transposable, block_size=256)
          points.append((lab, math.log(md), trained[(lab, "srste")]))
      if len(points) >= 3:
        rank = lambda a: np.argsort(np.argsort(a))  # noqa: E731

        def corr(pts):
          x = np.array([p[1] for p in pts])
          y = np.array([p[2][0] for p in pts])
          return (float(np.corrcoef(x, y)[0, 1]),
                  float(np.corrcoef(rank(x), rank(y))[0, 1]), len(pts))

        half = [p for p in points if 2 * patterns[p[0]][0] == patterns[p[0]][1]]
        r, rho, k = corr(points)
        text = (f"over all {k} patterns Pearson r = {r:+.2f}, Spearman rho = "
                f"{rho:+.2f}")
        if 3 <= len(half) < len(points):
          r, rho, k = corr(half)
          text += (f"; over the {k} patterns at density 1/2 (1:4 also halves the "
                   f"density) r = {r:+.2f}, rho = {rho:+.2f}")
        self._add("Mask diversity (Hubara et al. 2021: higher MD, better accuracy): "
                  "SR-STE bits per character against log MD of a 256-weight block, "
                  f"{text} (negative: more diversity, fewer bits).", "")
        fig, ax = plt.subplots(figsize=(5.6, 3.6))
        for lab, lx, (mean, std, _) in points:
          ax.errorbar([lx], [mean], yerr=[std or 0.0], marker="o", capsize=3,
                      color="C3" if lab.startswith("T-") else "C0")
          ax.annotate(lab, (lx, mean), textcoords="offset points", xytext=(4, 4),
                      fontsize=8)
        ax.set_xlabel("log mask diversity (256-weight block)")
        ax.set_ylabel("held-out bits per character")
        ax.set_title(f"{name}: SR-STE, bits per char vs mask diversity", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        self._image(self._save(fig, f"{name}_bpc_vs_mask_diversity.png"),
                    f"{name}: bits per character vs log mask diversity")

  def _nm_training(self) -> None:
    self._add("## N:M sparse training: accuracy vs density", "")
    paths = [p for p in self._sweep_files("nm_*.json")
             if not os.path.basename(p).startswith("nm_convert")]
    if not paths:
      self._add("No N:M training sweep found (`nm_*.json`). Produce it with", "",
                f"    {SWEEP_COMMANDS['nm_teacher']}", "")
      return
    for name, data in self._sweeps(paths):
      self._nm_sweep(name, data)

  def _nm_sweep(self, name: str, data: dict[str, Any]) -> None:
    s = _Summary(data)
    metric = "test_accuracy"
    cells: dict[tuple[str, str], tuple] = {}
    patterns: dict[str, tuple[int, int, bool]] = {}
    methods: dict[str, str] = {}
    dense = None
    other = []
    for v in s.variants:
      mean, std, seeds = s.get(v, metric)
      parsed = _parse_nm_variant(v)
      if v in ("dense", ""):
        dense = (mean, std, seeds)
      elif parsed is None:
        other.append((v, mean, std, seeds))
      else:
        label, n, m, transposable, method = parsed
        patterns.setdefault(label, (n, m, transposable))
        methods.setdefault(method, NM_METHODS.get(method, method))
        cells[(label, method)] = (mean, std, seeds)
    if dense is not None:
      self._add(f"Dense: {_pm(dense[0], dense[1], percent=True)} % "
                f"({dense[2]} seeds).", "")
    if patterns:
      rows = []
      for label, (n, m, _) in patterns.items():
        row = [label, f"{n / m:g}"]
        for method in methods:
          c = cells.get((label, method))
          row.append("" if c is None else _pm(c[0], c[1], percent=True))
        rows.append(row)
      self._add(*_md_table(["pattern", "density n/m"] + list(methods.values()), rows))
      self._add("")
      fig = _plot_nm(patterns, methods, cells, dense, title=name)
      self._image(self._save(fig, f"{name}_accuracy_vs_density.png"),
                  f"{name}: accuracy vs density")
    else:
      self._add("No `PATTERN,METHOD` variants in this sweep.", "")
    if other:
      self._add("Other variants:", "")
      self._add(*_md_table(["variant", "seeds", f"{metric} (%)"],
                           [[v, n, _pm(m, sd, percent=True)] for v, m, sd, n in other]))
      self._add("")

  def _nm_convert(self) -> None:
    self._add("## N:M post-training conversion", "")
    paths = self._sweep_files("nm_convert*.json")
    if not paths:
      self._add("No conversion sweep found (`nm_convert.json`). Produce it with", "",
                f"    {SWEEP_COMMANDS['nm_convert']}", "")
      return
    for name, data in self._sweeps(paths):
      s = _Summary(data)
      keys = dict.fromkeys(s.metrics())
      for r in s.runs:
        keys.update(dict.fromkeys(k for k in r if _num(r[k]) is not None))
      stage_re = "|".join(sorted(CONVERT_STAGES, key=len, reverse=True))
      found = [(k, m) for k in keys
               if (m := re.fullmatch(rf"test_accuracy_(.+?)_({stage_re})", k))]
      patterns = list(dict.fromkeys(m.group(1) for _, m in found))
      stages = [st for st in CONVERT_STAGES if any(m.group(2) == st for _, m in found)]
      panels = []
      for variant in s.variants:
        label = variant or "(default)"
        dense = s.get(variant, "test_accuracy_dense")
        self._add(f"Variant `{label}`, {s.seeds(variant)} seeds. Dense model: "
                  f"{_pm(dense[0], dense[1], percent=True)} %.", "")
        grid = {(p, st): s.get(variant, f"test_accuracy_{p}_{st}")
                for p in patterns for st in stages}
        if patterns:
          self._add(*_md_table(
              ["pattern"] + [CONVERT_STAGES[st] for st in stages],
              [[p] + [_pm(grid[p, st][0], grid[p, st][1], percent=True)
                      for st in stages] for p in patterns]))
          self._add("")
          panels.append((label, dense, grid))
        else:
          self._add("No `test_accuracy_PATTERN_STAGE` metrics in this sweep.", "")
      if panels:
        fig = _plot_convert(panels, patterns, stages)
        self._image(self._save(fig, f"{name}.png"), f"{name}: accuracy per stage")

  def _compression(self) -> None:
    self._add("## Gradient compression: accuracy vs bytes communicated", "")
    paths = self._sweep_files("compress_*.json")
    if not paths:
      self._add("No compression sweep found (`compress_*.json`). Produce them with", "",
                f"    {SWEEP_COMMANDS['compress_digits']}",
                f"    {SWEEP_COMMANDS['compress_teacher']}", "")
      return
    for name, data in self._sweeps(paths):
      s = _Summary(data)
      if name == "compress_hetero":
        self._hetero(s)
        continue
      points, rows = [], []
      for v in s.variants:
        acc = s.get(v, "test_accuracy")
        sent = s.get(v, "total_bytes_received")
        if sent[0] is None:
          sent = s.get(v, "total_bytes_sent")
        dense = s.get(v, "total_bytes_dense")[0]
        share = (sent[0] / dense) if sent[0] is not None and dense else None
        rows.append([v, s.seeds(v), _pm(acc[0], acc[1], percent=True), _fmt(sent[0]),
                     _fmt(share, 3)])
        if acc[0] is not None and sent[0] is not None and sent[0] > 0:
          points.append((v, acc, sent, dense))
      self._add(*_md_table(["method", "seeds", "test accuracy (%)",
                            "bytes received per device", "bytes / dense all-reduce"],
                           rows))
      self._add("")
      if points:
        fig = _plot_bytes(points, title=name)
        self._image(self._save(fig, f"{name}_bytes_vs_accuracy.png"),
                    f"{name}: accuracy vs bytes")

  def _hetero(self, s: _Summary) -> None:
    """Methods x compressors (rows) by worker heterogeneity x learning rate."""
    self._add("Heterogeneous workers: each of the 8 workers draws its label "
              "distribution from Dirichlet(alpha) (alpha = inf: i.i.d.). Test "
              "accuracy (%), mean +- std over the seeds; `failed k/n`: k runs "
              "stopped on a non-finite loss (diverged). SGD without momentum "
              "except DGC (momentum 0.9, its momentum correction). Note: each "
              "worker SAMPLES from its own label distribution, so at alpha 0.1 "
              "the union of the 8 workers' data is itself skewed and the dense "
              "baseline loses accuracy too; the last column compares each "
              "method with dense in the same setting. What it shows is "
              "discussed in [compress_hetero.md](results/compress_hetero.md).",
              "")
    alphas = {"": "inf", "alpha1": "1", "alpha01": "0.1"}
    lrs = {"lr005": "0.05", "lr02": "0.2"}
    cols = [(a, l) for a in alphas for l in lrs]
    row_keys = []
    for v in s.variants:
      parts = [p for p in v.split(",") if p not in alphas and p not in lrs]
      key = ",".join(parts)
      if key not in row_keys:
        row_keys.append(key)
    def mean_of(key, a, l):
      return s.get(",".join(filter(None, [key, a, l])), "test_accuracy")[0]

    rows = []
    for key in row_keys:
      cells = [key]
      gaps = [mean_of(key, a, l) - mean_of("dense", a, l) for a, l in cols
              if mean_of(key, a, l) is not None
              and mean_of("dense", a, l) is not None]
      for a, l in cols:
        v = ",".join(filter(None, [key, a, l]))
        mean, std, n = s.get(v, "test_accuracy")
        failed = int(s.rows.get(v, {}).get("failed", 0) or 0)
        total = s.seeds(v)
        cell = _pm(mean, std, percent=True) if mean is not None else ""
        if failed:
          cell = (cell + " " if cell else "") + f"failed {failed}/{total}"
        cells.append(cell)
      cells.append("" if key == "dense" or not gaps
                   else f"{100 * min(gaps):+.1f}")
      rows.append(cells)
    header = (["method"] + [f"alpha {alphas[a]}, lr {lrs[l]}" for a, l in cols]
              + ["worst vs dense (points)"])
    self._add(*_md_table(header, rows))
    self._add("")

  def _continual(self) -> None:
    self._add("## Continual learning", "")
    matrices = self._sweep_files("cl_*_matrices.json")
    sweeps = [p for p in self._sweep_files("cl_*.json") if p not in matrices]
    if not sweeps and not matrices:
      self._add("No continual-learning results yet (`cl_*.json`). Produce them with", "",
                f"    {SWEEP_COMMANDS['cl_permuted_digits']}",
                f"    {SWEEP_COMMANDS['cl_split_digits']}", "",
                "and write the accuracy matrices as `docs/results/cl_NAME_matrices.json` "
                "(`{variant: [[acc after task i on task j, ...], ...]}`); without that "
                "file the heatmaps are the mean of the runs' `accuracy_matrix`.", "")
      return
    covered = set()
    for path in matrices:
      name = os.path.basename(path)[:-len("_matrices.json")]
      self._used.add(os.path.abspath(path))
      data, err = _load(path)
      if err is None and not isinstance(data, dict):
        err = "expected a JSON object {variant: matrix}"
      if err is not None:
        self._add(f"`{_display(path)}` could not be read: {err}.", "")
        self.missing.append(f"`{_display(path)}` unreadable ({err})")
        continue
      covered.add(name)
      self._add(f"### {name}: accuracy matrices", "",
                f"Data: `{_display(path)}` (accuracy after training on task i, "
                "evaluated on task j).", "")
      self._cl_heatmaps(name, {str(k): _matrix(v) for k, v in data.items()})
    for name, data in self._sweeps(sweeps):
      if name == "cl_reference_digits":
        self._cl_reference(name, data)
        continue
      self._metric_table(_Summary(data), prefer=CL_METRICS)
      if name not in covered:
        mats = {}
        for v in _Summary(data).variants:
          runs = [_matrix(r.get("accuracy_matrix")) for r in data.get("runs", [])
                  if str(r.get("variant", "")) == v]
          runs = [m for m in runs if m is not None]
          if runs and len({m.shape for m in runs}) == 1:
            mats[f"{v} (mean of {len(runs)} runs)"] = np.mean(runs, axis=0)
        if mats:
          self._add("Accuracy matrices (mean over the runs of each variant):", "")
          self._cl_heatmaps(name, mats)

  def _cl_reference(self, name: str, data: dict[str, Any]) -> None:
    """FOO-VB Kronecker: accuracy and wall time vs K for both statistics."""
    s = _Summary(data)
    curves: dict[str, list[tuple[int, float, float]]] = {}
    rows = []
    for v in s.variants:
      match = re.fullmatch(r"foovb_kron,ref,(paper|centred),k(\d+)", v)
      mean, std, seeds = s.get(v, "average_accuracy")
      walls = [_num(r.get("wall_s")) for r in s.runs
               if str(r.get("variant")) == v and _num(r.get("wall_s")) is not None]
      wall = (f"{np.mean(walls):.0f} ({min(walls):.0f}-{max(walls):.0f})"
              if walls else "")
      f_mean, f_std, _ = s.get(v, "forgetting")
      label = (f"FOO-VB Kronecker, {STATISTICS[match.group(1)]}, K={match.group(2)}"
               if match else REFERENCE_BASELINES.get(v, v))
      rows.append([label, seeds, _pm(mean, std, percent=True),
                   _pm(f_mean, f_std, percent=True), wall])
      if match and mean is not None:
        curves.setdefault(match.group(1), []).append(
            (int(match.group(2)), 100 * mean, 100 * (std or 0.0)))
    self._add(*_md_table(["method", "seeds", "final average accuracy (%)",
                          "forgetting (%)", "wall s per seed (min-max)"], rows))
    self._add("")
    if curves:
      fig, ax = plt.subplots(figsize=(5.5, 3.6))
      names = STATISTICS
      for stat, pts in sorted(curves.items()):
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                    yerr=[p[2] for p in pts], marker="o", capsize=3,
                    label=names.get(stat, stat))
      ax.set_xscale("log")
      ax.set_xticks(sorted({p[0] for pts in curves.values() for p in pts}))
      ax.get_xaxis().set_major_formatter(ticker.ScalarFormatter())
      ax.set_xlabel("Monte-Carlo samples K per step")
      ax.set_ylabel("final average accuracy (%)")
      ax.set_title("FOO-VB Kronecker on 10 permuted-digits tasks", fontsize=9)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
      fig.tight_layout()
      self._image(self._save(fig, f"{name}_accuracy_vs_k.png"),
                  "accuracy vs K, papers' vs centred statistic")

  def _cl_heatmaps(self, name: str, mats: dict[str, np.ndarray | None]) -> None:
    from sparse_jax.training import cl_metrics  # lazy: imports jax
    rows = []
    for variant, acc in mats.items():
      if acc is None:
        rows.append([variant, "not a matrix", "", "", ""])
        continue
      rows.append([variant, f"{acc.shape[0]}x{acc.shape[1]}",
                   f"{100 * cl_metrics.average_accuracy(acc):.2f}",
                   f"{100 * cl_metrics.forgetting(acc):.2f}",
                   f"{100 * cl_metrics.backward_transfer(acc):.2f}"])
    self._add(*_md_table(["variant", "tasks", "final average accuracy (%)",
                          "forgetting (%)", "backward transfer (%)"], rows))
    self._add("")
    for i, (variant, acc) in enumerate(mats.items()):
      if acc is None:
        continue
      slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", variant.split(" (")[0]).strip("_")
      path = os.path.join(self.fig_dir, f"{name}_{slug or f'variant{i}'}.png")
      os.makedirs(self.fig_dir, exist_ok=True)
      cl_metrics.plot_accuracy_matrix(acc, path, title=f"{name} {variant}: accuracy (%)")
      self.figures.append(path)
      self._image(path, f"{name} {variant}")

  def _metric_table(self, s: _Summary, prefer: Sequence[str] = ()) -> None:
    metrics = s.metrics()
    for m in prefer:
      if m not in metrics and any(_num(r.get(m)) is not None for r in s.runs):
        metrics.append(m)
    if not metrics:
      self._add("No aggregated metrics in this sweep.", "")
      return
    header = ["variant", "seeds"] + [f"{m} (%)" if _is_percent(m) else m
                                     for m in metrics]
    rows = []
    for v in s.variants:
      cells = [v or "(default)", s.seeds(v)]
      for m in metrics:
        mean, std, _ = s.get(v, m)
        cells.append(_pm(mean, std, percent=_is_percent(m)))
      rows.append(cells)
    self._add(*_md_table(header, rows))
    self._add("")

  def _other_sweeps(self) -> None:
    rest = [p for p in self._sweep_files("*.json")
            if os.path.abspath(p) not in self._used]
    if not rest:
      return
    self._add("## Other experiment results", "")
    for _, data in self._sweeps(rest):
      self._metric_table(_Summary(data))

  def _benchmarks(self) -> None:
    self._add("## Speed benchmarks: measured ratios vs targets", "",
              "Speed is a ratio against a reference timed in the same run (min over "
              "repeats). `measured` is the row's `ratio`, or its `value` when it has "
              "no ratio (`s`: seconds; otherwise units as in the label). Target `≤ x`: the "
              "measured number must not exceed x; `≥ x`: must reach x.", "")
    paths = sorted(glob.glob(os.path.join(self.results_dir, "*.json")))
    found = {os.path.splitext(os.path.basename(p))[0] for p in paths}
    for name in sorted(set(BENCHMARK_COMMANDS) - found):
      path = os.path.join(self.results_dir, f"{name}.json")
      self.missing.append(f"`{_display(path)}` (`{BENCHMARK_COMMANDS[name]}`)")
    if not paths:
      self._add(f"No benchmark results found in `{_display(self.results_dir)}`. "
                "Produce them with", "")
      self._add(*[f"    {c}" for c in BENCHMARK_COMMANDS.values()])
      self._add("")
      return
    summary = []
    for path in paths:
      name = os.path.splitext(os.path.basename(path))[0]
      data, err = _load(path)
      if err is None and not (isinstance(data, dict) and
                              isinstance(data.get("rows"), list)):
        err = "not a benchmark JSON (no 'rows' list)"
      if err is not None:
        self._add(f"### {name}", "", f"`{_display(path)}` could not be read: {err}.", "")
        self.missing.append(f"`{_display(path)}` unreadable ({err})")
        continue
      meta = data.get("meta", {}) if isinstance(data.get("meta"), dict) else {}
      command = (self._command(data, name, BENCHMARK_COMMANDS)
                 or f"python -m benchmarks.{name}")
      if meta.get("quick") and "--quick" not in command:
        command += " --quick"
      self._add(f"### {name}", "")
      self._say_command(command, _display(path))
      facts = [f"{k} {meta[k]}" for k in ("backend", "cpu_count", "jax") if k in meta]
      if isinstance(meta.get("devices"), list):
        facts.append(f"{len(meta['devices'])} device(s)")
      if meta.get("quick"):
        facts.append("QUICK sizes")
      if facts:
        self._add("Measured with " + ", ".join(facts) + ".", "")
      rows, targeted = [], []
      for row in data["rows"]:
        if not isinstance(row, dict):
          continue
        measured = _num(row.get("ratio", row.get("value")))
        target = _num(row.get("target"))
        if _num(row.get("ratio")) is None and target is None:
          continue
        kind = row.get("target_kind", "max")
        met = row.get("meets_target")
        if met is None and target is not None and measured is not None:
          met = measured <= target if kind == "max" else measured >= target
        target_text = "" if target is None else (
            f"{'≤' if kind == 'max' else '≥'} {_fmt(target)}")
        met_text = "" if target is None else (
            "n/a" if met is None else ("yes" if met else "**no**"))
        unit = (" s" if _num(row.get("ratio")) is None
                and row.get("value") == row.get("min_s") else "")
        rows.append([row.get("label", ""), _fmt(measured) + unit, target_text,
                     met_text])
        if target is not None and measured is not None and measured > 0:
          targeted.append((str(row.get("label", "")), measured, target, bool(met)))
      if not rows:
        self._add("No row with a ratio or a target.", "")
        continue
      self._add(*_md_table(["label", "measured", "target", "met?"], rows))
      self._add("")
      if targeted:
        n_met = sum(t[3] for t in targeted)
        summary.append([name, len(targeted), n_met, len(targeted) - n_met])
        fig = _plot_targets(targeted, title=name)
        self._image(self._save(fig, f"bench_{name}.png"), f"{name}: ratio vs target")
    if summary:
      self._add("### Targets met, per benchmark", "")
      self._add(*_md_table(["benchmark", "rows with a target", "met", "missed"],
                           summary))
      self._add("")

  def write(self) -> str:
    text = self.build()
    os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
    with open(self.out, "w") as f:
      f.write(text)
    return text


# ---------------------------------------------------------------- parsing


def _parse_nm_variant(variant: str) -> tuple[str, int, int, bool, str] | None:
  """``"t24,srste"`` -> ``("T-2:4", 2, 4, True, "srste")``; None if not N:M."""
  parts = variant.split(",")
  if len(parts) != 2:
    return None
  pat = [p for p in parts if re.fullmatch(r"(nm|t)\d\d+", p)]
  method = [p for p in parts if p not in pat]
  if len(pat) != 1 or len(method) != 1:
    return None
  kind, digits = re.fullmatch(r"(nm|t)(\d+)", pat[0]).groups()
  n, m = int(digits[0]), int(digits[1:])
  if n > m or m == 0:
    return None
  transposable = kind == "t"
  label = f"{'T-' if transposable else ''}{n}:{m}"
  return label, n, m, transposable, method[0]


def _matrix(value: Any) -> np.ndarray | None:
  """A list of lists (or ``{"mean": ...}``) as a float matrix; None if it is not one."""
  if isinstance(value, dict):
    value = value.get("mean", value.get("accuracy_matrix"))
  try:
    acc = np.array([[np.nan if x is None else x for x in row] for row in value], float)
  except (TypeError, ValueError):
    return None
  if acc.ndim != 2 or acc.size == 0:
    return None
  if np.nanmax(acc) > 1.5:   # given in percent
    acc = acc / 100.0
  return acc


# ---------------------------------------------------------------- figures


def _plot_nm(patterns, methods, cells, dense, *, title: str):
  families = [t for t in (False, True) if any(p[2] == t for p in patterns.values())]
  fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families) + 1.6, 3.6),
                           sharey=True, squeeze=False)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  markers = ["o", "s", "^", "D", "v", "P"]
  ms = sorted({p[1] for p in patterns.values()})
  for ax, transposable in zip(axes[0], families):
    fam = {k: v for k, v in patterns.items() if v[2] == transposable}
    densities = sorted({n / m for n, m, _ in fam.values()})
    for i, (method, method_label) in enumerate(methods.items()):
      offset = (i - (len(methods) - 1) / 2) * 0.008
      for m in ms:
        pts = sorted((n / mm, cells[(lab, method)]) for lab, (n, mm, _) in fam.items()
                     if mm == m and (lab, method) in cells
                     and cells[(lab, method)][0] is not None)
        if not pts:
          continue
        x = np.array([p[0] for p in pts]) + offset
        y = np.array([100 * p[1][0] for p in pts])
        e = np.array([100 * (p[1][1] or 0.0) for p in pts])
        ax.errorbar(x, y, yerr=e, color=colors[i % len(colors)],
                    marker=markers[ms.index(m) % len(markers)], capsize=3, lw=1.2,
                    label=f"{method_label}, m={m}")
    if dense is not None and dense[0] is not None:
      d, sd = 100 * dense[0], 100 * (dense[1] or 0.0)
      ax.axhline(d, color="k", lw=1, ls="--", label="dense")
      ax.axhspan(d - sd, d + sd, color="k", alpha=0.08, lw=0)
    ax.set_xticks(densities)
    ax.set_xticklabels([f"{d:g}\n" + ", ".join(
        lab for lab, (n, m, _) in fam.items() if n / m == d) for d in densities],
                       fontsize=8)
    ax.set_xlim(min(densities) - 0.08, max(densities) + 0.08)
    ax.set_xlabel("density n/m")
    ax.set_title(("transposable N:M" if transposable else "N:M") + f" ({title})",
                 fontsize=9)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("test accuracy (%)")
  handles, labels = axes[0][-1].get_legend_handles_labels()
  axes[0][-1].legend(handles, labels, fontsize=7, loc="center left",
                     bbox_to_anchor=(1.02, 0.5))
  fig.tight_layout()
  return fig


def _plot_convert(panels, patterns, stages):
  fig, axes = plt.subplots(1, len(panels), figsize=(5.8 * len(panels) + 1.8, 3.4),
                           sharey=True, squeeze=False)
  width = 0.8 / max(len(stages), 1)
  x = np.arange(len(patterns))
  for ax, (label, dense, grid) in zip(axes[0], panels):
    for i, st in enumerate(stages):
      mean = np.array([np.nan if grid[p, st][0] is None else 100 * grid[p, st][0]
                       for p in patterns])
      err = np.array([100 * (grid[p, st][1] or 0.0) for p in patterns])
      ax.bar(x + (i - (len(stages) - 1) / 2) * width, mean, width, yerr=err,
             capsize=2, label=CONVERT_STAGES[st], error_kw=dict(lw=0.8))
    if dense[0] is not None:
      ax.axhline(100 * dense[0], color="k", ls="--", lw=1, label="dense")
    ax.set_xticks(x)
    ax.set_xticklabels(patterns)
    ax.set_ylim(0, 102)
    ax.set_title(f"conversion, variant {label}", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
  axes[0][0].set_ylabel("test accuracy (%)")
  axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
  fig.tight_layout()
  return fig


def _plot_bytes(points, *, title: str):
  fig, ax = plt.subplots(figsize=(7.2, 3.8))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  markers = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h"]
  dense_bytes = None
  for i, (v, acc, sent, dense) in enumerate(points):
    ax.errorbar(sent[0], 100 * acc[0], yerr=100 * (acc[1] or 0.0),
                xerr=(sent[1] or None), marker=markers[i % len(markers)],
                color=colors[i % len(colors)], capsize=3, ls="none", label=v)
    dense_bytes = dense_bytes or dense
  if dense_bytes:
    ax.axvline(dense_bytes, color="k", ls=":", lw=1, label="dense all-reduce bytes")
  ax.set_xscale("log")
  ax.set_xlabel("total bytes received per device (log)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
  fig.tight_layout()
  return fig


def _plot_targets(targeted, *, title: str):
  fig, ax = plt.subplots(figsize=(8.0, 0.26 * len(targeted) + 1.1))
  y = np.arange(len(targeted))[::-1]
  values = np.array([t[1] for t in targeted])
  targets = np.array([t[2] for t in targeted])
  low = min(values.min(), targets.min()) / 2
  ax.barh(y, values - low, left=low, height=0.6,
          color=["tab:green" if t[3] else "tab:red" for t in targeted])
  ax.plot(targets, y, "k|", ms=14, mew=2, label="target")
  ax.set_xscale("log")
  ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
  ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
  ax.xaxis.set_minor_formatter(ticker.NullFormatter())
  ax.set_yticks(y)
  ax.set_yticklabels([_short(t[0]) for t in targeted], fontsize=7)
  ax.set_xlabel("measured (green: target met, red: missed)")
  ax.set_title(title, fontsize=9)
  ax.grid(axis="x", alpha=0.3, which="both")
  ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  return fig


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--results", default=os.path.join(REPO, "benchmarks", "results"),
                      help="benchmark JSON directory")
  parser.add_argument("--docs", default=os.path.join(REPO, "docs", "results"),
                      help="experiment (sweep) JSON directory")
  parser.add_argument("--out", default=os.path.join(REPO, "docs", "RESULTS.md"),
                      help="markdown to write; figures go to its folder's figures/")
  args = parser.parse_args(argv)
  report = ResultsReport(args.results, args.docs, args.out)
  report.write()
  print(f"wrote {_display(args.out)} and {len(report.figures)} figure(s) in "
        f"{_display(report.fig_dir)}")
  for m in report.missing:
    print(f"missing: {m}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
