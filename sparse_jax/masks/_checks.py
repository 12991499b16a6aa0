"""Argument checks shared by the mask functions (clear, early ValueErrors)."""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
import numpy as np


def check_int(value, name: str, *, who: str = "", minimum: int = 1) -> int:
  """Returns ``value`` as a Python int ``>= minimum``, or raises a ValueError naming it.

  ``who`` (e.g. "foovb") prefixes the message.
  """
  prefix = f"{who}: " if who else ""
  try:
    v = operator.index(value)
  except TypeError:
    raise ValueError(f"{prefix}{name} must be a Python int >= {minimum}, got "
                     f"{value!r}.") from None
  if v < minimum:
    raise ValueError(f"{prefix}{name} must be >= {minimum}, got {name}={v}.")
  return v


def check_m(m) -> int:
  """Returns ``m`` as a Python int, or raises a ValueError naming it."""
  return check_int(m, "m")


def check_nm(n, m) -> tuple[int, int]:
  """Returns ``(n, m)`` as Python ints with ``1 <= n <= m``, else ValueError."""
  m = check_m(m)
  try:
    n_int = operator.index(n)
  except TypeError:
    raise ValueError(
        f"n (the number of entries KEPT per group) must be a Python int, got "
        f"{n!r}.") from None
  if not 1 <= n_int <= m:
    raise ValueError(
        f"n (the number of entries KEPT per group of m) must satisfy "
        f"1 <= n <= m, got n={n_int}, m={m}.")
  return n_int, m


def is_static_int(x) -> bool:
  """True for Python/NumPy ints (and 0-d concrete integer arrays)."""
  if isinstance(x, jax.core.Tracer):
    return False
  try:
    operator.index(x)
    return True
  except TypeError:
    return False


def check_traced_n(n) -> jax.Array:
  """Accepts a traced/array integer scalar ``n`` (e.g. from a schedule)."""
  if (not isinstance(n, (jax.Array, np.ndarray)) or jnp.ndim(n) != 0
      or not jnp.issubdtype(jnp.result_type(n), jnp.integer)):
    raise ValueError(
        f"n (the number of entries KEPT per group) must be a Python int or an "
        f"integer scalar array, got {n!r}.")
  return jnp.asarray(n)


def normalize_axis(axis, ndim: int, *, name: str = "axis") -> int:
  """Returns ``axis`` in ``[0, ndim)`` or raises a ValueError."""
  try:
    axis = operator.index(axis)
  except TypeError:
    raise ValueError(f"{name} must be an int, got {axis!r}.") from None
  if not -ndim <= axis < ndim:
    raise ValueError(
        f"{name}={axis} is out of range for an array with {ndim} dimensions.")
  return axis % ndim


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
