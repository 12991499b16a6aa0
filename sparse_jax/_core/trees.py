"""Pytree plumbing shared by every family: flattening, path names, leaf selection.

Every transform flattens params, updates and its own params-like state fields
the SAME way: with ``optax.MaskedNode`` counted as a leaf. ``optax.masked``,
``optax.multi_transform`` and ``optax.partition`` hand an inner transform
trees whose excluded leaves are ``MaskedNode()`` (an empty pytree node that
``jax.tree.leaves`` skips); flattening them as leaves keeps leaf ``i`` of the
params, the updates and the state the same leaf, wherever the excluded leaves
sit in flatten order. A ``MaskedNode`` leaf is never selected and passes
through every transform unchanged.

The leaf resolver :func:`select` accepts what optax accepts for ``mask``: a
pytree of bools with the params' structure, a PREFIX of it (``{"dense": True,
"head": False}``), or a callable ``params -> such a pytree``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

PyTree = Any
MaskedNode = optax.MaskedNode
Spec = Any  # None | pytree (or prefix) | callable params -> pytree


def is_masked(x: Any) -> bool:
  """True for an ``optax.MaskedNode`` (a leaf excluded by an optax combinator)."""
  return isinstance(x, MaskedNode)


def flatten(tree: PyTree) -> tuple[list[tuple[tuple, Any]], Any]:
  """``(path, leaf)`` pairs and treedef, ``MaskedNode`` counted as a leaf."""
  return jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_masked)


def leaves(tree: PyTree) -> list[Any]:
  """The leaves of ``tree`` in flatten order, ``MaskedNode`` counted as a leaf."""
  return jax.tree.leaves(tree, is_leaf=is_masked)


def structure(tree: PyTree):
  """The treedef of ``tree`` with ``MaskedNode`` counted as a leaf."""
  return jax.tree.structure(tree, is_leaf=is_masked)


def _strip_value(path: tuple) -> tuple:
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and \
      path[-1].name == "value":
    return path[:-1]
  return tuple(path)


def path_str(path: tuple) -> str:
  """THE name of a leaf: ``jax.tree_util.keystr`` without a trailing ``.value``.

  ``['block']['kernel'].value`` (an NNX state) and ``['block']['kernel']`` (a
  dict) are both named ``"['block']['kernel']"``.
  """
  return jax.tree_util.keystr(_strip_value(path))


def leaf_name(path: tuple) -> str | None:
  """The leaf's own name: its last dict key or attribute (ignoring ``.value``).

  ``['block']['dense']['kernel'].value`` (an NNX state) and
  ``['params']['Dense_0']['kernel']`` (a Linen dict) are both named
  ``"kernel"``; a bare array or a list of arrays has no name (None).
  """
  for key in reversed(_strip_value(path)):
    if isinstance(key, jax.tree_util.DictKey):
      return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
      return key.name
  return None


def leaf_names(path: tuple) -> tuple[str, ...]:
  """Every name along ``path`` (dict keys, attributes, indices), no ``.value``."""
  out = []
  for key in _strip_value(path):
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        out.append(str(getattr(key, attr)))
        break
    else:
      out.append(str(key))
  return tuple(out)


def check_same_structure(expected: PyTree, got: PyTree, *, who: str,
                         what: str) -> None:
  """Raises a ValueError naming the first leaf path where two trees differ.

  ``expected`` is e.g. the state's per-leaf tree (built from the init
  params), ``got`` the params or updates passed to ``update``; ``MaskedNode``
  leaves count as leaves. Trace-time only (compares paths, not values).
  """
  if structure(expected) == structure(got):
    return
  a = [path_str(p) for p, _ in flatten(expected)[0]]
  b = [path_str(p) for p, _ in flatten(got)[0]]
  seen_a, seen_b = set(a), set(b)
  missing = next((p for p in a if p not in seen_b), None)
  extra = next((p for p in b if p not in seen_a), None)
  if missing is not None:
    detail = f"{missing} is missing"
  elif extra is not None:
    detail = f"{extra} is not in the init params"
  else:
    detail = "the same leaves in another container structure"
  raise ValueError(f"{who}: {what} do not match the params the state was "
                   f"initialised with: {detail}.")


def _children(node: Any) -> dict | None:
  """``{key: child}`` one level down, or None when ``node`` is a leaf."""
  if node is None or is_masked(node):
    return None
  kids = jax.tree_util.tree_flatten_with_path(
      node, is_leaf=lambda x: x is not node)[0]
  if len(kids) == 1 and kids[0][0] == ():
    return None
  return {path[0]: child for path, child in kids}


def broadcast(spec_tree: PyTree, tree: PyTree, *, who: str,
              name: str) -> list[Any]:
  """The value of ``spec_tree`` (the tree or a prefix of it) at each leaf.

  Returns one value per leaf of ``tree`` (flattened by :func:`flatten`).
  Where ``tree`` holds a ``MaskedNode`` the spec may hold anything (the value
  is ignored by every caller). Raises a ValueError naming the leaf path when
  ``spec_tree`` is neither the structure of ``tree`` nor a prefix of it.
  """
  flat, _ = flatten(tree)
  cache: dict[int, dict | None] = {}

  def kids_of(node):
    if id(node) not in cache:
      cache[id(node)] = _children(node)
    return cache[id(node)]

  out = []
  for path, leaf in flat:
    node = spec_tree
    for i, key in enumerate(path):
      kids = kids_of(node)
      if kids is None:
        break
      if key not in kids:
        if is_masked(leaf):
          node = MaskedNode()
          break
        raise ValueError(
            f"{who}: {name} does not match the structure of the params: it "
            f"must be a pytree with the params' structure (or a prefix of "
            f"it), or a callable params -> such a pytree; it has no entry {jax.tree_util.keystr(tuple(path[:i + 1]))} for the "
            f"leaf {path_str(path)} (it has "
            f"{sorted(jax.tree_util.keystr((k,)) for k in kids)}).")
      node = kids[key]
    else:
      if kids_of(node) is not None and not is_masked(leaf):
        raise ValueError(
            f"{who}: {name} has a subtree where the params have the leaf "
            f"{path_str(path)}; give one value per leaf (or per subtree).")
    out.append(node)
  return out


def _as_bool(value: Any, path: tuple, *, who: str, name: str) -> bool:
  if value is None or is_masked(value):
    return False
  if isinstance(value, jax.core.Tracer):
    raise ValueError(
        f"{who}: {name} at {path_str(path)} must be a concrete Python bool "
        "(the choice of leaves is static), got a traced value.")
  try:
    arr = np.asarray(value)
    if arr.shape != ():
      raise TypeError
    return bool(arr)
  except (TypeError, ValueError):
    raise ValueError(
        f"{who}: {name} at {path_str(path)} must be a Python bool, got "
        f"{value!r}.") from None


def select(spec: Spec, tree: PyTree, *, who: str, name: str = "mask",
           default: Spec = True) -> list[bool]:
  """THE leaf resolver: one static bool per leaf of ``tree`` (flatten order).

  Args:
    spec: None (use ``default``), a pytree of bools with the structure of
      ``tree`` or a prefix of it, or a callable ``tree -> such a pytree``.
    tree: the params (or updates), possibly with ``MaskedNode`` leaves.
    who: the transform's name, for error messages.
    name: the argument's name, for error messages.
    default: what ``spec=None`` means (same kinds as ``spec``; True: all).

  Returns:
    A list of Python bools; ``MaskedNode`` leaves are always False.
  """
  if spec is None:
    spec = default
  if callable(spec):
    spec = spec(tree)
  values = broadcast(spec, tree, who=who, name=name)
  flat, _ = flatten(tree)
  return [False if is_masked(leaf) else _as_bool(v, path, who=who, name=name)
          for (path, leaf), v in zip(flat, values)]


def gather(tree: PyTree, indices: list[int]) -> list[Any]:
  """The leaves of ``tree`` at ``indices`` (flatten order of :func:`flatten`)."""
  flat = leaves(tree)
  return [flat[i] for i in indices]


def scatter(like: PyTree, indices: list[int], values: list[Any],
            fill: Callable[[], Any] = MaskedNode) -> PyTree:
  """A tree with ``like``'s structure: ``values`` at ``indices``, ``fill()`` else.

  ``fill`` is called once per leaf, so no two leaves share a buffer (a state
  built this way can be donated).
  """
  treedef = structure(like)
  out = [None] * treedef.num_leaves
  for i, v in zip(indices, values):
    out[i] = v
  taken = set(indices)
  for i in range(len(out)):
    if i not in taken:
      out[i] = fill()
  return jax.tree.unflatten(treedef, out)


def replace(tree: PyTree, indices: list[int], values: list[Any]) -> PyTree:
  """``tree`` with its leaves at ``indices`` replaced by ``values``."""
  flat, treedef = jax.tree.flatten(tree, is_leaf=is_masked)
  flat = list(flat)
  for i, v in zip(indices, values):
    flat[i] = v
  return jax.tree.unflatten(treedef, flat)


def present_index(tree_leaves: list[Any]) -> list[int]:
  """Per leaf, its index among the leaves that are not ``MaskedNode``.

  Random streams are folded with this index (not the flat one), so a
  transform inside ``optax.masked`` draws exactly what it draws on the
  selected subtree alone.
  """
  out, k = [], 0
  for x in tree_leaves:
    out.append(k)
    k += not is_masked(x)
  return out


def is_params_placeholder(params: Any) -> bool:
  """True for the symbolic params ``optax.tree_utils.tree_map_params`` passes to init."""
  return type(params).__name__ == "_ParamsPlaceholder"
