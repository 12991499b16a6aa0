"""Helpers to launch experiments/main.py as a subprocess, as a user would."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "experiments", "main.py")


def launch_args(config, workdir, *overrides):
  return [sys.executable, MAIN, f"--config={os.path.join(ROOT, config)}",
          f"--workdir={workdir}", *overrides]


def launch(config, workdir, *overrides, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(launch_args(config, workdir, *overrides), cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)
