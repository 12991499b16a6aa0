"""Which parameters get an N:M mask, and along which axis (the optax way).

A transform's ``mask`` argument is a pytree of bools with the structure of the
params (or a prefix of it), or a callable ``params -> such a pytree``; ``None``
uses :func:`default_filter`. Its ``axis`` argument is one int for every leaf, a
pytree of ints, or a callable ``params -> pytree of ints`` (see
:func:`axis_by_path`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import optax

from sparse_jax.masks import _checks

Params = Any
AxisSpec = int | Params | Callable[[Params], Params]
MaskSpec = None | Params | Callable[[Params], Params]

MaskedNode = optax.MaskedNode


def _is_masked_node(x) -> bool:
  return isinstance(x, MaskedNode)


def leaf_name(path) -> str | None:
  """The leaf's own name: its last dict key or attribute (ignoring ``.value``).

  ``['block']['dense']['kernel'].value`` (an NNX state) and
  ``['params']['Dense_0']['kernel']`` (a Linen dict) are both named
  ``"kernel"``; a bare array or a list of arrays has no name (None).
  """
  for key in reversed(path):
    if isinstance(key, jax.tree_util.DictKey):
      return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
      if key.name == "value":
        continue
      return key.name
  return None


def _broadcast_prefix(prefix, params, what: str):
  """Expands a prefix pytree (or a full one) to the structure of ``params``."""
  try:
    return jax.tree.map(lambda p, sub: jax.tree.map(lambda _: p, sub),
                        prefix, params, is_leaf=_is_masked_node)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{what} must be a pytree with the structure of the params (or a "
        f"prefix of it), or a callable params -> such a pytree: {e}") from None


def _resolve_axes(axis: AxisSpec, params) -> tuple[list, bool]:
  """Per-leaf axes in flatten order, and whether they were one plain int."""
  leaves = jax.tree.leaves(params)
  if isinstance(axis, int) and not isinstance(axis, bool):
    return [axis] * len(leaves), True
  tree = axis(params) if callable(axis) else axis
  full = _broadcast_prefix(tree, params, "axis")
  return jax.tree.leaves(full), False


def axis_by_path(rules: Mapping[str, int], *,
                 default: int = -2) -> Callable[[Params], Params]:
  """Per-leaf N:M axes chosen by regular expressions on the leaf path.

  Args:
    rules: ``{regex: axis}``; the first regex that ``re.search``-es the leaf's
      path string (``jax.tree_util.keystr``, e.g.
      ``"['attn']['query']['kernel'].value"``) gives its axis.
    default: axis of leaves no rule matches.

  Returns:
    A callable ``params -> pytree of ints`` for the ``axis`` argument of the
    sparsity transforms.

  Example:
    >>> import jax.numpy as jnp
    >>> from sparse_jax.sparsity import axis_by_path
    >>> params = {"query": {"kernel": jnp.ones((8, 2, 4))},
    ...           "mlp": {"kernel": jnp.ones((8, 8))}}
    >>> axis_by_path({r"query|key|value": 0})(params)
    {'mlp': {'kernel': -2}, 'query': {'kernel': 0}}

  References:
    Mishra et al., https://arxiv.org/abs/2104.08378 (groups along the GEMM
    reduction axis).
  """
  compiled = [(re.compile(k), int(v)) for k, v in rules.items()]

  def fn(params):
    def pick(path, _):
      s = jax.tree_util.keystr(path)
      for rx, ax in compiled:
        if rx.search(s):
          return ax
      return default
    return jax.tree_util.tree_map_with_path(pick, params)

  return fn


def default_filter(m: int, *, axis: AxisSpec = -2, transposable: bool = False,
                   kernel_names: Sequence[str] = ("kernel",),
                   exclude: str | Sequence[str] = ()) -> Callable[[Params],
                                                                  Params]:
  """The default choice of pruned leaves: divisible kernels, nothing else.

  A leaf is pruned iff it is named like a kernel (``kernel_names``; unnamed
  leaves, e.g. a bare array, count as kernels), has ``ndim >= 2``, no regex in
  ``exclude`` matches its path, and its size along the N:M axis is divisible by
  ``m`` (both of the last two sizes when ``transposable``). So biases, norm
  scales, embeddings (``"embedding"``), position tables and a first Conv with 3
  input channels stay dense.

  A 3-D kernel is ambiguous -- Conv1D ``(W, in, out)`` wants axis -2, a
  ``DenseGeneral`` ``(in, heads, head_dim)`` wants axis 0 -- so when ``axis`` is
  one plain int, a 3-D kernel raises a ValueError naming it: give its axis with
  :func:`axis_by_path` or leave it out with ``exclude``.

  Args:
    m: group size.
    axis: the N:M axis: an int, a pytree of ints or a callable (see module).
    transposable: select for transposable masks (last two axes tiled).
    kernel_names: leaf names treated as kernels.
    exclude: regex (or regexes) of leaf paths to keep dense, e.g. the first and
      last layers.

  Returns:
    A callable ``params -> pytree of bools``.

  Example:
    >>> import jax.numpy as jnp
    >>> from sparse_jax.sparsity import default_filter
    >>> params = {"conv0": {"kernel": jnp.ones((3, 3, 3, 16))},  # 3 inputs
    ...           "dense": {"kernel": jnp.ones((16, 8)), "bias": jnp.ones(8)}}
    >>> default_filter(4)(params)
    {'conv0': {'kernel': False}, 'dense': {'bias': False, 'kernel': True}}

  References:
    Hubara et al., NeurIPS 2021, https://arxiv.org/abs/2102.08124.
  """
  m = _checks.check_m(m)
  excludes = [exclude] if isinstance(exclude, str) else list(exclude)
  excludes = [re.compile(e) for e in excludes]
  names = tuple(kernel_names)

  def fn(params):
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    axes, plain = _resolve_axes(axis, params)
    out = []
    for (path, leaf), ax in zip(flat, axes):
      name = leaf_name(path)
      where = jax.tree_util.keystr(path)
      ndim = len(getattr(leaf, "shape", ()))
      if (ndim < 2 or (name is not None and name not in names)
          or any(e.search(where) for e in excludes)):
        out.append(False)
        continue
      if ndim == 3 and plain:
        raise ValueError(
            f"The 3-D kernel at {where} (shape {tuple(leaf.shape)}) is "
            "ambiguous: a Conv1D (W, in, out) groups along axis -2, a "
            "DenseGeneral (in, heads, head_dim) along axis 0. Give its axis "
            "explicitly, e.g. axis=axis_by_path({r'query|key|value': 0}), or "
            "exclude it.")
      shape = leaf.shape
      if transposable:
        ok = shape[-1] % m == 0 and shape[-2] % m == 0
      else:
        ok = shape[_checks.normalize_axis(ax, ndim, name=f"axis of {where}")] \
            % m == 0
      out.append(ok)
    return jax.tree_util.tree_unflatten(treedef, out)

  return fn


class PrunedLeaf(NamedTuple):
  """A leaf chosen for pruning: its index in flatten order, path and axis."""
  index: int
  path: str
  axis: int


def resolve(params, m: int, *, mask: MaskSpec, axis: AxisSpec,
            transposable: bool, who: str) -> list[PrunedLeaf]:
  """Validates the selection and returns the pruned leaves (trace time).

  Raises a ValueError naming the leaf path and shape when a selected leaf has
  ``ndim < 2``, an invalid axis, or a size not divisible by ``m``.
  """
  if params is None:
    raise ValueError(f"{who} needs the params (pass params=... to update).")
  spec = default_filter(m, axis=axis, transposable=transposable) \
      if mask is None else mask
  chosen = spec(params) if callable(spec) else spec
  chosen = jax.tree.leaves(_broadcast_prefix(chosen, params, "mask"))
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  if len(chosen) != len(flat):
    raise ValueError(f"{who}: mask has {len(chosen)} leaves, params "
                     f"{len(flat)}.")
  axes, _ = _resolve_axes(axis, params)
  out = []
  for i, ((path, leaf), sel, ax) in enumerate(zip(flat, chosen, axes)):
    try:
      sel = bool(sel)
    except Exception:  # e.g. a traced array: selection must be static
      raise ValueError(
          f"{who}: the mask leaf at {jax.tree_util.keystr(path)} must be a "
          f"concrete Python bool, got {sel!r}.") from None
    if not sel:
      continue
    where = jax.tree_util.keystr(path)
    shape = tuple(getattr(leaf, "shape", ()))
    if len(shape) < 2:
      raise ValueError(f"{who}: the leaf at {where} has shape {shape}; N:M "
                       "masks need a kernel with ndim >= 2 (leave it out of "
                       "the mask).")
    ax = _checks.normalize_axis(ax, len(shape), name=f"axis of {where}")
    if transposable:
      if ax != len(shape) - 2:
        raise ValueError(
            f"{who}: transposable masks tile the last two axes (in, out), but "
            f"the leaf at {where} (shape {shape}) has axis {ax}.")
      if shape[-1] % m or shape[-2] % m:
        raise ValueError(
            f"{who}: the leaf at {where} has shape {shape}; transposable "
            f"masks need both of the last two sizes divisible by m={m}.")
    elif shape[ax] % m:
      raise ValueError(
          f"{who}: the leaf at {where} has shape {shape}, whose size "
          f"{shape[ax]} along axis {ax} is not divisible by m={m}. Leave it "
          "out with the mask/filter argument or choose another axis.")
    out.append(PrunedLeaf(i, where, ax))
  return out
