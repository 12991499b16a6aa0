"""Runs one config over variants and seeds; writes a mean +- std table.

    python experiments/sweep.py --config=configs/mlp_digits.py --variants=,smoke \
        --seeds=0,1,2 --workdir=workdirs/sweep

``--variants`` is a ``;``-separated list of config args (each itself a comma-separated
list of variants, as after the ``:`` of ``--config``); ``--base`` is prepended to every
one (e.g. ``--base=smoke`` for a quick check). Completed runs are skipped on rerun.
Writes ``workdir/sweep.json`` and ``workdir/sweep.md``.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparse_jax.training import run_experiment  # noqa: E402
from sparse_jax.training.sweep import run_sweep  # noqa: E402

_CONFIG = flags.DEFINE_string("config", None, "Config file (configs/*.py).")
_VARIANTS = flags.DEFINE_string("variants", "", "';'-separated config args.")
_BASE = flags.DEFINE_string("base", "", "Config arg prepended to every variant.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_METRICS = flags.DEFINE_list("metrics", ["test_accuracy"], "Result keys to tabulate.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory.")
flags.mark_flags_as_required(["config", "workdir"])


def load_get_config(path: str):
  spec = importlib.util.spec_from_file_location("_sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config


def main(argv):
  del argv
  get_config = load_get_config(_CONFIG.value)
  variants = _VARIANTS.value.split(";")

  def make_config(variant):
    arg = ",".join(filter(None, [_BASE.value, variant]))
    config = get_config(arg or None)
    config.lock()
    return config

  run_sweep(make_config, variants, [int(s) for s in _SEEDS.value], _WORKDIR.value,
            run=run_experiment, metrics=_METRICS.value,
            percent=[m for m in _METRICS.value if "accuracy" in m])


if __name__ == "__main__":
  app.run(main)
