"""Sharding helpers: shard_map varying types and Explicit-axes meshes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec


def match_vma(x: Any, like: Any) -> Any:
  """Marks ``x`` varying over the shard_map axes ``like`` varies over.

  Inside ``shard_map`` a ``lax.cond`` needs both branches to vary over the
  same mesh axes; values kept from the state may not (e.g. a replicated
  state) while freshly computed ones do. Outside shard_map this is a no-op.
  """
  try:
    missing = tuple(sorted(jax.typeof(like).vma - jax.typeof(x).vma))
  except AttributeError:  # no varying-axes types in this jax
    return x
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def spec_of(x: Any) -> PartitionSpec:
  """The PartitionSpec of ``x``'s type (``P()`` when it has none)."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  return getattr(sharding, "spec", PartitionSpec())


def _explicit_mesh(tree: Any) -> Any:
  """The mesh of the first leaf typed over Explicit mesh axes, else None."""
  for x in jax.tree.leaves(tree):
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    if mesh is not None and AxisType.Explicit in mesh.axis_types:
      return mesh
  return None


def auto_sharded(fn: Callable[..., Any], *args: Any, out_specs: Any) -> Any:
  """``fn(*args)`` with the Explicit mesh axes of ``args`` switched to Auto.

  Mask and posterior computations reshape their inputs into groups or tiles
  (and concatenate kernels with biases); on a mesh with Explicit axes such
  ops have no sharding rule whenever groups straddle devices
  (``ShardingTypeError``). Here the Explicit axes become Auto for ``fn``
  (the compiler inserts whatever communication it needs) and the outputs are
  typed with ``out_specs`` (a pytree of PartitionSpecs matching ``fn``'s
  output; usually the inputs' own), so the caller keeps the params'
  sharding. With no Explicit axis -- no mesh, Auto axes, inside
  ``shard_map`` -- it is exactly ``fn(*args)`` (the same HLO).

  Every traced value ``fn`` uses must be in ``args`` (not closed over).
  """
  mesh = _explicit_mesh(args)
  if mesh is None:
    return fn(*args)
  axes = tuple(a for a, t in zip(mesh.axis_names, mesh.axis_types)
               if t == AxisType.Explicit)
  out = jax.tree.map(lambda s: NamedSharding(mesh, s), out_specs,
                     is_leaf=lambda s: isinstance(s, PartitionSpec))
  return jax.sharding.auto_axes(fn, axes=axes, out_sharding=out)(*args)
