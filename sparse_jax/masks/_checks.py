"""Mask-specific checks; the generic validators live in :mod:`sparse_jax._core.checks`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax._core.checks import (check_int, check_m, check_nm,  # noqa: F401
                                     check_traced_n, is_static_int,
                                     normalize_axis)


def magnitude_key(w: jax.Array) -> jax.Array:
  """|w| with NaN mapped to -1, so NaN ranks below every number (even 0)."""
  if jnp.issubdtype(w.dtype, jnp.bool_):
    return w.astype(jnp.int8)
  if w.dtype in (jnp.bfloat16, jnp.float16):
    w = w.astype(jnp.float32)  # exact; CPUs compare f32 much faster
  a = jnp.abs(w)
  if jnp.issubdtype(w.dtype, jnp.inexact):
    a = jnp.where(jnp.isnan(a), jnp.asarray(-1, a.dtype), a)
  return a


def check_float_like(w, *, name: str = "w") -> None:
  """Rejects complex inputs (|w| ranking is defined for real numbers here)."""
  if np.issubdtype(np.dtype(w.dtype), np.complexfloating):
    raise ValueError(f"{name} must be real, got dtype {w.dtype}.")
