"""One ``key`` argument for every random transform.

``key`` may be an int seed, a typed key (``jax.random.key``), raw ``uint32``
key data (``jax.random.PRNGKey``), or an integer scalar array (e.g. a seed
injected by ``optax.inject_hyperparams``, traced inside jit). States store the
raw ``uint32`` key data: it checkpoints like any array. An int seed ``s``
gives the same stream as ``jax.random.key(s)`` and ``jax.random.PRNGKey(s)``.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax._core.checks import _is_bool, _prefix


def as_key(key: Any, *, who: str = "", name: str = "key") -> jax.Array:
  """``key`` canonicalised to a typed PRNG key (see the module docstring)."""
  if _is_bool(key):
    raise ValueError(f"{_prefix(who)}{name} must be an int seed or a PRNG key, "
                     f"got the bool {key!r}.")
  if isinstance(key, (int, np.integer)):
    return jax.random.key(int(key))
  dtype = getattr(key, "dtype", None)
  if dtype is not None:
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
      return key
    if dtype == jnp.uint32 and jnp.shape(key)[-1:] == (2,):
      return jax.random.wrap_key_data(jnp.asarray(key))
    if jnp.issubdtype(dtype, jnp.integer) and jnp.ndim(key) == 0:
      return jax.random.key(key)
  raise ValueError(f"{_prefix(who)}{name} must be an int seed or a PRNG key "
                   f"(jax.random.key / jax.random.PRNGKey), got {key!r}.")


def key_data(key: Any, *, who: str = "", name: str = "key") -> jax.Array:
  """Raw ``uint32`` data of :func:`as_key` (what states store), a fresh buffer."""
  return jnp.array(jax.random.key_data(as_key(key, who=who, name=name)),
                   copy=True)


def seed_or_key(key: Any, seed: Any, *, who: str, default: int = 0) -> Any:
  """Resolves the deprecated ``seed=`` argument into ``key`` (with a warning)."""
  if seed is None:
    return default if key is None else key
  if key is not None:
    raise ValueError(f"{who}: give key (seed is its deprecated name), not "
                     "both.")
  warnings.warn(f"{who}: seed= is deprecated, pass key= (an int seed or a "
                "PRNG key).", DeprecationWarning, stacklevel=3)
  return seed
