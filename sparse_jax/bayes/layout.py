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
* ``"absent"``: an ``optax.MaskedNode`` (a leaf that ``optax.masked`` /
  ``multi_transform`` handed to another transform); passed through untouched.

The layout is a static (hashable, leafless) pytree node stored in the state, so
:func:`sparse_jax.bayes.foovb_sample` can draw samples from the state alone.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax._core import trees

PyTree = Any
Filter = Union[None, PyTree, Callable[[PyTree], PyTree]]

FIXED, DIAG, KRON, KRON_BIAS, FULL = "fixed", "diag", "kron", "kron_bias", "full"
ABSENT = "absent"


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
  """The static layout: kind, path, shape and dtype of each flat leaf, Kronecker groups, full leaves.

  Flat leaves are those of :func:`sparse_jax._core.trees.flatten` (an
  ``optax.MaskedNode`` is a leaf, of kind ``"absent"``). ``dtypes`` are the
  params' dtypes (samples and updates are returned in them).
  """
  kinds: tuple[str, ...]
  paths: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  groups: tuple[KronGroup, ...]
  full: tuple[int, ...]
  dtypes: tuple[Any, ...] = ()

  def noise_index(self, i: int) -> int:
    """The index leaf ``i``'s noise is folded with: its index among the
    present (not ``"absent"``) leaves, so ``optax.masked(foovb(...))`` draws
    what ``foovb`` draws on the selected subtree alone. ``i = len(kinds)``
    gives the full covariance's index."""
    return sum(k != ABSENT for k in self.kinds[:i])

  @property
  def full_size(self) -> int:
    return sum(math.prod(self.shapes[i]) for i in self.full)


jax.tree_util.register_static(Layout)


leaf_names = trees.leaf_names
path_string = trees.path_str


def _default_kron_tree(params: PyTree) -> PyTree:
  """Leaves named ``kernel`` with at least 2 axes."""
  def one(path, leaf):
    if trees.is_masked(leaf):
      return leaf
    names = leaf_names(path)
    return bool(names) and names[-1] == "kernel" and np.ndim(leaf) >= 2
  return jax.tree_util.tree_map_with_path(one, params, is_leaf=trees.is_masked)


def build_layout(params: PyTree, covariance: str, *, mask: Filter = None,
                 kron_filter: Filter = None, who: str = "foovb") -> Layout:
  """Assigns a kind to every leaf of ``params`` (see the module docstring).

  Args:
    params: the params tree (arrays or shape-dtype structs).
    covariance: ``"diagonal"``, ``"kron"`` or ``"full"``.
    mask: which leaves are Bayesian (default: all).
    kron_filter: with ``"kron"``: which leaves get a Kronecker factorisation
      (default: every leaf named ``kernel`` with at least 2 axes); the others
      in ``mask`` are diagonal.
    who: the transform named in error messages.

  Returns:
    The :class:`Layout`.

  Raises:
    ValueError: a leaf selected for ``kron`` is not a matrix-shaped kernel.
  """
  leaves_with_path = trees.flatten(params)[0]
  paths = tuple(path_string(p) for p, _ in leaves_with_path)
  absent = [trees.is_masked(x) for _, x in leaves_with_path]
  shapes = tuple(() if a else tuple(int(d) for d in np.shape(x))
                 for a, (_, x) in zip(absent, leaves_with_path))
  dtypes = []
  for a, (p, x) in zip(absent, leaves_with_path):
    dtype = None if a else getattr(x, "dtype", None)
    if not a and (dtype is None or not jnp.issubdtype(dtype, jnp.floating)):
      raise ValueError(f"{who}: params leaf {path_string(p)} must be a "
                       f"floating-point array (every leaf gets a Gaussian "
                       f"posterior; leave it out with mask=), got "
                       f"{type(x).__name__} with dtype {dtype}.")
    dtypes.append(None if a else jnp.dtype(dtype))
  bayes = trees.select(mask, params, who=who, name="mask")
  kinds = [ABSENT if a else DIAG if b else FIXED
           for a, b in zip(absent, bayes)]
  groups: list[KronGroup] = []
  if covariance == "full":
    kinds = [ABSENT if a else FULL if b else FIXED
             for a, b in zip(absent, bayes)]
  elif covariance == "kron":
    is_kron = trees.select(kron_filter, params, who="foovb",
                           name="kron_filter", default=_default_kron_tree)
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
    raise ValueError(f"{who}: covariance must be 'diagonal', 'kron' or 'full', "
                     f"got {covariance!r}.")
  full = tuple(i for i, k in enumerate(kinds) if k == FULL)
  return Layout(kinds=tuple(kinds), paths=paths, shapes=shapes,
                groups=tuple(groups), full=full, dtypes=tuple(dtypes))
