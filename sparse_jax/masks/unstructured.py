"""Unstructured magnitude masks and per-layer sparsity distributions.

The baselines N:M sparsity is compared with: keep the largest ``|w|`` of a
whole tensor, with the per-layer sparsity either uniform or Erdos-Renyi-Kernel
(ERK, Evci et al.), which gives small layers more weights than large ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from sparse_jax.masks import _checks


def _check_sparsity(sparsity: float, name: str = "sparsity") -> float:
  try:
    s = float(sparsity)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number in [0, 1), got "
                     f"{sparsity!r}.") from None
  if not 0.0 <= s < 1.0:
    raise ValueError(f"{name} must be in [0, 1), got {sparsity!r}.")
  return s


def unstructured_mask(w: jax.typing.ArrayLike, sparsity: float) -> jax.Array:
  """Mask keeping the ``round((1 - sparsity) * w.size)`` largest ``|w|``.

  Ties: the lower flat (row-major) index wins; NaN ranks below every number.

  Args:
    w: real array.
    sparsity: fraction of entries to zero, in ``[0, 1)``.

  Returns:
    Boolean mask of ``w``'s shape with exactly the stated number of True.

  Example:
    >>> import jax.numpy as jnp
    >>> from sparse_jax.masks import unstructured_mask
    >>> unstructured_mask(jnp.array([[0.1, -3.], [2., 0.5]]), 0.5).astype(int)
    Array([[0, 1],
           [1, 0]], dtype=int32)

  References:
    Han et al., "Learning both Weights and Connections for Efficient Neural
    Networks", https://arxiv.org/abs/1506.02626.
  """
  w = jnp.asarray(w)
  _checks.check_float_like(w)
  s = _check_sparsity(sparsity)
  keep = int(round((1.0 - s) * w.size))
  if keep >= w.size:
    return jnp.ones(w.shape, bool)
  flat = _checks.magnitude_key(w).reshape(-1)
  if keep == 0:
    return jnp.zeros(w.shape, bool)
  _, idx = lax.top_k(flat, keep)  # lower index first among equal values
  return jnp.zeros(flat.shape, bool).at[idx].set(True).reshape(w.shape)


def _as_shapes(shapes) -> dict[str, tuple[int, ...]]:
  if not isinstance(shapes, Mapping):
    raise ValueError("shapes must be a mapping from layer name to kernel "
                     f"shape, got {type(shapes).__name__}.")
  out = {}
  for name, shape in shapes.items():
    shape = tuple(int(d) for d in shape)
    if len(shape) < 1 or min(shape) < 1:
      raise ValueError(f"layer {name!r} has an invalid shape {shape}.")
    out[name] = shape
  return out


def uniform_sparsity(shapes: Mapping[str, Sequence[int]], sparsity: float, *,
                     dense: Sequence[str] = ()) -> dict[str, float]:
  """The same sparsity for every layer (layers in ``dense`` get 0).

  Args:
    shapes: layer name -> kernel shape.
    sparsity: per-layer sparsity in ``[0, 1)``.
    dense: names of layers kept dense (e.g. the first and last layer).

  Returns:
    Layer name -> sparsity.

  Example:
    >>> from sparse_jax.masks import uniform_sparsity
    >>> uniform_sparsity({"a": (3, 4), "b": (4, 2)}, 0.5, dense=["b"])
    {'a': 0.5, 'b': 0.0}

  References:
    Gale et al., "The State of Sparsity in Deep Neural Networks",
    https://arxiv.org/abs/1902.09574.
  """
  shapes = _as_shapes(shapes)
  s = _check_sparsity(sparsity)
  _check_dense(dense, shapes)
  return {k: 0.0 if k in dense else s for k in shapes}


def _check_dense(dense, shapes):
  unknown = sorted(set(dense) - set(shapes))
  if unknown:
    raise ValueError(f"dense names unknown layers {unknown}; known: "
                     f"{sorted(shapes)}.")


def erk_sparsity(shapes: Mapping[str, Sequence[int]], sparsity: float, *,
                 power: float = 1.0,
                 dense: Sequence[str] = ()) -> dict[str, float]:
  """Erdos-Renyi-Kernel per-layer sparsities with a given overall sparsity.

  Layer ``l`` gets density ``eps * (sum(shape_l) / prod(shape_l)) ** power``
  (for a Conv ``(h, w, in, out)``: ``(h + w + in + out) / (h w in out)``), with
  ``eps`` chosen so the total number of kept weights equals
  ``(1 - sparsity) * total``; a layer whose density would exceed 1 is made
  dense and ``eps`` is re-solved for the rest.

  Args:
    shapes: layer name -> kernel shape.
    sparsity: overall sparsity over all listed layers, in ``[0, 1)``.
    power: exponent on the ERK ratio (1 is ERK; 0 is uniform).
    dense: layers forced dense (they count towards the overall budget).

  Returns:
    Layer name -> sparsity; ``sum((1 - s_l) * size_l) == (1 - sparsity) *
    sum(size_l)`` up to float rounding.

  Raises:
    ValueError: if the forced-dense layers already exceed the budget.

  Example:
    >>> from sparse_jax.masks import erk_sparsity
    >>> s = erk_sparsity({"small": (3, 3, 3, 16), "big": (512, 512)}, 0.9)
    >>> s["small"] < s["big"]
    True

  References:
    Evci et al., "Rigging the Lottery: Making All Tickets Winners", ICML 2020,
    https://arxiv.org/abs/1911.11134.
  """
  shapes = _as_shapes(shapes)
  s = _check_sparsity(sparsity)
  _check_dense(dense, shapes)
  sizes = {k: float(np.prod(v)) for k, v in shapes.items()}
  raw = {k: (sum(v) / np.prod(v, dtype=np.float64)) ** power
         for k, v in shapes.items()}
  budget = (1.0 - s) * sum(sizes.values())
  is_dense = set(dense)
  while True:
    left = budget - sum(sizes[k] for k in is_dense)
    free = [k for k in shapes if k not in is_dense]
    if left < -1e-9 * budget:
      raise ValueError(
          f"the dense layers {sorted(is_dense)} alone exceed the budget of "
          f"{budget:.0f} kept weights at sparsity {s}.")
    if not free:
      break
    eps = left / sum(raw[k] * sizes[k] for k in free)
    too_dense = [k for k in free if eps * raw[k] > 1.0]
    if not too_dense:
      break
    is_dense.update(too_dense)
  out = {}
  for k in shapes:
    out[k] = 0.0 if k in is_dense else float(1.0 - eps * raw[k])
  return out
