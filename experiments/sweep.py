"""Runs one config over variants and seeds; writes a mean +- std table.

    python experiments/sweep.py --config=configs/mlp_digits.py --variants=';smoke' \
        --seeds=0,1,2 --workdir=workdirs/sweep

``--variants`` is a ``;``-separated list of config args (each itself a comma-separated
list of variants, as after the ``:`` of ``--config``); without it, the config file's
``SWEEP = dict(variants=[...], seeds=[...])`` is used, or with ``--sweep=NAME`` its
``SWEEPS[NAME]`` (e.g. ``configs/charlm.py``'s ``flagship``). ``--base`` is prepended to every
variant (e.g. ``--base=smoke`` for a quick check). Completed runs are skipped on rerun.
Writes ``workdir/sweep.json`` and ``workdir/sweep.md``.
"""

from __future__ import annotations

import os
import sys


from absl import flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparse_jax.training import run_experiment  # noqa: E402
from sparse_jax.training.checkpoint import quiet_orbax_logging  # noqa: E402
from sparse_jax.training.cli import run_main  # noqa: E402
from sparse_jax.training.config import load_config_module  # noqa: E402
from sparse_jax.training.devices import ensure_cpu_devices  # noqa: E402
from sparse_jax.training.sweep import run_sweep  # noqa: E402

_CONFIG = flags.DEFINE_string("config", None, "Config file (configs/*.py).")
_VARIANTS = flags.DEFINE_string("variants", "", "';'-separated config args.")
_BASE = flags.DEFINE_string("base", "", "Config arg prepended to every variant.")
_SEEDS = flags.DEFINE_list("seeds", None, "Seeds (default: the config's SWEEP, or 0,1,2).")
_METRICS = flags.DEFINE_list("metrics", None,
                             "Result keys to tabulate (default: the config's SWEEP, "
                             "or test_accuracy).")
_SWEEP = flags.DEFINE_string("sweep", None,
                             "A named sweep of the config file (its SWEEPS dict).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  quiet_orbax_logging()
  module = load_config_module(_CONFIG.value)
  get_config = module.get_config
  defaults = getattr(module, "SWEEP", {})
  if _SWEEP.value:
    named = getattr(module, "SWEEPS", {})
    if _SWEEP.value not in named:
      raise ValueError(f"--sweep={_SWEEP.value}: {_CONFIG.value} defines the sweeps "
                       f"{sorted(named)}")
    defaults = named[_SWEEP.value]
  variants = (_VARIANTS.value.split(";") if _VARIANTS.value
              else list(defaults.get("variants", [""])))
  seeds = _SEEDS.value if _SEEDS.value is not None else defaults.get("seeds", [0, 1, 2])
  metrics = _METRICS.value or defaults.get("metrics", ["test_accuracy"])

  def make_config(variant):
    arg = ",".join(filter(None, [_BASE.value, variant]))
    config = get_config(arg or None)
    config.lock()
    return config

  ensure_cpu_devices(max(int(make_config(v).train.get("num_devices", 1) or 1)
                         for v in variants))
  run_sweep(make_config, variants, [int(s) for s in seeds], _WORKDIR.value,
            run=run_experiment, metrics=metrics,
            percent=[m for m in metrics if "accuracy" in m])


if __name__ == "__main__":
  run_main(main)
