"""Multi-process setup: ``jax.distributed.initialize``, gloo collectives on CPU.

Call :func:`initialize_distributed` first thing in every process (before any
other JAX call creates a backend). On CPU it selects the gloo collectives, so
several processes on one machine (or on a LAN) form one mesh over loopback
TCP; on GPU/TPU the option is ignored and the platform's collectives are used.
"""

from __future__ import annotations

import numbers

import jax


def initialize_distributed(coordinator_address: str, num_processes: int,
                           process_id: int, *,
                           local_device_count: int | None = None,
                           cpu_collectives: str = "gloo",
                           initialization_timeout: int = 300) -> None:
  """Joins this process to a multi-process JAX run.

  Args:
    coordinator_address: ``"host:port"`` of process 0 (e.g.
      ``"127.0.0.1:12345"``); every process passes the same one.
    num_processes: the number of processes, ``>= 1``.
    process_id: this process, ``0 <= process_id < num_processes``.
    local_device_count: if set, the number of CPU devices this process
      exposes (``jax_num_cpu_devices``); must be set before the backend
      starts.
    cpu_collectives: ``jax_cpu_collectives_implementation`` ("gloo" or
      "mpi").
    initialization_timeout: seconds to wait for all processes.

  Example:
    In process ``i`` of 2 (each with 2 CPU devices)::

      initialize_distributed("127.0.0.1:12345", 2, i, local_device_count=2)
      jax.device_count()    # 4: the mesh spans both processes

  References:
    https://docs.jax.dev/en/latest/multi_process.html
  """
  if not isinstance(coordinator_address, str) or ":" not in coordinator_address:
    raise ValueError(f"initialize_distributed: coordinator_address must be "
                     f"'host:port', got {coordinator_address!r}")
  for name, value, low in (("num_processes", num_processes, 1),
                           ("process_id", process_id, 0)):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (
        value < low):
      raise ValueError(f"initialize_distributed: {name} must be an int >= "
                       f"{low}, got {value!r}")
  if process_id >= num_processes:
    raise ValueError(f"initialize_distributed: process_id={process_id} must be "
                     f"< num_processes={num_processes}")
  if local_device_count is not None:
    jax.config.update("jax_num_cpu_devices", int(local_device_count))
  jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=int(num_processes), process_id=int(process_id),
      initialization_timeout=initialization_timeout)
