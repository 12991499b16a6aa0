"""Which parameters get an N:M mask, and along which axis (the optax way).

A transform's ``mask`` argument is a pytree of bools with the structure of the
params (or a prefix of it), or a callable ``params -> such a pytree``; ``None``
uses :func:`default_filter`. Leaves that ``optax.masked`` /
``optax.multi_transform`` replaced by ``optax.MaskedNode()`` are never pruned.
Its ``axis`` argument is one int for every leaf, a pytree of ints (or a
prefix), or a callable ``params -> pytree of ints`` (see :func:`axis_by_path`).

The implementation is the one leaf resolver every family shares
(:mod:`sparse_jax._core.trees`, :mod:`sparse_jax._core.nm_schedule`); this
module keeps the public names.
"""

from __future__ import annotations

import optax

from sparse_jax._core.nm_schedule import (AxisSpec, MaskSpec, PrunedLeaf,
                                          axis_by_path, default_filter,
                                          resolve)
from sparse_jax._core.trees import leaf_name

MaskedNode = optax.MaskedNode
Params = object

__all__ = ["AxisSpec", "MaskSpec", "MaskedNode", "PrunedLeaf", "axis_by_path",
           "default_filter", "leaf_name", "resolve"]
