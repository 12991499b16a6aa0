"""Finding a transform's state inside an optax state (a chain, masked, ...)."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

PyTree = Any


def unwrap(opt_state: Any) -> Any:
  """The plain optax state of ``opt_state`` (also of an ``nnx.Optimizer``).

  ``nnx.Optimizer`` keeps its optax state as ``opt.opt_state``, a tree whose
  arrays are wrapped in ``nnx.OptState`` variables; this returns the plain
  tree (``nnx.as_pure``; nothing else is unwrapped), so helpers such as
  ``foovb_sample`` accept the optimizer, its ``opt_state``, or the plain
  state alike.
  """
  inner = getattr(opt_state, "opt_state", None)
  if inner is not None and type(opt_state).__name__.endswith("Optimizer"):
    opt_state = inner
  is_opt = lambda x: isinstance(x, nnx.OptState)
  if any(is_opt(x) for x in jax.tree.leaves(opt_state, is_leaf=is_opt)):
    return nnx.as_pure(opt_state)
  return opt_state


def find_all(opt_state: PyTree, types: type | tuple[type, ...]) -> list[Any]:
  """Every node of ``opt_state`` that is an instance of ``types``, in tree order."""
  is_state = lambda x: isinstance(x, types)
  return [x for x in jax.tree.leaves(unwrap(opt_state), is_leaf=is_state)
          if is_state(x)]


def find_one(opt_state: PyTree, types: type | tuple[type, ...], *,
             who: str, what: str | None = None) -> Any:
  """The single node of ``opt_state`` of ``types``; a ValueError otherwise."""
  found = find_all(opt_state, types)
  if len(found) != 1:
    names = what or (types.__name__ if isinstance(types, type) else "/".join(
        t.__name__ for t in types))
    raise ValueError(
        f"{who}: expected exactly one {names} in opt_state, found "
        f"{len(found)}; pass the state returned by tx.init/tx.update (or the "
        f"nnx.Optimizer) of a transformation containing it once.")
  return found[0]


def replace(opt_state: PyTree, types: type | tuple[type, ...],
            new: Any) -> PyTree:
  """``opt_state`` with its (single) node of ``types`` replaced by ``new``."""
  is_state = lambda x: isinstance(x, types)
  return jax.tree.map(lambda x: new if is_state(x) else x,
                      unwrap(opt_state), is_leaf=is_state)


def retype_like(tree: PyTree, like: Any, wrt: Any = None) -> PyTree:
  """``tree``'s leaves in the structure (and NNX Variable types) of ``like``.

  ``like`` is a pytree with as many leaves, or an ``nnx.Module`` whose
  ``nnx.state(like, wrt)`` (default ``wrt``: ``nnx.Param``) gives it. Used to
  hand FOO-VB samples back as ``nnx.Param`` variables, so that gradients
  taken at them pass the ``wrt`` filter of ``nnx.Optimizer.update``.
  """
  if isinstance(like, nnx.Module):
    like = nnx.state(like, nnx.Param if wrt is None else wrt)
  leaves = jax.tree.leaves(tree)
  treedef = jax.tree.structure(like)
  if treedef.num_leaves != len(leaves):
    raise ValueError(
        f"like has {treedef.num_leaves} leaves, the samples {len(leaves)}: "
        "pass the model (or its nnx.state with the optimizer's wrt filter).")
  return jax.tree.unflatten(treedef, leaves)
