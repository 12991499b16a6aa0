"""Test-wide setup: 8 fake CPU devices for the multi-device tests.

This must run before JAX initialises its backends, which is why it lives here
(pytest imports conftest.py before any test module).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
