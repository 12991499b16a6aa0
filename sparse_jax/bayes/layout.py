"""Which parameter leaves get which posterior: the static layout of a FOO-VB state.

Every leaf of the params tree gets one of these kinds:

* ``"fixed"``: not in ``mask``; a point estimate, never perturbed.
* ``"diag"``: a diagonal Gaussian (one std per entry).
* ``"kron"``: the kernel of a matrix-variate Gaussian group (see
  :mod:`sparse_jax.bayes.kronecker`); a Dense kernel ``(in, out)`` is the matrix
  as is, a Conv kernel ``(H, W, in, out)`` (or any kernel with >= 2 axes) is
  read as ``(prod(shape[:-1]), shape[-1])``.
* ``"kron_bias"``: the bias of a Kronecker group: a sibling leaf named
  ``bias`` (same parent in the tree, shape ``(out,)``) joins its kernel as an
  extra last input row, exactly like the paper's ``(out, in + 1)`` weights.
* ``"full"``: part of the single full covariance over all such leaves,
  flattened in tree order.

The layout is a static (hashable, leafless) pytree node stored in the state, so
:func:`sparse_jax.bayes.foovb_sample` can draw samples from the state alone.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Union

import jax
import numpy as np

PyTree = Any
Filter = Union[None, PyTree, Callable[[PyTree], PyTree]]

FIXED, DIAG, KRON, KRON_BIAS, FULL = "fixed", "diag", "kron", "kron_bias", "full"


@dataclasses.dataclass(frozen=True)
class KronGroup:
  """One matrix-variate group: a kernel leaf and optionally its bias leaf.

  Attributes:
    name: the kernel's path (``jax.tree_util.keystr``), the key in
      ``FooVBState.kron``.
    kernel: flat index of the kernel leaf.
    bias: flat index of the bias leaf, or None.
    kernel_shape: the kernel's shape.
    fan_in: ``prod(kernel_shape[:-1])``.
    rows: ``fan_in + 1`` with a bias, else ``fan_in`` (the size of ``A``).
    cols: ``kernel_shape[-1]`` (the size of ``B``).
  """
  name: str
  kernel: int
  bias: int | None
  kernel_shape: tuple[int, ...]
  fan_in: int
  rows: int
  cols: int


@dataclasses.dataclass(frozen=True)
class Layout:
  """The static layout: kind and path of each flat leaf, Kronecker groups, full leaves."""
  kinds: tuple[str, ...]
  paths: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  groups: tuple[KronGroup, ...]
  full: tuple[int, ...]

  @property
  def full_size(self) -> int:
    return sum(math.prod(self.shapes[i]) for i in self.full)


jax.tree_util.register_static(Layout)


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def leaf_names(path: tuple[Any, ...]) -> tuple[str, ...]:
  """The names along a pytree path, without a trailing ``.value`` (NNX Variables)."""
  names = tuple(_key_name(k) for k in path)
  if (names and names[-1] == "value"
      and isinstance(path[-1], jax.tree_util.GetAttrKey)):
    names = names[:-1]
  return names


def path_string(path: tuple[Any, ...]) -> str:
  """``keystr`` of a path, without a trailing ``.value`` (NNX Variables)."""
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and \
      path[-1].name == "value":
    path = path[:-1]
  return jax.tree_util.keystr(tuple(path))


def resolve_filter(flt: Filter, params: PyTree, *, name: str,
                   default: Callable[[tuple[Any, ...], Any], bool]) -> list[bool]:
  """Evaluates an optax-style filter to one bool per flat leaf of ``params``.

  Args:
    flt: None (use ``default``), a pytree of bools with the structure of
      ``params``, or a callable ``params -> pytree of bools``.
    params: the params tree.
    name: the argument's name, for error messages.
    default: ``(path, leaf) -> bool`` used when ``flt`` is None.

  Returns:
    A list of Python bools in flat-leaf order.
  """
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  if flt is None:
    return [bool(default(p, x)) for p, x in leaves_with_path]
  tree = flt(params) if callable(flt) else flt
  flags, flag_def = jax.tree_util.tree_flatten(tree)
  if flag_def != treedef:
    raise ValueError(
        f"foovb: {name} must be a pytree of bools with the structure of the "
        f"params (or a callable params -> such a pytree); got structure "
        f"{flag_def}, params have {treedef}.")
  out = []
  for (p, _), f in zip(leaves_with_path, flags):
    try:
      out.append(bool(np.asarray(f)))
    except Exception as err:  # traced or non-scalar
      raise ValueError(
          f"foovb: {name} at {path_string(p)} must be a concrete Python bool, "
          f"got {f!r}.") from err
  return out


def _default_kron(path: tuple[Any, ...], leaf: Any) -> bool:
  names = leaf_names(path)
  return bool(names) and names[-1] == "kernel" and np.ndim(leaf) >= 2


def build_layout(params: PyTree, covariance: str, *, mask: Filter = None,
                 kron_filter: Filter = None) -> Layout:
  """Assigns a kind to every leaf of ``params`` (see the module docstring).

  Args:
    params: the params tree (arrays or shape-dtype structs).
    covariance: ``"diagonal"``, ``"kron"`` or ``"full"``.
    mask: which leaves are Bayesian (default: all).
    kron_filter: with ``"kron"``: which leaves get a Kronecker factorisation
      (default: every leaf named ``kernel`` with at least 2 axes); the others
      in ``mask`` are diagonal.

  Returns:
    The :class:`Layout`.

  Raises:
    ValueError: a leaf selected for ``kron`` is not a matrix-shaped kernel.
  """
  leaves_with_path = jax.tree_util.tree_flatten_with_path(params)[0]
  paths = tuple(path_string(p) for p, _ in leaves_with_path)
  shapes = tuple(tuple(int(d) for d in np.shape(x)) for _, x in leaves_with_path)
  for p, x in leaves_with_path:
    dtype = getattr(x, "dtype", None)
    if dtype is None or not np.issubdtype(np.dtype(dtype), np.floating):
      raise ValueError(f"foovb: params leaf {path_string(p)} must be a float "
                       f"array (every leaf gets a Gaussian posterior), got "
                       f"{type(x).__name__} with dtype {dtype}.")
  bayes = resolve_filter(mask, params, name="mask", default=lambda p, x: True)
  kinds = [DIAG if b else FIXED for b in bayes]
  groups: list[KronGroup] = []
  if covariance == "full":
    kinds = [FULL if b else FIXED for b in bayes]
  elif covariance == "kron":
    is_kron = resolve_filter(kron_filter, params, name="kron_filter",
                             default=_default_kron)
    index_of = {leaf_names(p): i for i, (p, _) in enumerate(leaves_with_path)}
    for i, (p, _) in enumerate(leaves_with_path):
      if not is_kron[i] or not bayes[i]:
        continue
      shape = shapes[i]
      if len(shape) < 2:
        raise ValueError(
            f"foovb(covariance='kron'): the leaf {paths[i]} with shape {shape} "
            f"is not a matrix; a Kronecker factorisation needs a Dense kernel "
            f"(in, out) or a Conv kernel (H, W, in, out). Leave it out of "
            f"kron_filter (it then gets a diagonal posterior).")
      fan_in, cols = math.prod(shape[:-1]), shape[-1]
      names = leaf_names(p)
      bias = None
      if names and names[-1] == "kernel":
        j = index_of.get(names[:-1] + ("bias",))
        if (j is not None and bayes[j] and not is_kron[j]
            and shapes[j] == (cols,)):
          bias = j
      kinds[i] = KRON
      if bias is not None:
        kinds[bias] = KRON_BIAS
      groups.append(KronGroup(
          name=paths[i], kernel=i, bias=bias, kernel_shape=shape,
          fan_in=fan_in, rows=fan_in + (bias is not None), cols=cols))
  elif covariance != "diagonal":
    raise ValueError(f"foovb: covariance must be 'diagonal', 'kron' or 'full', "
                     f"got {covariance!r}.")
  full = tuple(i for i, k in enumerate(kinds) if k == FULL)
  return Layout(kinds=tuple(kinds), paths=paths, shapes=shapes,
                groups=tuple(groups), full=full)
