"""Launches one sparse_jax experiment from an ml_collections config.

    python experiments/main.py --config=configs/mlp_digits.py --workdir=workdirs/mlp_digits

``--config`` takes ``path/to/config.py[:variant,...]``; any field can be overridden
with ``--config.section.key=value``; the config is locked, so a mistyped key fails
before anything runs. Rerunning the same command on the same ``--workdir`` resumes
from its last checkpoint (or, for a finished run, prints its results again).
Output: progress lines and the results table; ``--verbosity=0`` adds the INFO
log, ``--verbosity=1`` also the traceback of a failure (otherwise one line).
"""

from __future__ import annotations

import os
import sys


from absl import flags, logging  # noqa: E402
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparse_jax.training import run_experiment  # noqa: E402
from sparse_jax.training.checkpoint import quiet_orbax_logging  # noqa: E402
from sparse_jax.training.cli import run_main  # noqa: E402
from sparse_jax.training.devices import ensure_cpu_devices  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py[:variant]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the run's outputs.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "Multi-process: host:port of process 0 (e.g. 127.0.0.1:12345).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Multi-process: processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "Multi-process: this process.")
_LOCAL_DEVICES = flags.DEFINE_integer(
    "local_device_count", None, "Multi-process on CPU: devices per process.")
flags.mark_flags_as_required(["config", "workdir"])

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: schedulers read it as "requeue me"


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]} (flags are --name=value)")
  quiet_orbax_logging()
  if _NUM_PROCESSES.value > 1:
    from sparse_jax.compression import initialize_distributed
    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                           _PROCESS_ID.value, local_device_count=_LOCAL_DEVICES.value)
  config = _CONFIG.value
  if _NUM_PROCESSES.value == 1:
    ensure_cpu_devices(int(config.train.get("num_devices", 1) or 1))
  logging.info("config:\n%s", config)
  results = run_experiment(config, _WORKDIR.value)
  if results["status"] == "preempted":
    logging.warning("preempted at step %d; rerun the same command to resume",
                    results["step"])
    sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  run_main(main)
