"""One BLAS thread under jaxlib's CPU LAPACK (no environment variable needed).

On CPU, jaxlib runs ``cholesky`` / ``svd`` / ``eigh`` in LAPACK through
``scipy.linalg.cython_lapack``, i.e. on the OpenBLAS that ships inside scipy.
That OpenBLAS starts its own worker threads, which compete with XLA's thread
pool for the same cores: on a busy machine a FOO-VB Kronecker step then
stalls at random (measured: median 500 ms instead of 17 ms on 2 cores with
another process computing). For the small factors FOO-VB decomposes (tens to
hundreds of rows) one thread is also the fastest on a quiet machine.

:func:`single_thread_lapack` pins that library -- only scipy's bundled copy,
found by its path, not numpy's -- to one thread, once per process, when a
transform that needs LAPACK is built. It changes the threads of
``scipy.linalg`` calls in the same process as well (they run the same
library); restore them with ``threadpoolctl`` if that matters.
"""

from __future__ import annotations

import os

_DONE = False


def _scipy_blas(info: list[dict]) -> list[str]:
  import scipy  # noqa: PLC0415  (scipy is a dependency; loads its OpenBLAS)
  root = os.path.dirname(os.path.dirname(os.path.abspath(scipy.__file__)))
  here = (os.path.join(root, "scipy.libs"), os.path.dirname(scipy.__file__))
  return [lib["filepath"] for lib in info
          if lib.get("user_api") == "blas"
          and os.path.abspath(lib["filepath"]).startswith(here)]


def single_thread_lapack() -> None:
  """Pins scipy's bundled BLAS (jaxlib's CPU LAPACK) to one thread, once.

  A no-op after the first call, when the user already set
  ``OPENBLAS_NUM_THREADS`` (their choice wins), when JAX's default backend
  is not the CPU (no LAPACK on the CPU then), and when scipy uses a system
  BLAS (not found by path: nothing is changed).
  """
  global _DONE
  if _DONE:
    return
  _DONE = True
  if os.environ.get("OPENBLAS_NUM_THREADS"):
    return
  import jax  # noqa: PLC0415
  if jax.default_backend() != "cpu":
    return
  import scipy.linalg.cython_lapack  # noqa: F401,PLC0415  (what jaxlib loads)
  from threadpoolctl import ThreadpoolController  # noqa: PLC0415
  controller = ThreadpoolController()
  paths = _scipy_blas(controller.info())
  if paths:
    controller.select(filepath=paths).limit(limits=1)
