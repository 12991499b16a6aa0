"""Private kit that every transform family builds on (not public API).

One piece of plumbing instead of one dialect per family:

* :mod:`~sparse_jax._core.trees` -- flattening with ``optax.MaskedNode``
  leaves, the one path-naming rule, and the ONE leaf resolver (optax
  semantics: a pytree of bools, a prefix of the params, a callable, and
  ``MaskedNode`` leaves from ``optax.masked`` / ``multi_transform``);
* :mod:`~sparse_jax._core.checks` -- argument validators (a bool is not an
  int, NaN/inf are rejected, every message names the parameter);
* :mod:`~sparse_jax._core.keys` -- one ``key`` argument: an int seed, a typed
  key or raw ``uint32`` key data;
* :mod:`~sparse_jax._core.states` -- finding a transform's state inside a
  chain (and replacing it);
* :mod:`~sparse_jax._core.sharding` -- running a computation whose reshapes
  cannot be typed on an Explicit-axes mesh;
* :mod:`~sparse_jax._core.lapack` -- one BLAS thread under jaxlib's CPU
  LAPACK (FOO-VB's factor updates), with no environment variable;
* :mod:`~sparse_jax._core.nm_schedule` -- the score-parameterised N:M mask
  schedule behind ``nm_projection``, ``sr_ste`` and ``foovb_nm_projection``.

Submodules are imported explicitly (``from sparse_jax._core import trees``);
this package imports nothing, so the mask functions can use the validators
without an import cycle.
"""
