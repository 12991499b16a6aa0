"""Data-parallel training through the loop: exact byte totals and exact resume."""

import os

import jax
import numpy as np
import pytest

from sparse_jax.training.checkpoint import Checkpointer
from sparse_jax.training.config import load_config_module
from sparse_jax.training.loop import build_run, train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(arg):
  c = load_config_module(os.path.join(ROOT, "configs", "compress_digits.py")).get_config(arg)
  c.model.hidden = (32,)
  c.train.num_devices = 4
  c.train.batch_size = 32
  return c


def _params(workdir, config):
  _, _, _, template = build_run(config)
  ckpt = Checkpointer(workdir)
  restored = ckpt._manager.restore(ckpt.latest_step())
  ckpt.close()
  return restored["params"]


def test_dense_bytes_are_the_ring_all_reduce(tmp_path):
  results = train_and_evaluate(_config("dense,smoke"), str(tmp_path))
  d = results["num_params"]
  per_step = 2 * (4 - 1) / 4 * 4 * d  # ring all-reduce of fp32, 4 workers
  assert results["total_bytes_dense"] == pytest.approx(12 * per_step, rel=1e-6)
  assert results["total_bytes_received"] == pytest.approx(12 * per_step, rel=1e-6)


def test_topk_bytes_and_resume(tmp_path):
  full = train_and_evaluate(_config("topk1,ef,smoke"), str(tmp_path / "full"))
  # 1% of each tensor (at least 1 entry), fp32 value + int32 index, from 3 peers
  d = full["num_params"]
  assert 0 < full["total_bytes_received"] < 0.05 * full["total_bytes_dense"]
  part = train_and_evaluate(_config("topk1,ef,smoke"), str(tmp_path / "part"),
                            stop_after_step=6)
  assert part["status"] == "stopped"
  resumed = train_and_evaluate(_config("topk1,ef,smoke"), str(tmp_path / "part"))
  for a, b in zip(jax.tree.leaves(_params(str(tmp_path / "full"), _config("smoke"))),
                  jax.tree.leaves(_params(str(tmp_path / "part"), _config("smoke")))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert resumed["total_bytes_received"] == full["total_bytes_received"]
  assert resumed["test_accuracy"] == full["test_accuracy"]


def test_bad_device_count(tmp_path):
  c = _config("dense,smoke")
  c.train.num_devices = 64
  with pytest.raises(ValueError, match="config.train.num_devices=64"):
    train_and_evaluate(c, str(tmp_path))
  with pytest.raises(ValueError, match="one compressor"):
    _config("topk1")


@pytest.mark.parametrize("arg", ["ef", "topk1", "topk1,topk01,ef", "topk1,ef,noef"])
def test_incomplete_compression_variant_is_an_error(arg):
  with pytest.raises(ValueError, match="give one compressor"):
    load_config_module(os.path.join(ROOT, "configs", "compress_digits.py")).get_config(arg)


def test_heterogeneous_workers_resume_exactly(tmp_path):
  """dirichlet_alpha: each worker its own labels; a resumed run is identical."""
  arg = "topk1,econtrol,alpha01,smoke"
  full = train_and_evaluate(_config(arg), str(tmp_path / "full"))
  part = train_and_evaluate(_config(arg), str(tmp_path / "part"),
                            stop_after_step=6)
  assert part["status"] == "stopped"
  resumed = train_and_evaluate(_config(arg), str(tmp_path / "part"))
  for a, b in zip(jax.tree.leaves(_params(str(tmp_path / "full"), _config(arg))),
                  jax.tree.leaves(_params(str(tmp_path / "part"), _config(arg)))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert resumed["test_accuracy"] == full["test_accuracy"]


@pytest.mark.parametrize("arg", ["fp8,ef", "lnfp8,ef21", "fp4,econtrol",
                                 "topk1fp8,ef", "topk1,dgc,alpha1,lr02"])
def test_new_compressors_run_through_the_loop(tmp_path, arg):
  results = train_and_evaluate(_config(arg + ",smoke"), str(tmp_path))
  assert results["status"] == "completed"
  assert np.isfinite(results["test_loss"])
  ratio = results["total_bytes_received"] / results["total_bytes_dense"]
  if arg.startswith(("fp8", "lnfp8")):   # 8-bit reduce-scatter, 4 workers
    assert 0.25 <= ratio < 0.27
  elif arg.startswith("fp4"):
    assert 0.125 <= ratio < 0.14


def test_dirichlet_alpha_needs_the_data_parallel_step():
  from sparse_jax.training.config import validate
  c = load_config_module(os.path.join(ROOT, "configs", "mlp_digits.py")).get_config()
  c.train.dirichlet_alpha = 0.1
  with pytest.raises(ValueError, match="dirichlet_alpha=0.1 .*data_parallel"):
    validate(c)
  c = _config("dense,alpha1")
  c.train.dirichlet_alpha = -1.0
  with pytest.raises(ValueError, match="dirichlet_alpha must be None"):
    validate(c)
