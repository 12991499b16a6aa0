"""Straight-through N:M training: STE forward masking and the SR-STE transform.

:func:`nm_ste` masks the params for the forward pass and passes the gradient
straight through to the dense weights (STE); :func:`sr_ste` adds SR-STE's decay
on the pruned weights to the gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparse_jax.sparsity import _common
from sparse_jax.sparsity import leaves as leaves_lib


def _masks(params, n, m, *, transposable, axis, method, objective, mask, who):
  pruned = leaves_lib.resolve(params, m, mask=mask, axis=axis,
                              transposable=transposable, who=who)
  arrays = [jax.lax.stop_gradient(a) for a in _common.gather(params, pruned)]
  masks = _common.compute_masks(arrays, pruned, n, m,
                                transposable=transposable, method=method,
                                objective=objective)
  return pruned, masks


def nm_ste(params, n: int | jax.Array, m: int, *, transposable: bool = False,
           axis: leaves_lib.AxisSpec = -2, method: str = "exact",
           objective: str = "l1", mask: leaves_lib.MaskSpec = None):
  """N:M-masked params for the forward pass, with a straight-through gradient.

  Each pruned leaf ``w`` becomes ``w + stop_gradient(mask(w) * w - w)``: its
  value is exactly the N:M-sparse ``mask(w) * w`` (``n`` KEPT of every ``m``
  along ``axis``), its gradient flows to the dense ``w`` unchanged. Call it
  inside the loss on the dense params the optimizer holds.

  Args:
    params: the dense params (any pytree, e.g. an ``nnx.State``).
    n: entries kept per group of ``m`` (plain N:M also takes a traced integer
      scalar, e.g. ``nm_schedule(...)(step)``).
    m: group size.
    transposable: use transposable N:M masks on the last two axes.
    axis: N:M axis (int, pytree or callable; see :func:`axis_by_path`).
    method: transposable solver (see ``transposable_nm_mask``).
    objective: transposable objective, ``"l1"`` or ``"l2"``.
    mask: which leaves to prune (pytree of bools, callable, or None for
      :func:`default_filter`).

  Returns:
    Params of the same structure with the pruned leaves masked.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sparse_jax.sparsity import nm_ste
    >>> params = {"kernel": jnp.array([[1.], [-3.], [2.], [0.5]])}
    >>> loss = lambda p: jnp.sum(nm_ste(p, 2, 4)["kernel"])
    >>> float(loss(params)), jax.grad(loss)(params)["kernel"].ravel().tolist()
    (-1.0, [1.0, 1.0, 1.0, 1.0])

  References:
    Zhou et al., "Learning N:M Fine-grained Structured Sparse Neural Networks
    From Scratch", ICLR 2021, https://arxiv.org/abs/2102.04010.
  """
  who = "nm_ste"
  n, m = _common.check_options(n, m, transposable=transposable, method=method,
                               objective=objective, who=who)
  if callable(n):
    raise ValueError(f"{who}: pass n as an int or an integer scalar (e.g. "
                     "schedule(step)), not the schedule itself.")
  pruned, masks = _masks(params, n, m, transposable=transposable, axis=axis,
                         method=method, objective=objective, mask=mask,
                         who=who)
  out = []
  for w, mk in zip(_common.gather(params, pruned), masks):
    sparse = jnp.where(mk, w, jnp.zeros((), w.dtype))
    out.append(w + jax.lax.stop_gradient(sparse - w))
  return _common.replace(params, pruned, out)


class SRSTEState(NamedTuple):
  """State of :func:`sr_ste` (masks of the params at the last update).

  Attributes:
    count: number of updates seen.
    masks: bool masks (``optax.MaskedNode()`` on leaves not pruned).
    kept_mass: per pruned leaf, fraction of ``sum |w|`` the mask kept.
    flip_rate: per pruned leaf, fraction of mask entries changed since the
      previous update.
  """
  count: jax.Array
  masks: Any
  kept_mass: Any
  flip_rate: Any


def sr_ste(n: int | Callable[[jax.Array], jax.Array], m: int, *,
           decay: float = 2e-4, transposable: bool = False,
           axis: leaves_lib.AxisSpec = -2, method: str = "exact",
           objective: str = "l1",
           mask: leaves_lib.MaskSpec = None,
           diagnostics: bool = True,
           ) -> optax.GradientTransformationExtraArgs:
  """SR-STE: adds ``decay * (1 - mask(params)) * params`` to the gradients.

  Put it BEFORE the optimizer, like ``optax.add_decayed_weights``:
  ``optax.chain(sr_ste(2, 4), optax.sgd(lr))`` with a loss that uses
  :func:`nm_ste`. Then ``W <- W - lr * (grad(W~) + decay * (1 - mask) * W)``,
  the sparse-refined straight-through estimator. The mask (``n`` KEPT of every
  ``m`` along ``axis``) is recomputed from the current params at every step,
  the same mask :func:`nm_ste` uses in the forward pass.

  Args:
    n: entries kept per group of ``m``, or a schedule ``count -> n`` (plain
      N:M only; use the same ``n`` in :func:`nm_ste`).
    m: group size.
    decay: the SR-STE coefficient lambda_W (2e-4 in the paper).
    transposable: use transposable N:M masks on the last two axes.
    axis: N:M axis (int, pytree or callable).
    method: transposable solver.
    objective: transposable objective.
    mask: which leaves to prune (None: :func:`default_filter`).
    diagnostics: track ``kept_mass`` and ``flip_rate`` in the state (two
      extra reductions per step; with False they stay 0).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its update needs ``params``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from sparse_jax.sparsity import sr_ste
    >>> params = {"kernel": jnp.array([[1.], [-3.], [2.], [0.5]])}
    >>> tx = sr_ste(2, 4, decay=0.1)
    >>> grads = {"kernel": jnp.zeros((4, 1))}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> [round(float(u), 4) for u in updates["kernel"].ravel()]  # 0.1 * pruned
    [0.1, 0.0, 0.0, 0.05]

  References:
    Zhou et al., "Learning N:M Fine-grained Structured Sparse Neural Networks
    From Scratch", ICLR 2021, https://arxiv.org/abs/2102.04010.
  """
  who = "sr_ste"
  n, m = _common.check_options(n, m, transposable=transposable, method=method,
                               objective=objective, who=who)
  try:
    decay = float(decay)
  except (TypeError, ValueError):
    raise ValueError(f"{who}: decay must be a float, got {decay!r}.") from None
  if decay < 0:
    raise ValueError(f"{who}: decay must be >= 0, got {decay}.")
  opts = dict(transposable=transposable, axis=axis, method=method,
              objective=objective, mask=mask, who=who)

  def n_at(count):
    return n(count) if callable(n) else n

  def init_fn(params):
    pruned, masks = _masks(params, n_at(jnp.zeros([], jnp.int32)), m, **opts)
    arrays = _common.gather(params, pruned)
    zeros = [jnp.zeros_like(a, jnp.float32, shape=()) for a in arrays]
    kept = [_common.kept_mass(a, mk) for a, mk in zip(arrays, masks)] \
        if diagnostics else zeros
    return SRSTEState(jnp.zeros([], jnp.int32),
                      _common.scatter(params, pruned, masks),
                      _common.scatter(params, pruned, kept),
                      _common.scatter(params, pruned, zeros))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    pruned, masks = _masks(params, n_at(state.count), m, **opts)
    arrays = _common.gather(params, pruned)
    old = _common.gather(state.masks, pruned)
    out = []
    for u, w, mk in zip(_common.gather(updates, pruned), arrays, masks):
      pruned_w = jnp.where(mk, jnp.zeros((), w.dtype), w)
      out.append(u + decay * pruned_w.astype(u.dtype))
    if diagnostics:
      kept = [_common.kept_mass(a, mk) for a, mk in zip(arrays, masks)]
      flips = [_common.flip_rate(o, mk) for o, mk in zip(old, masks)]
    else:
      kept = _common.gather(state.kept_mass, pruned)
      flips = _common.gather(state.flip_rate, pruned)
    new_state = SRSTEState(optax.safe_increment(state.count),
                           _common.scatter(params, pruned, masks),
                           _common.scatter(params, pruned, kept),
                           _common.scatter(params, pruned, flips))
    return _common.replace(updates, pruned, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
