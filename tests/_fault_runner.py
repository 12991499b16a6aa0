"""Runs experiments/main.py with ONE fault injected (for tests/test_durability.py).

The fault comes from the FAULT environment variable, ``kind:n``:

- ``timer:S``: SIGKILL after S seconds (a random moment);
- ``ckpt_write:K``: SIGKILL while the K-th checkpoint is being written (orbax
  is saving in its background thread);
- ``after_ckpt:K``: SIGKILL right after the K-th checkpoint is complete;
- ``torn:K``: the K-th metrics record is half written, then SIGKILL;
- ``rewrite``: SIGKILL during the resume-time rewrite of metrics.jsonl (the
  new file is written, not yet renamed);
- ``results``: SIGKILL while results.json is written (before the rename).
"""

import os
import runpy
import signal
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "experiments", "main.py")
sys.path.insert(0, ROOT)

import orbax.checkpoint as ocp  # noqa: E402

from sparse_jax.training import checkpoint, files, metrics  # noqa: E402


def die():
  sys.stdout.flush()
  os.kill(os.getpid(), signal.SIGKILL)


kind, _, arg = os.environ.get("FAULT", "").partition(":")
calls = {"n": 0}

if kind == "timer":
  threading.Timer(float(arg), die).start()
elif kind == "ckpt_write":
  original_wait = ocp.CheckpointManager.wait_until_finished

  def wait(self):
    calls["n"] += 1
    if calls["n"] == int(arg):
      time.sleep(0.002)  # the background save is under way
      die()
    return original_wait(self)

  ocp.CheckpointManager.wait_until_finished = wait
elif kind == "after_ckpt":
  original_save = checkpoint.Checkpointer.save

  def save(self, step, state):
    original_save(self, step, state)
    calls["n"] += 1
    if calls["n"] == int(arg):
      die()

  checkpoint.Checkpointer.save = save
elif kind == "torn":
  original_write = metrics.MetricWriter.write

  def write(self, step, split, values):
    calls["n"] += 1
    if calls["n"] == int(arg):
      with open(self.path, "a") as f:
        f.write('{"step": %d, "split": "%s", "lo' % (step, split))
      die()
    return original_write(self, step, split, values)

  metrics.MetricWriter.write = write
elif kind in ("rewrite", "results"):
  target = "metrics.jsonl" if kind == "rewrite" else "results.json"
  original_replace = os.replace

  def replace(src, dst, *a, **k):
    if str(dst).endswith(target):
      die()
    return original_replace(src, dst, *a, **k)

  files.os.replace = replace
elif kind:
  raise SystemExit(f"unknown FAULT {kind!r}")

sys.argv = [MAIN] + sys.argv[1:]
runpy.run_path(MAIN, run_name="__main__")
