"""Non-finite detection shared by the transforms' NaN / inf policies."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def max_abs(leaves: Sequence[jax.Array]) -> jax.Array:
  """``max |x|`` over all leaves as float32; NaN when any entry is NaN or inf.

  Every reduction reads the leaf itself (``max x``, ``min x`` and the
  non-finite probe ``sum(x - x)``): XLA:CPU hands reductions to a library
  that needs its input in memory, so ``|x|`` or ``x * 0`` would be written
  out first, a pass per leaf more. The probe is NaN exactly when some entry
  is NaN or inf (XLA:CPU's max reduction may drop NaN).
  """
  out = jnp.zeros((), jnp.float32)
  for x in leaves:
    x = x.astype(jnp.float32)
    out = jnp.maximum(out, jnp.maximum(jnp.max(x, initial=0.0),
                                       -jnp.min(x, initial=0.0)))
    out = out + jnp.sum(x - x)
  return out


def all_finite(leaves: Sequence[jax.Array]) -> jax.Array:
  """Boolean scalar: every entry of every leaf is finite."""
  out = jnp.zeros((), jnp.float32)
  for x in leaves:
    x = x.astype(jnp.float32)
    out = out + jnp.sum(x - x)   # NaN iff some entry is NaN or inf
  return jnp.isfinite(out)


def scaled_sq_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
  """``sum((x * scale)^2)`` in float32, safe from over- and underflow.

  Usually one read of ``x``: ``(sqrt(sum x^2) * scale)^2``; only when
  ``sum x^2`` overflows, or is so small that squares may have underflowed,
  the sum is taken again over ``x * scale``. (``scale`` is typically
  ``1 / max |x|``; multiplying before the reduction would make XLA:CPU
  write a broadcast of it, a pass per leaf.)
  """
  x = x.astype(jnp.float32)
  raw = jnp.sum(jnp.square(x))
  fast = jnp.isfinite(raw) & (raw >= 2.0 ** -60)
  return jax.lax.cond(
      fast, lambda x: jnp.square(jnp.sqrt(raw) * scale),
      lambda x: jnp.sum(jnp.square(x * scale)), x)


def where_finite(finite: jax.Array, new, old):
  """``new`` where ``finite`` else ``old``, leaf by leaf (None leaves stay)."""
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
