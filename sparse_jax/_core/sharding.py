"""Sharding helpers: shard_map varying types and Explicit-axes meshes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec


def varying_axes(x: Any) -> frozenset | None:
  """The shard_map mesh axes ``x``'s type varies over (None: no such types).

  JAX 0.10 keeps them in ``typeof(x).manual_axis_type.varying``; earlier
  versions in ``typeof(x).vma``.
  """
  t = jax.typeof(x)
  manual = getattr(t, "manual_axis_type", None)
  if manual is not None:
    return frozenset(manual.varying)
  vma = getattr(t, "vma", None)
  return None if vma is None else frozenset(vma)


def is_varying(x: Any, axis_name: Any) -> bool | None:
  """Whether ``x``'s type varies over every axis of ``axis_name`` (a name or
  a tuple of names); None where this JAX has no varying types."""
  axes = varying_axes(x)
  if axes is None:
    return None
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  return all(a in axes for a in names)


def varying_checked(axis_name: Any) -> bool:
  """Whether shard_map tracks varying types over ``axis_name`` here.

  With ``check_vma=False`` nothing is typed varying, not even the axis
  index, so a missing axis in a value's type then proves nothing.
  """
  return is_varying(jax.lax.axis_index(axis_name), axis_name) is True


def match_vma(x: Any, like: Any) -> Any:
  """Marks ``x`` varying over the shard_map axes ``like`` varies over.

  Inside ``shard_map`` a ``lax.cond`` needs both branches to vary over the
  same mesh axes; values kept from the state may not (e.g. a replicated
  state) while freshly computed ones do. Outside shard_map this is a no-op.
  """
  have, want = varying_axes(x), varying_axes(like)
  if have is None or want is None:  # no varying-axes types in this jax
    return x
  missing = tuple(sorted(want - have))
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
