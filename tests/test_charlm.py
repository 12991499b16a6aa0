"""The character-level LM flagship config end to end (smoke sizes)."""

import math
import os

import pytest

from sparse_jax.training import run_experiment
from sparse_jax.training.config import load_config_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = load_config_module(os.path.join(ROOT, "configs", "charlm.py"))


def test_sste_with_dense_finetuning_reports_bits_per_character(tmp_path):
  """Through the launcher (test_launch's generic smoke launch skips charlm)."""
  import json
  from _launch import launch
  config = CONFIGS.get_config("nm24,sste,df,smoke")
  assert config.train.forward[0]["name"] == "s_ste"
  assert config.train.forward_until == 20 * 5 // 6
  proc = launch("configs/charlm.py:nm24,sste,df,smoke", str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["test_bpc"] == pytest.approx(results["test_loss"] / math.log(2))
  assert results["density"] == 1.0        # dense after the fine-tuning phase


def test_convert_reports_every_criterion_as_a_subrun(tmp_path):
  config = CONFIGS.get_config("convert,flagship,smoke")
  config.convert.criteria = ("sparsegpt",)
  results = run_experiment(config, str(tmp_path))
  assert set(results["subruns"]) == {"dense", "2:4 sparsegpt one_shot"}
  sub = results["subruns"]["2:4 sparsegpt one_shot"]
  assert sub["test_bpc"] == results["test_bpc_2:4_sparsegpt_one_shot"]
  assert results["subruns"]["dense"]["test_bpc"] == results["test_bpc_dense"]
  assert sub["test_bpc"] > 0 and 0 <= sub["test_accuracy"] <= 1


def test_bad_variants():
  with pytest.raises(ValueError, match="df .dense fine-tuning. needs"):
    CONFIGS.get_config("nm24,proj,df")
  with pytest.raises(ValueError, match="no transposable form"):
    CONFIGS.get_config("t24,sste")
  assert {"flagship"} <= set(CONFIGS.SWEEPS)
  for variant in CONFIGS.SWEEP["variants"] + CONFIGS.FLAGSHIP:
    CONFIGS.get_config(variant)      # every listed variant builds
