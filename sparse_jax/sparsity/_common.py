"""Glue shared by the sparsity transforms: per-leaf masks and sparse pytrees.

Masks live in pytrees with the structure of the params; leaves that are not
pruned hold ``optax.MaskedNode()`` (an empty pytree node), as in optax.masked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from sparse_jax.masks import nm_mask, transposable_nm_mask_tree
from sparse_jax.masks import _checks
from sparse_jax.masks.transposable import METHODS, OBJECTIVES
from sparse_jax.sparsity.leaves import MaskedNode, PrunedLeaf


def is_masked_node(x) -> bool:
  return isinstance(x, MaskedNode)


def check_options(n, m, *, transposable: bool, method: str, objective: str,
                  who: str):
  """Validates n, m, method and objective (at construction or trace time).

  ``n`` is a Python int, or -- for plain N:M only -- a schedule (a callable
  ``count -> n``) or a traced integer scalar.
  """
  if _checks.is_static_int(n):
    n, m = _checks.check_nm(n, m)
  else:
    m = _checks.check_m(m)
    if transposable:
      raise ValueError(f"{who}: transposable masks need n as a Python int "
                       f"(no schedule or traced n), got {n!r}.")
    if not callable(n):
      n = _checks.check_traced_n(n)
  if method not in METHODS:
    raise ValueError(f"{who}: method must be one of {METHODS}, got "
                     f"{method!r}.")
  if objective not in OBJECTIVES:
    raise ValueError(f"{who}: objective must be one of {OBJECTIVES}, got "
                     f"{objective!r}.")
  return n, m


def check_step(value, name: str, who: str, *, allow_none: bool = False,
               minimum: int = 0):
  if value is None and allow_none:
    return None
  return _checks.check_int(value, name, who=who, minimum=minimum)


def compute_masks(arrays: Sequence[jax.Array], pruned: Sequence[PrunedLeaf],
                  n, m: int, *, transposable: bool, method: str,
                  objective: str) -> list[jax.Array]:
  """Masks of the pruned arrays (one batched solve when transposable)."""
  if not arrays:
    return []
  if transposable:
    return list(transposable_nm_mask_tree(list(arrays), n, m, method=method,
                                          objective=objective))
  return [nm_mask(a, n, m, axis=p.axis) for a, p in zip(arrays, pruned)]


def gather(tree, pruned: Sequence[PrunedLeaf]) -> list[Any]:
  """The pruned leaves of a params-like pytree (MaskedNode counts as a leaf)."""
  leaves = jax.tree.leaves(tree, is_leaf=is_masked_node)
  return [leaves[p.index] for p in pruned]


def scatter(params, pruned: Sequence[PrunedLeaf], values: Sequence[Any],
            fill: Any = None):
  """A params-structured pytree: ``values`` on pruned leaves, ``fill`` else.

  ``fill=None`` puts ``MaskedNode()`` on the other leaves.
  """
  leaves, treedef = jax.tree.flatten(params)
  out = [MaskedNode() if fill is None else fill] * len(leaves)
  for p, v in zip(pruned, values):
    out[p.index] = v
  return jax.tree.unflatten(treedef, out)


def replace(params, pruned: Sequence[PrunedLeaf], values: Sequence[Any]):
  """``params`` with the pruned leaves replaced by ``values``."""
  leaves, treedef = jax.tree.flatten(params)
  leaves = list(leaves)
  for p, v in zip(pruned, values):
    leaves[p.index] = v
  return jax.tree.unflatten(treedef, leaves)


def match_vma(x, like):
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


def kept_mass(w: jax.Array, mask: jax.Array) -> jax.Array:
  """Fraction of ``sum |w|`` on the kept entries (1 for an all-zero ``w``)."""
  a = jnp.abs(w.astype(jnp.float32))
  total = a.sum()
  return jnp.where(total > 0, jnp.where(mask, a, 0.0).sum() / total, 1.0)


def flip_rate(old: jax.Array, new: jax.Array) -> jax.Array:
  """Fraction of entries whose mask changed."""
  return jnp.mean((old != new).astype(jnp.float32))
