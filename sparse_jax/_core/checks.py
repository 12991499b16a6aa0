"""Argument validators: one style for every family.

Every message has the form ``"{who}: {name} must be ..., got {value!r}."``.
A bool is never accepted as a number (``m=True`` is a mistake, not ``m=1``);
NaN and inf are never accepted as a hyperparameter.

Hyperparameters a user may inject with ``optax.inject_hyperparams`` (which
turns every numeric argument into a scalar array held in the state) accept
scalar arrays: concrete ones are checked like numbers, traced ones (inside
the jitted update) only for their dtype and shape (``traced_ok=True``).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _prefix(who: str) -> str:
  return f"{who}: " if who else ""


def is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def _is_bool(x: Any) -> bool:
  if isinstance(x, (bool, np.bool_)):
    return True
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.bool_)


def check_int(value: Any, name: str, *, who: str = "", minimum: int = 1,
              allow_none: bool = False, traced_ok: bool = False) -> Any:
  """``value`` as a Python int ``>= minimum`` (or None / a traced int scalar).

  Raises a ValueError naming ``name`` (and ``who``) otherwise.
  """
  if value is None and allow_none:
    return None
  what = f"an int >= {minimum}" + (" or None" if allow_none else "")
  if _is_bool(value):
    raise ValueError(f"{_prefix(who)}{name} must be {what}, got the bool "
                     f"{value!r}.")
  if traced_ok and is_traced(value):
    if jnp.ndim(value) or not jnp.issubdtype(value.dtype, jnp.integer):
      raise ValueError(f"{_prefix(who)}{name} must be an integer scalar, got "
                       f"{value!r}.")
    return value
  if is_traced(value):
    raise ValueError(
        f"{_prefix(who)}{name} must be a static {what}: it fixes array "
        f"shapes, got a traced value (with optax.inject_hyperparams pass "
        f"static_args=('{name}',)).")
  try:
    v = operator.index(value)
  except TypeError:
    raise ValueError(f"{_prefix(who)}{name} must be {what}, got "
                     f"{value!r}.") from None
  if v < minimum:
    raise ValueError(f"{_prefix(who)}{name} must be an int >= {minimum}, got "
                     f"{name}={v}.")
  return v


def check_float(value: Any, name: str, *, who: str = "",
                minimum: float | None = None, maximum: float | None = None,
                min_open: bool = False, max_open: bool = False,
                allow_none: bool = False, traced_ok: bool = False) -> Any:
  """``value`` as a finite Python float in the given range.

  ``minimum``/``maximum`` bound the range (``min_open``/``max_open`` make the
  bound exclusive). With ``traced_ok`` a traced real scalar passes unchecked
  (an injected hyperparameter inside the jitted update).
  """
  if value is None and allow_none:
    return None
  lo = "" if minimum is None else f"{'>' if min_open else '>='} {minimum}"
  hi = "" if maximum is None else f"{'<' if max_open else '<='} {maximum}"
  what = "a finite number" + (f" {lo}" if lo else "") + (
      f"{' and' if lo else ''} {hi}" if hi else "")
  if _is_bool(value):
    raise ValueError(f"{_prefix(who)}{name} must be {what}, got the bool "
                     f"{value!r}.")
  if traced_ok and is_traced(value):
    if jnp.ndim(value) or not (jnp.issubdtype(value.dtype, jnp.floating)
                               or jnp.issubdtype(value.dtype, jnp.integer)):
      raise ValueError(f"{_prefix(who)}{name} must be a real scalar, got "
                       f"{value!r}.")
    return value
  try:
    if jnp.ndim(value):
      raise TypeError
    v = float(value)
  except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
    raise ValueError(f"{_prefix(who)}{name} must be {what}, got "
                     f"{value!r}.") from None
  if not math.isfinite(v):
    raise ValueError(f"{_prefix(who)}{name} must be finite, got "
                     f"{name}={value!r}.")
  bad = False
  if minimum is not None:
    bad |= v <= minimum if min_open else v < minimum
  if maximum is not None:
    bad |= v >= maximum if max_open else v > maximum
  if bad:
    if lo and hi:
      rng = (f"in {'(' if min_open else '['}{minimum}, {maximum}"
             f"{')' if max_open else ']'}")
    else:
      rng = lo or hi
    raise ValueError(f"{_prefix(who)}{name} must be {rng}, got "
                     f"{name}={value!r}.")
  return v


def check_choice(value: Any, name: str, choices: Sequence[Any], *,
                 who: str = "") -> Any:
  """``value`` if it is one of ``choices``, else a ValueError listing them."""
  if isinstance(value, bool) or value not in tuple(choices):
    raise ValueError(f"{_prefix(who)}unknown {name} {value!r}: {name} must be "
                     f"one of {tuple(choices)}.")
  return value


def check_bool(value: Any, name: str, *, who: str = "",
               allow_none: bool = False) -> Any:
  """``value`` as a Python bool (not 0/1, not a string)."""
  if value is None and allow_none:
    return None
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{_prefix(who)}{name} must be True or False, got "
                     f"{value!r}.")
  return bool(value)


def check_m(m: Any, *, who: str = "") -> int:
  """The N:M group size ``m`` as a Python int >= 1."""
  return check_int(m, "m", who=who)


def check_nm(n: Any, m: Any, *, who: str = "") -> tuple[int, int]:
  """``(n, m)`` as Python ints with ``1 <= n <= m`` (n = entries KEPT)."""
  m = check_m(m, who=who)
  if _is_bool(n):
    raise ValueError(f"{_prefix(who)}n (the number of entries KEPT per group) "
                     f"must be an int, got the bool {n!r}.")
  try:
    n_int = operator.index(n)
  except TypeError:
    raise ValueError(
        f"{_prefix(who)}n (the number of entries KEPT per group) must be a "
        f"Python int, got {n!r}.") from None
  if not 1 <= n_int <= m:
    raise ValueError(
        f"{_prefix(who)}n (the number of entries KEPT per group of m) must "
        f"satisfy 1 <= n <= m, got n={n_int}, m={m}.")
  return n_int, m


def is_static_int(x: Any) -> bool:
  """True for Python/NumPy ints and concrete 0-d integer arrays (not bools)."""
  if is_traced(x) or _is_bool(x):
    return False
  try:
    operator.index(x)
    return True
  except TypeError:
    return False


def check_traced_n(n: Any, *, who: str = "") -> jax.Array:
  """Accepts a traced/array integer scalar ``n`` (a schedule's or an injected)."""
  if (not isinstance(n, (jax.Array, np.ndarray)) or jnp.ndim(n) != 0
      or not jnp.issubdtype(jnp.result_type(n), jnp.integer)):
    raise ValueError(
        f"{_prefix(who)}n (the number of entries KEPT per group) must be a "
        f"Python int or an integer scalar array, got {n!r}.")
  return jnp.asarray(n)


def normalize_axis(axis: Any, ndim: int, *, name: str = "axis") -> int:
  """``axis`` in ``[0, ndim)``, or a ValueError naming it."""
  if _is_bool(axis):
    raise ValueError(f"{name} must be an int, got the bool {axis!r}.")
  try:
    axis = operator.index(axis)
  except TypeError:
    raise ValueError(f"{name} must be an int, got {axis!r}.") from None
  if not -ndim <= axis < ndim:
    raise ValueError(
        f"{name}={axis} is out of range for an array with {ndim} dimensions.")
  return axis % ndim


def check_float_dtype(dtype: Any, name: str, *, who: str = "",
                      allow_none: bool = False) -> Any:
  """A floating dtype (bf16, f16, f32, f64), or a ValueError naming ``name``."""
  if dtype is None and allow_none:
    return None
  try:
    d = jnp.dtype(dtype)
  except TypeError:
    d = None
  if d is None or not jnp.issubdtype(d, jnp.floating):
    raise ValueError(f"{_prefix(who)}{name} must be a floating-point dtype "
                     f"(e.g. jnp.float32), got {dtype!r}.")
  return d
