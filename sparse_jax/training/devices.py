"""Device setup for launchers."""

from __future__ import annotations

import os

import jax


def ensure_cpu_devices(count: int) -> None:
  """On a CPU-only single process, fakes ``count`` devices (data-parallel configs).

  Call it before anything initialises JAX's backends (``jax.devices()`` etc.); on a
  machine with an accelerator, or with ``JAX_PLATFORMS`` set to something else,
  it does nothing.

  Args:
    count: devices wanted.
  """
  if count > 1 and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
    jax.config.update("jax_num_cpu_devices", max(count, jax.config.jax_num_cpu_devices))
