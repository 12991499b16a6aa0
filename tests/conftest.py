"""Test-wide setup: 8 fake CPU devices for the multi-device tests.

This must run before JAX initialises its backends, which is why it lives here
(pytest imports conftest.py before any test module).
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# LAPACK (scipy's OpenBLAS) threads fight XLA's for the 2 cores: Kronecker /
# full-covariance solves stall at random without this.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Test shapes are tiny, so compiling (not running) dominates the suite:
# - LLVM without optimisation passes compiles ~2x faster and computes the
#   same IEEE results (XLA:CPU never enables fast-math by default);
# - XLA:CPU's older LLVM-IR fusion emitters compile ~1.5x faster than its
#   MLIR fusion emitters (the composition battery: 61 s -> 40 s).
for _flag in ("--xla_backend_optimization_level=0",
              "--xla_cpu_use_fusion_emitters=false"):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                               + _flag).strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

# Launched runs (killed and resumed ones above all) recompile the same
# programs: the subprocesses share an on-disk compilation cache, one per test
# process (~2x faster launches). Set after `import jax`, which has read its
# configuration already, so only the children use it.
_xla_cache = tempfile.mkdtemp(prefix="sparse-jax-tests-xla-")
atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _xla_cache)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
  """Drops JAX's compilation caches after every test module.

  Each live XLA:CPU executable holds about six memory mappings (its JIT code
  and data), and the jit caches keep the executables of module-level
  functions alive. A test worker that ran most of the suite reached Linux's
  ``vm.max_map_count`` (65,530) and LLVM's JIT then segfaulted inside
  ``backend_compile_and_load``, in whichever test compiled next.
  """
  yield
  jax.clear_caches()
