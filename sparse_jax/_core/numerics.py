"""Non-finite detection shared by the transforms' NaN / inf policies."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def max_abs(leaves: Sequence[jax.Array]) -> jax.Array:
  """``max |x|`` over all leaves as float32; NaN when any entry is NaN or inf.

  XLA:CPU's max reduction may drop NaN, so non-finite entries are detected by
  ``x * 0`` (NaN exactly where ``x`` is not finite) summed into the result.
  """
  out = jnp.zeros((), jnp.float32)
  for x in leaves:
    a = jnp.abs(x.astype(jnp.float32))
    out = jnp.maximum(out, jnp.max(a, initial=0.0)) + jnp.sum(a * 0.0)
  return out


def all_finite(leaves: Sequence[jax.Array]) -> jax.Array:
  """Boolean scalar: every entry of every leaf is finite."""
  out = jnp.zeros((), jnp.float32)
  for x in leaves:
    out = out + jnp.sum(x.astype(jnp.float32) * 0.0)
  return jnp.isfinite(out)


def where_finite(finite: jax.Array, new, old):
  """``new`` where ``finite`` else ``old``, leaf by leaf (None leaves stay)."""
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
