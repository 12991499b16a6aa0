"""Durable runs: faults injected in real subprocesses and in checkpoint files.

Every fault case ends with the run completed and its results.json and
metrics.jsonl equal to an uninterrupted run's (up to wall_s): nothing lost,
nothing silently wrong. Kills come from tests/_fault_runner.py (SIGKILL at a
random moment, during a checkpoint write, after the final checkpoint, mid
metrics append, during the metrics rewrite, during the results write).
"""

import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from sparse_jax.training.checkpoint import Checkpointer, CheckpointError
from sparse_jax.training.loop import train_and_evaluate
from sparse_jax.training.metrics import MetricWriter, read_metrics, tag_name
from sparse_jax.training.runs import RunError

from _launch import ROOT
from test_training import _config, _final_params, _assert_trees_equal

RUNNER = os.path.join(ROOT, "tests", "_fault_runner.py")
OVERRIDES = ("--config.train.num_steps=24", "--config.train.checkpoint_every=8",
             "--config.train.eval_every=8", "--config.train.log_every=4")


def _launch(workdir, fault="", timeout=240):
  env = dict(os.environ, JAX_PLATFORMS="cpu", FAULT=fault)
  args = [sys.executable, RUNNER,
          f"--config={os.path.join(ROOT, 'configs', 'mlp_digits.py')}:smoke",
          f"--workdir={workdir}", *OVERRIDES]
  return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  results.pop("wall_s")
  return results


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("reference"))
  proc = _launch(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return _results(workdir), read_metrics(workdir), _final_params(workdir)[1]


def _assert_same_run(workdir, reference):
  results, records, params = reference
  assert _results(workdir) == results
  assert read_metrics(workdir) == records  # nothing lost, nothing duplicated
  _assert_trees_equal(_final_params(workdir)[1], params)


# Each case: the faults of successive launches; the last launch has none.
FAULT_CASES = {
    "random_kill_a": ["timer:2.4"],
    "random_kill_b": ["timer:3.1", "timer:2.7"],
    "during_checkpoint_write": ["ckpt_write:2"],
    "during_final_checkpoint_write": ["ckpt_write:3"],
    "after_final_checkpoint": ["after_ckpt:3"],
    "torn_metrics_line": ["torn:5"],
    "during_results_write": ["results"],
    "during_metrics_rewrite": ["after_ckpt:1", "rewrite"],
    "kill_then_torn_then_kill": ["ckpt_write:1", "torn:3", "after_ckpt:1"],
}


@pytest.mark.parametrize("case", sorted(FAULT_CASES))
def test_killed_run_resumes_to_the_same_result(case, tmp_path, reference):
  workdir = str(tmp_path / "run")
  for fault in FAULT_CASES[case]:
    proc = _launch(workdir, fault)
    # -9: killed as planned; 0: a random kill came after the run finished.
    assert proc.returncode in (-9, 0), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
  proc = _launch(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  _assert_same_run(workdir, reference)


def test_rerunning_a_completed_workdir_reemits_its_results(tmp_path, reference):
  workdir = str(tmp_path / "run")
  proc = _launch(workdir, "after_ckpt:1")   # completed after a resume
  assert proc.returncode == -9, proc.stderr[-3000:]
  assert _launch(workdir).returncode == 0
  before = os.path.getmtime(os.path.join(workdir, "results.json"))
  proc = _launch(workdir)
  assert proc.returncode == 0 and "test_accuracy" in proc.stdout
  assert "steps/s" not in proc.stdout  # no progress lines: nothing trained
  assert os.path.getmtime(os.path.join(workdir, "results.json")) == before
  _assert_same_run(workdir, reference)


def test_tensorboard_events_are_flushed_at_each_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  proc = _launch(workdir, "after_ckpt:2")   # SIGKILL right after step 16's
  assert proc.returncode == -9
  events = os.path.join(workdir, "tensorboard")
  data = b"".join(open(os.path.join(events, f), "rb").read()
                  for f in os.listdir(events))
  assert data.count(b"train/loss") == 4      # steps 4, 8, 12, 16: none lost
  assert data.count(b"test/accuracy") == 2   # steps 8, 16


# --------------------------------------------------------------- in process


def _corrupt(workdir, step, how):
  """Flips 16 bytes in (or truncates) the largest file of a checkpoint."""
  root = os.path.join(workdir, "checkpoints", str(step))
  paths = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
  path = max(paths, key=os.path.getsize)
  data = bytearray(open(path, "rb").read())
  if how == "flip":
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
  else:
    data = data[: len(data) // 2]
  with open(path, "wb") as f:
    f.write(bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_corrupt_latest_checkpoint_falls_back_to_the_intact_one(tmp_path, how,
                                                                 caplog):
  full, split = str(tmp_path / "full"), str(tmp_path / "split")
  reference = train_and_evaluate(_config(), full)
  train_and_evaluate(_config(), split, stop_after_step=20)  # checkpoints 16, 20
  _corrupt(split, 20, how)
  with caplog.at_level(logging.WARNING):
    resumed = train_and_evaluate(_config(), split)
  lines = [r.getMessage() for r in caplog.records if "is corrupt" in r.getMessage()]
  assert len(lines) == 1 and os.path.join("checkpoints", "20") in lines[0]
  assert "\n" not in lines[0]
  assert os.listdir(os.path.join(split, "corrupt_checkpoints"))  # kept aside
  for key in ("test_accuracy", "test_loss", "train_loss", "train_accuracy"):
    assert resumed[key] == reference[key], key
  _assert_trees_equal(_final_params(split)[1], _final_params(full)[1])
  assert read_metrics(split) == read_metrics(full)


def test_no_intact_checkpoint_raises_one_clear_error(tmp_path):
  workdir = str(tmp_path)
  train_and_evaluate(_config(), workdir, stop_after_step=20)
  _corrupt(workdir, 20, "flip")
  _corrupt(workdir, 16, "truncate")
  with pytest.raises(CheckpointError, match=r"no intact checkpoint.*step 20: .*"
                     r"step 16: .*move that directory away"):
    train_and_evaluate(_config(), workdir)
  # nothing was moved or overwritten: the same error again
  with pytest.raises(CheckpointError):
    train_and_evaluate(_config(), workdir)


def test_digest_covers_every_leaf(tmp_path):
  ckpt = Checkpointer(str(tmp_path))
  state = {"a": jax.numpy.arange(4.0), "key": jax.random.key(3),
           "b": {"c": jax.numpy.ones((2, 2), jax.numpy.bfloat16)}}
  ckpt.save(1, state)
  ckpt.save(2, jax.tree.map(lambda x: x, state))
  restored = ckpt.restore_latest(state)
  _assert_trees_equal(jax.tree.map(lambda x: x, {"a": restored["a"]}),
                      {"a": state["a"]})
  assert sorted(os.listdir(tmp_path / "checkpoint_digests")) == ["1.json", "2.json"]
  ckpt.save(3, state)   # orbax keeps 2: the digest of step 1 goes with it
  assert sorted(os.listdir(tmp_path / "checkpoint_digests")) == ["2.json", "3.json"]
  ckpt.close()
  with pytest.raises(ValueError, match="max_to_keep must be >= 2"):
    Checkpointer(str(tmp_path), max_to_keep=1)


def test_completed_workdir_with_another_config_is_refused(tmp_path):
  workdir = str(tmp_path)
  train_and_evaluate(_config(8), workdir)
  again = train_and_evaluate(_config(8), workdir)   # re-emitted
  assert again["status"] == "completed"
  with pytest.raises(RunError, match=r"different config.*train.num_steps: 8 -> 9"):
    train_and_evaluate(_config(9), workdir)


def test_metrics_torn_last_line_dropped_corrupt_middle_line_named(tmp_path, caplog):
  writer = MetricWriter(str(tmp_path), tensorboard=False)
  for step in (1, 2, 3):
    writer.write(step, "train", {"loss": float(step)})
  path = tmp_path / "metrics.jsonl"
  with open(path, "a") as f:
    f.write('{"step": 4, "spl')
  with caplog.at_level(logging.WARNING):
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]
  assert any("torn last line" in r.getMessage() for r in caplog.records)
  writer.truncate_after(2)
  assert path.read_text().count("\n") == 2 and read_metrics(str(tmp_path))[-1]["step"] == 2
  path.write_text('{"step": 1, "split": "train"}\nnot json\n{"step": 3, "split": "x"}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not JSON"):
    read_metrics(str(tmp_path))


def test_tag_names_are_legal():
  assert tag_name("sparsity/['hidden'][0]['kernel']/flip_rate") == (
      "sparsity/hidden.0.kernel/flip_rate")
  assert tag_name("train/loss") == "train/loss"
  assert tag_name("a b/c[x]") == "a_b/c_x_"


def test_sparsity_records_use_legal_names(tmp_path):
  c = _config(8)
  c.optimizer.post = (dict(name="nm_projection", n=2, m=4),)
  train_and_evaluate(c, str(tmp_path))
  keys = {k for r in read_metrics(str(tmp_path)) if r["split"] == "sparsity"
          for k in r}
  assert "hidden.0.kernel/flip_rate" in keys, keys
  assert not any("[" in k or "'" in k for k in keys)


def test_nonfinite_losses_stop_the_run_keeping_the_last_good_checkpoint(tmp_path):
  c = _config(40)
  c.optimizer.learning_rate = 1e30     # diverges to inf/NaN at once
  c.optimizer.schedule = "constant"
  c.train.max_nonfinite_steps = 3
  with pytest.raises(RunError, match=r"non-finite for 3 consecutive steps.*"
                     "max_nonfinite_steps"):
    train_and_evaluate(c, str(tmp_path))
  ckpt = Checkpointer(str(tmp_path))
  assert ckpt.latest_step() is None   # no non-finite state was saved
  ckpt.close()
