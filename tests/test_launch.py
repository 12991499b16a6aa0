"""Smoke launches of every config through experiments/main.py, and config locking."""

import glob
import json
import os

import pytest

from _launch import ROOT, launch
from test_data import _write_cifar, _write_idx

CONFIGS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not os.path.basename(p).startswith("_"))


def _data_overrides(config, tmp_path):
  import numpy as np
  if "mnist" in config:
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("t10k", 16)):
      _write_idx(tmp_path / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), False)
      _write_idx(tmp_path / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n), False)
    return [f"--config.data.data_dir={tmp_path}"]
  if "cifar" in config:
    _write_cifar(tmp_path / "cifar-10-batches-py", n_per_batch=16)
    return [f"--config.data.data_dir={tmp_path}"]
  return []


def test_every_config_has_a_launch_docstring():
  assert CONFIGS
  for config in CONFIGS:
    text = open(os.path.join(ROOT, config)).read()
    assert "experiments/main.py --config=" + config in text.replace("\\\n        ", ""), config


@pytest.mark.parametrize("config", [c for c in CONFIGS
                                    if c != os.path.join("configs", "charlm.py")])
def test_smoke_launch(config, tmp_path):
  # (configs/charlm.py launches in test_charlm.py, with S-STE and fine-tuning)
  workdir = tmp_path / "wd"
  proc = launch(f"{config}:smoke", str(workdir), *_data_overrides(config, tmp_path))
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = json.loads((workdir / "results.json").read_text())
  assert results["status"] == "completed"
  if "num_steps" in results:  # supervised runs
    assert results["step"] == results["num_steps"] > 0
    assert 0.0 <= results["test_accuracy"] <= 1.0
  if "accuracy_matrix" in results:  # continual runs
    assert 0.0 <= results["average_accuracy"] <= 1.0
  if "test_accuracy_dense" in results:  # conversion runs
    assert any(k.endswith("_reconstructed_bn") for k in results)


def test_mistyped_config_key_fails_naming_it(tmp_path):
  proc = launch("configs/mlp_digits.py:smoke", str(tmp_path),
                "--config.optimizer.learing_rate=0.1")
  assert proc.returncode != 0
  assert "learing_rate" in proc.stderr and "learning_rate" in proc.stderr
  assert "Traceback" not in proc.stderr  # one clear line, not a chained traceback
  assert not (tmp_path / "results.json").exists()


def test_unknown_variant_fails(tmp_path):
  proc = launch("configs/mlp_digits.py:smokee", str(tmp_path))
  assert proc.returncode != 0 and "smokee" in proc.stderr


def test_sweep_cli_smoke(tmp_path):
  import subprocess
  import sys
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "sweep.py"),
       f"--config={os.path.join(ROOT, 'configs', 'nm_teacher.py')}", "--base=smoke",
       "--variants=dense;nm24,srste", "--seeds=0,1", f"--workdir={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((tmp_path / "sweep.json").read_text())["summary"]
  assert [row["variant"] for row in summary] == ["dense", "nm24,srste"]
  assert all(row["seeds"] == 2 for row in summary)
  assert "| nm24,srste | 2 |" in (tmp_path / "sweep.md").read_text()


@pytest.mark.parametrize("config", CONFIGS)
def test_every_sweep_variant_builds(config):
  # A variant listed in a config's SWEEP must resolve (a typo there would only
  # surface deep into a long sweep), also combined with smoke.
  from sparse_jax.training.config import load_config_module
  module = load_config_module(os.path.join(ROOT, config))
  for variant in getattr(module, "SWEEP", {}).get("variants", []):
    for arg in (variant, ",".join(filter(None, [variant, "smoke"]))):
      c = module.get_config(arg or None)
      assert c.train.num_steps > 0 or "stream" in c, (config, arg)
