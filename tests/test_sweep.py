"""Sweeps: mean/std aggregation and resumability (completed runs are not rerun)."""

import json
import os

import ml_collections
import numpy as np
import pytest

from sparse_jax.training import run_experiment
from sparse_jax.training.sweep import markdown_table, run_sweep, summarize


def test_summarize_mean_and_sample_std():
  rows = [{"variant": "a", "acc": v} for v in (0.5, 0.6, 0.7)] + [
      {"variant": "b", "acc": 0.9}]
  a, b = summarize(rows, ["acc"])
  assert a["acc"] == pytest.approx(0.6) and a["acc_std"] == pytest.approx(0.1)
  assert b["seeds"] == 1 and b["acc_std"] == 0.0
  assert "| a | 3 | 60 +- 10 |" in markdown_table([a, b], ["acc"], percent=["acc"])


def test_run_sweep_skips_completed_runs(tmp_path):
  calls = []

  def fake_run(config, workdir):
    calls.append((config.variant, config.seed))
    results = {"status": "completed",
               "test_accuracy": 0.1 * config.seed + (0.5 if config.variant == "x" else 0)}
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f)
    return results

  def make(variant):
    return ml_collections.ConfigDict({"variant": variant, "seed": -1})

  summary = run_sweep(make, ["x", "y"], [0, 1, 2], str(tmp_path), run=fake_run)
  assert len(calls) == 6
  assert summary[0]["test_accuracy"] == pytest.approx(0.6)
  assert summary[1]["test_accuracy_std"] == pytest.approx(0.1)
  run_sweep(make, ["x", "y"], [0, 1, 2], str(tmp_path), run=fake_run)
  assert len(calls) == 6  # nothing rerun
  saved = json.loads((tmp_path / "sweep.json").read_text())
  assert len(saved["runs"]) == 6 and (tmp_path / "sweep.md").exists()


def test_a_failed_run_is_a_result_not_a_crash(tmp_path, capsys):
  from sparse_jax.training.runs import RunError

  def flaky_run(config, workdir):
    if config.variant == "bad" and config.seed == 1:
      raise RunError("the loss was non-finite for 20 consecutive steps")
    return {"status": "completed", "test_accuracy": 0.5 + 0.1 * config.seed}

  def make(variant):
    return ml_collections.ConfigDict({"variant": variant, "seed": -1})

  summary = run_sweep(make, ["ok", "bad"], [0, 1, 2], str(tmp_path), run=flaky_run)
  assert "failed: the loss was non-finite" in capsys.readouterr().out
  bad = summary[1]
  assert bad["failed"] == 1 and bad["seeds"] == 3
  assert bad["test_accuracy"] == pytest.approx(0.6)   # seeds 0 and 2
  assert "failed" not in summary[0]
  saved = json.loads((tmp_path / "sweep.json").read_text())
  assert [r["status"] for r in saved["runs"]].count("failed") == 1
  assert "| bad | 3 (1 failed) |" in (tmp_path / "sweep.md").read_text()


def test_a_preempted_run_stops_the_sweep(tmp_path, capsys):
  calls = []

  def run(config, workdir):
    calls.append((config.variant, config.seed))
    status = "preempted" if len(calls) == 2 else "completed"
    return {"status": status, "test_accuracy": 0.5}

  make = lambda v: ml_collections.ConfigDict({"variant": v, "seed": -1})
  run_sweep(make, ["a", "b"], [0, 1, 2], str(tmp_path), run=run)
  assert calls == [("a", 0), ("a", 1)]
  assert "the sweep stops here" in capsys.readouterr().out
  assert not (tmp_path / "sweep.json").exists()


def test_unknown_runner():
  config = ml_collections.ConfigDict({"runner": "nope"})
  with pytest.raises(ValueError, match="config.runner='nope'"):
    run_experiment(config, "/tmp/unused")


def test_subruns_become_rows_and_their_parent_is_left_out(tmp_path):
  def fake_run(config, workdir):
    results = {"status": "completed",
               "subruns": {"dense": {"bpc": 2.0 + config.seed},
                           "2:4 one_shot": {"bpc": 3.0}}}
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f)
    return results

  make = lambda v: ml_collections.ConfigDict({"variant": v, "seed": -1})  # noqa: E731
  summary = run_sweep(make, ["convert"], [0, 2], str(tmp_path), run=fake_run,
                      metrics=["bpc"])
  assert [r["variant"] for r in summary] == ["convert/dense", "convert/2:4 one_shot"]
  assert summary[0]["bpc"] == pytest.approx(3.0) and summary[0]["seeds"] == 2
