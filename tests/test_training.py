"""Training loop: determinism, outputs in the workdir, exact resume, SIGTERM."""

import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from sparse_jax.training.checkpoint import Checkpointer
from sparse_jax.training.config import base_config, smoke
from sparse_jax.training.loop import train_and_evaluate
from sparse_jax.training.metrics import read_metrics

from _launch import ROOT, launch_args


def _config(num_steps=24):
  c = base_config()
  smoke(c)
  c.model.hidden = (32,)
  c.train.num_steps = num_steps
  c.train.log_every = 4
  c.train.eval_every = 8
  c.train.checkpoint_every = 8
  c.optimizer.learning_rate = 1e-2
  return c


def _final_params(workdir):
  ckpt = Checkpointer(workdir)
  step = ckpt.latest_step()
  restored = ckpt._manager.restore(step)  # raw tree, no template needed
  ckpt.close()
  return step, restored["params"]


def _assert_trees_equal(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_outputs_written(tmp_path):
  results = train_and_evaluate(_config(), str(tmp_path))
  assert results["status"] == "completed" and results["step"] == 24
  for name in ("config.json", "metrics.jsonl", "results.json"):
    assert (tmp_path / name).exists(), name
  assert any(f.startswith("events.out.tfevents")
             for f in os.listdir(tmp_path / "tensorboard"))
  records = read_metrics(str(tmp_path))
  assert [r["step"] for r in records if r["split"] == "test"] == [8, 16, 24]
  assert json.loads((tmp_path / "results.json").read_text())["test_accuracy"] > 0.3
  assert json.loads((tmp_path / "config.json").read_text())["train"]["num_steps"] == 24


def test_resume_reaches_the_same_result(tmp_path):
  full, split = str(tmp_path / "full"), str(tmp_path / "split")
  r_full = train_and_evaluate(_config(), full)
  first = train_and_evaluate(_config(), split, stop_after_step=12)
  assert first["status"] == "stopped" and first["step"] == 12
  r_split = train_and_evaluate(_config(), split)
  assert r_split["status"] == "completed"
  step_a, params_a = _final_params(full)
  step_b, params_b = _final_params(split)
  assert step_a == step_b == 24
  _assert_trees_equal(params_a, params_b)
  for key in ("test_accuracy", "test_loss", "train_loss"):
    assert r_full[key] == r_split[key], key
  assert read_metrics(full) == read_metrics(split)  # no duplicated or missing lines


def test_same_seed_is_deterministic_other_seed_differs(tmp_path):
  a = train_and_evaluate(_config(8), str(tmp_path / "a"))
  b = train_and_evaluate(_config(8), str(tmp_path / "b"))
  c = _config(8)
  c.seed = 1
  d = train_and_evaluate(c, str(tmp_path / "c"))
  assert a["train_loss"] == b["train_loss"]
  assert a["train_loss"] != d["train_loss"]


def test_sigterm_checkpoints_then_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  args = launch_args("configs/mlp_digits.py", workdir, "--config.train.num_steps=200000",
                     "--config.train.checkpoint_every=100000",
                     "--config.train.eval_every=100000", "--config.train.log_every=50")
  proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 120
  while time.time() < deadline and not (os.path.exists(metrics)
                                        and os.path.getsize(metrics) > 0):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 143, out[-3000:]
  ckpt = Checkpointer(workdir)
  step = ckpt.latest_step()
  ckpt.close()
  assert step is not None and 50 <= step < 200000  # saved mid-run, not at the end
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  # Resuming continues from that step (shortened run so the test stays fast).
  c = _config()
  c.model.hidden = (200, 200)
  c.train.num_steps = step + 3
  resumed = train_and_evaluate(c, workdir)
  assert resumed["status"] == "completed" and resumed["step"] == step + 3
