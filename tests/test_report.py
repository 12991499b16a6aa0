"""benchmarks/report.py: RESULTS.md tables, numbers and figures from fake JSON inputs."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "report.py")


def _load_report():
  spec = importlib.util.spec_from_file_location("_results_report", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


report = _load_report()


def _write(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def _sweep(values, extra=None):
  """A sweep JSON ``{runs, summary}`` like experiments/sweep.py writes."""
  runs, summary = [], []
  for variant, per_metric in values.items():
    seeds = len(next(iter(per_metric.values())))
    for k in range(seeds):
      runs.append({"variant": variant, "seed": k,
                   **{m: v[k] for m, v in per_metric.items()},
                   **(extra or {}).get(variant, [{}] * seeds)[k]})
    row = {"variant": variant, "seeds": seeds}
    for m, v in per_metric.items():
      row[m] = float(np.mean(v))
      row[f"{m}_std"] = float(np.std(v, ddof=1))
    summary.append(row)
  return {"runs": runs, "summary": summary}


NM = {"dense": {"test_accuracy": [0.70, 0.72]},
      "nm24,proj": {"test_accuracy": [0.60, 0.62]},
      "nm24,srste": {"test_accuracy": [0.65, 0.66]},
      "nm14,proj": {"test_accuracy": [0.50, 0.54]},
      "t24,proj": {"test_accuracy": [0.58, 0.61]},
      "weird": {"test_accuracy": [0.3, 0.4]}}
CONVERT = {"": {"test_accuracy_dense": [0.99, 0.97],
                "test_accuracy_2:4_one_shot": [0.80, 0.70],
                "test_accuracy_2:4_one_shot_bn": [0.90, 0.92],
                "test_accuracy_T-4:8_reconstructed_bn": [0.95, 0.96]}}
COMPRESS = {"dense": {"test_accuracy": [0.9, 0.92], "total_bytes_received": [8e8, 8e8],
                      "total_bytes_dense": [8e8, 8e8]},
            "topk01,ef": {"test_accuracy": [0.88, 0.9],
                          "total_bytes_received": [6.4e6, 6.4e6],
                          "total_bytes_dense": [8e8, 8e8]}}
BENCH = {"meta": {"benchmark": "fake", "backend": "cpu", "cpu_count": 2,
                  "devices": ["cpu:0"], "quick": True},
         "rows": [
             {"label": "reference", "min_s": 1.0, "median_s": 1.0, "ratio": 1.0},
             {"label": "fast op", "min_s": 0.5, "ratio": 1.25, "target": 1.5,
              "target_kind": "max", "meets_target": True},
             {"label": "slow op", "min_s": 0.5, "ratio": 3.75, "target": 1.5,
              "target_kind": "max", "meets_target": False},
             {"label": "speedup", "min_s": 0.5, "ratio": 61.5, "target": 50.0,
              "target_kind": "min"},
             {"label": "unjudged op", "min_s": 0.5, "ratio": 2.0, "target": 1.5},
             {"label": "bytes share", "value": 0.008, "target": 0.01,
              "target_kind": "max", "meets_target": True},
             {"label": "absolute time", "value": 0.25, "min_s": 0.25, "target": 1.5,
              "target_kind": "max", "meets_target": True},
             {"label": "no ratio, no target", "min_s": 0.1},
         ]}
# acc[i, j]: after task i, on task j. average 0.7, forgetting 0.3, BWT -0.3
MATRIX_A = [[0.9, 0.1], [0.6, 0.8]]
MATRIX_B = [[0.8, 0.2], [0.9, 1.0]]   # average 0.95, forgetting -0.1, BWT +0.1


@pytest.fixture
def inputs(tmp_path):
  results, docs = str(tmp_path / "bench"), str(tmp_path / "docs" / "results")
  _write(os.path.join(results, "fake.json"), BENCH)
  _write(os.path.join(docs, "nm_teacher.json"), _sweep(NM))
  _write(os.path.join(docs, "nm_convert.json"), _sweep(CONVERT))
  _write(os.path.join(docs, "compress_digits.json"), _sweep(COMPRESS))
  # A continual sweep run with the default metric: its summary has no CL metrics,
  # the runs have them (and their accuracy matrices).
  cl = _sweep({"sgd": {"average_accuracy": [0.7, 0.8]},
               "bgd": {"average_accuracy": [0.9, 0.9]}},
              extra={"sgd": [{"forgetting": 0.3, "accuracy_matrix": MATRIX_A}] * 2,
                     "bgd": [{"forgetting": 0.0, "accuracy_matrix": MATRIX_B}] * 2})
  for row in cl["summary"]:
    del row["average_accuracy"], row["average_accuracy_std"]
  _write(os.path.join(docs, "cl_permuted.json"), cl)
  _write(os.path.join(docs, "cl_split.json"), _sweep({"adam": {"forgetting": [0.1, 0.2]}}))
  _write(os.path.join(docs, "cl_split_matrices.json"),
         {"adam": MATRIX_A, "bgd": {"mean": [[90.0, 10.0], [60.0, 80.0]]}})
  _write(os.path.join(docs, "other_thing.json"), _sweep({"a": {"loss": [1.0, 3.0]}}))
  out = str(tmp_path / "docs" / "RESULTS.md")
  return results, docs, out


def _run(results, docs, out):
  assert report.main(["--results", results, "--docs", docs, "--out", out]) == 0
  with open(out) as f:
    return f.read()


def test_report_tables_numbers_and_figures(inputs):
  results, docs, out = inputs
  md = _run(results, docs, out)
  # N:M: mean +- std (ddof=1) in %, density n/m, methods as columns, dense line.
  assert "| pattern | density n/m | projection | SR-STE |" in md
  assert "| 2:4 | 0.5 | 61.00 ± 1.41 | 65.50 ± 0.71 |" in md
  assert "| 1:4 | 0.25 | 52.00 ± 2.83 |  |" in md
  assert "| T-2:4 | 0.5 | 59.50 ± 2.12 |  |" in md
  assert "Dense: 71.00 ± 1.41 % (2 seeds)." in md
  assert "| weird | 2 | 35.00 ± 7.07 |" in md
  assert "python experiments/sweep.py --config=configs/nm_teacher.py" in md
  # Conversion: a pattern x stage table, missing cells empty.
  assert "| pattern | one-shot | one-shot + BN | reconstructed + BN |" in md
  assert "| 2:4 | 75.00 ± 7.07 | 91.00 ± 1.41 |  |" in md
  assert "| T-4:8 |  |  | 95.50 ± 0.71 |" in md
  assert "Dense model: 98.00 ± 1.41 %." in md
  # Compression: accuracy, bytes, share of the dense all-reduce.
  assert "| topk01,ef | 2 | 89.00 ± 1.41 | 6.4e+06 | 0.008 |" in md
  assert "| dense | 2 | 91.00 ± 1.41 | 8e+08 | 1 |" in md
  # Continual: metrics recomputed from the runs when the summary lacks them.
  assert "| sgd | 2 | 75.00 ± 7.07 | 30.00 ± 0.00 |" in md
  assert "| bgd | 2 | 90.00 ± 0.00 | 0.00 ± 0.00 |" in md
  assert "| adam | 2 | 15.00 ± 7.07 |" in md
  # ... and from the matrices: average, forgetting, backward transfer (percent
  # matrices are rescaled).
  assert "| adam | 2x2 | 70.00 | 30.00 | -30.00 |" in md
  assert "| bgd | 2x2 | 70.00 | 30.00 | -30.00 |" in md
  assert "| bgd (mean of 2 runs) | 2x2 | 95.00 | -10.00 | 10.00 |" in md
  # Generic sweep table for an unknown file.
  assert "### other_thing" in md and "| a | 2 | 2 ± 1.4 |" in md
  # Benchmarks: measured, target with its direction, met computed when absent.
  assert "python -m benchmarks.fake --quick" in md
  assert "| fast op | 1.25 | ≤ 1.5 | yes |" in md
  assert "| slow op | 3.75 | ≤ 1.5 | **no** |" in md
  assert "| speedup | 61.5 | ≥ 50 | yes |" in md
  assert "| unjudged op | 2 | ≤ 1.5 | **no** |" in md
  assert "| bytes share | 0.008 | ≤ 0.01 | yes |" in md
  assert "| absolute time | 0.25 s | ≤ 1.5 | yes |" in md
  assert "no ratio, no target" not in md
  assert "| fake | 6 | 4 | 2 |" in md
  # Expected experiment inputs that are absent are listed with their command.
  assert "compress_teacher.json` (`python experiments/sweep.py" in md
  # Figures: linked relative to the markdown, written, PNG, small.
  figures = os.path.join(os.path.dirname(out), "figures")
  names = ["nm_teacher_accuracy_vs_density.png", "nm_convert.png",
           "compress_digits_bytes_vs_accuracy.png", "bench_fake.png",
           "cl_split_adam.png", "cl_split_bgd.png", "cl_permuted_sgd.png",
           "cl_permuted_bgd.png"]
  for name in names:
    assert f"](figures/{name})" in md
    with open(os.path.join(figures, name), "rb") as f:
      data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 2_000 < len(data) < 150_000
  assert sorted(os.listdir(figures)) == sorted(names)


def test_missing_and_broken_inputs_are_reported(tmp_path):
  docs = tmp_path / "docs"
  docs.mkdir()
  (docs / "compress_bad.json").write_text("{not json")
  out = str(tmp_path / "RESULTS.md")
  md = _run(str(tmp_path / "nothing"), str(docs), out)
  assert "No N:M training sweep found" in md
  assert "No conversion sweep found" in md
  assert "No continual-learning results yet" in md
  assert "--config=configs/cl_permuted_digits.py" in md
  assert "compress_bad.json` could not be read: JSONDecodeError" in md
  assert "No benchmark results found" in md and "python -m benchmarks.nm_mask" in md
  for name in ("nm_teacher", "nm_convert", "compress_digits", "compress_teacher"):
    assert f"{name}.json` (`python experiments/sweep.py" in md
  assert not os.path.exists(tmp_path / "figures")


def test_cli_is_deterministic_and_idempotent(inputs):
  results, docs, out = inputs
  _run(results, docs, out)
  figures = os.path.join(os.path.dirname(out), "figures")

  def snapshot():
    files = [out] + [os.path.join(figures, n) for n in sorted(os.listdir(figures))]
    return {p: open(p, "rb").read() for p in files}

  first = snapshot()
  proc = subprocess.run([sys.executable, SCRIPT, "--results", results, "--docs", docs,
                         "--out", out], capture_output=True, text=True, cwd=REPO,
                        env={**os.environ, "MPLBACKEND": "TkAgg"}, check=False)
  assert proc.returncode == 0, proc.stderr
  assert "wrote" in proc.stdout and "missing:" in proc.stdout
  assert snapshot() == first


def test_reference_study_table_and_accuracy_vs_k_plot(tmp_path):
  docs = str(tmp_path / "results")
  values = {
      "foovb_kron,ref,paper,k10": {"average_accuracy": [0.55, 0.56],
                                   "forgetting": [0.01, 0.02]},
      "foovb_kron,ref,paper,k100": {"average_accuracy": [0.90, 0.89],
                                    "forgetting": [0.03, 0.02]},
      "foovb_kron,ref,centred,k10": {"average_accuracy": [0.86, 0.87],
                                     "forgetting": [0.04, 0.05]},
      "sgd_ref": {"average_accuracy": [0.40, 0.38], "forgetting": [0.6, 0.6]}}
  walls = {v: [{"wall_s": 70.0}, {"wall_s": 90.0}] for v in values}
  _write(os.path.join(docs, "cl_reference_digits.json"), _sweep(values, walls))
  out = str(tmp_path / "docs" / "RESULTS.md")
  md = _run(str(tmp_path / "none"), docs, out)
  assert ("| FOO-VB Kronecker, papers' statistic, K=100 | 2 | 89.50 ± 0.71 | "
          "2.50 ± 0.71 | 80 (70-90) |") in md
  assert "| SGD, lr 0.01 | 2 |" in md
  assert os.path.exists(tmp_path / "docs" / "figures" /
                        "cl_reference_digits_accuracy_vs_k.png")
  assert "cl_reference_digits_sgd_ref" not in md     # no heatmaps here
