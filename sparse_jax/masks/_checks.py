"""Mask-specific checks; the generic validators live in :mod:`sparse_jax._core.checks`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax._core.checks import (check_int, check_m, check_nm,  # noqa: F401
                                     check_traced_n, is_static_int,
                                     normalize_axis)


def magnitude_key(w: jax.Array) -> jax.Array:
  """A key ordered like |w|, NaN ranked below every number (even 0)."""
  if jnp.issubdtype(w.dtype, jnp.bool_):
    return w.astype(jnp.int8)
  if w.dtype in (jnp.bfloat16, jnp.float16):
    w = w.astype(jnp.float32)  # exact; CPUs compare f32 much faster
  a = jnp.abs(w)
  if jnp.issubdtype(w.dtype, jnp.inexact):
    # The bits of |w| as a signed int: ordered like the magnitudes, and
    # exact for subnormals (XLA:CPU flushes them to 0 in float compares, so
    # 1e-45 would tie with 0); NaN (whose bits exceed inf's) becomes -1.
    bits = jax.lax.bitcast_convert_type(
        a, jnp.int64 if a.dtype == jnp.float64 else jnp.int32)
    return jnp.where(jnp.isnan(a), jnp.asarray(-1, bits.dtype), bits)
  return a


def check_float_like(w, *, name: str = "w") -> None:
  """Rejects complex inputs (|w| ranking is defined for real numbers here)."""
  if np.issubdtype(np.dtype(w.dtype), np.complexfloating):
    raise ValueError(f"{name} must be real, got dtype {w.dtype}.")
