"""Hard N:M projection as an optax transform: params stay exactly N:M."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import optax

from sparse_jax.sparsity import _common
from sparse_jax.sparsity import leaves as leaves_lib


class NMProjectionState(NamedTuple):
  """State of :func:`nm_projection`.

  Attributes:
    count: number of updates seen (int32).
    masks: bool masks with the params' structure (``optax.MaskedNode()`` on
      leaves that are not pruned); all True before projection starts.
    kept_mass: per pruned leaf, the fraction of ``sum |w|`` the mask kept when
      it was last computed (float32 scalar).
    flip_rate: per pruned leaf, the fraction of mask entries that changed at
      the last mask update (float32 scalar).
  """
  count: jax.Array
  masks: Any
  kept_mass: Any
  flip_rate: Any


def nm_projection(
    n: int | Callable[[jax.Array], jax.Array], m: int, *,
    transposable: bool = False,
    axis: leaves_lib.AxisSpec = -2,
    update_every: int | None = 1,
    start_step: int = 0,
    init_masks: bool = False,
    method: str = "exact",
    objective: str = "l1",
    mask: leaves_lib.MaskSpec = None,
    diagnostics: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Projects the updated params onto N:M sparsity (put it LAST in a chain).

  Returns ``updates' = P(params + updates) - params`` where ``P`` zeroes the
  entries outside the mask, so after ``optax.apply_updates`` the pruned leaves
  are exactly zero outside the mask (also in bf16: ``p + (0 - p) == 0``). The
  mask keeps the ``n`` largest ``|w|`` of every ``m`` consecutive entries along
  ``axis`` (``n`` = KEPT), or with ``transposable=True`` the best transposable
  mask of every ``m x m`` tile of the last two axes. It is computed from the
  magnitudes of ``params + updates`` and lives in the state.

  Args:
    n: entries kept per group of ``m``; or a schedule ``count -> n`` (an int
      array; e.g. :func:`nm_schedule`) for gradual pruning (not transposable).
    m: group size.
    transposable: use transposable N:M masks (rows and columns of each
      ``m x m`` tile of the last two axes keep ``n``).
    axis: N:M axis of every pruned leaf: an int (default -2, the input axis of
      Flax Dense/Conv kernels), a pytree of ints or a callable ``params ->
      pytree of ints`` (see :func:`axis_by_path`).
    update_every: recompute the mask every this many steps (counted from
      ``start_step``); ``None`` computes it once and keeps it fixed.
    start_step: dense warm-up: updates pass through unchanged before this step;
      the first mask is computed at this step.
    init_masks: compute the masks in ``init`` from the params given to it and
      project from step 0 with them (e.g. to fine-tune a converted model with
      ``update_every=None``); ``start_step`` must then be 0.
    method: transposable solver (``"exact"``, ``"greedy"``,
      ``"greedy_repair"``); see :func:`sparse_jax.masks.transposable_nm_mask`.
    objective: transposable objective, ``"l1"`` or ``"l2"``.
    mask: which leaves to prune: a pytree of bools (or a prefix), a callable
      ``params -> pytree of bools``, or None for :func:`default_filter`
      (kernels with ``ndim >= 2`` whose N:M axis is divisible by ``m``).
    diagnostics: track ``kept_mass`` and ``flip_rate`` in the state at every
      mask update (two extra reductions over the pruned weights; with False
      they stay 0).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its update needs ``params``.

  Raises:
    ValueError: at construction for bad options; at init/trace time naming the
      leaf path and shape for a selected leaf that cannot be pruned.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from sparse_jax.sparsity import nm_projection
    >>> params = {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.ones(4)}}
    >>> tx = optax.chain(optax.sgd(0.1), nm_projection(2, 4))
    >>> state = tx.init(params)
    >>> grads = {"dense": {"kernel": jnp.arange(32.).reshape(8, 4),
    ...                    "bias": jnp.ones(4)}}
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> int((params["dense"]["kernel"] != 0).sum())  # 2 of every 4 kept
    16
    >>> int((params["dense"]["bias"] != 0).sum())  # biases stay dense
    4

  References:
    Hubara et al., "Accelerated Sparse Neural Training: A Provable and
    Efficient Method to Find N:M Transposable Masks", NeurIPS 2021,
    https://arxiv.org/abs/2102.08124.
  """
  who = "nm_projection"
  n, m = _common.check_options(n, m, transposable=transposable, method=method,
                               objective=objective, who=who)
  update_every = _common.check_step(update_every, "update_every", who,
                                    allow_none=True, minimum=1)
  start_step = _common.check_step(start_step, "start_step", who)
  if init_masks and start_step:
    raise ValueError(f"{who}: init_masks=True projects from step 0, so "
                     f"start_step must be 0 (got {start_step}).")
  if callable(n) and update_every is None:
    raise ValueError(f"{who}: a schedule for n needs masks that are "
                     "recomputed (update_every=None keeps them fixed).")

  def pruned_of(params):
    return leaves_lib.resolve(params, m, mask=mask, axis=axis,
                              transposable=transposable, who=who)

  def masks_of(arrays, pruned, count):
    n_now = n(count) if callable(n) else n
    return _common.compute_masks(arrays, pruned, n_now, m,
                                 transposable=transposable, method=method,
                                 objective=objective)

  def init_fn(params):
    pruned = pruned_of(params)
    arrays = _common.gather(params, pruned)
    if init_masks:
      masks = masks_of(arrays, pruned, jnp.zeros([], jnp.int32))
    else:
      masks = [jnp.ones_like(a, dtype=bool) for a in arrays]
    zeros = [jnp.zeros_like(a, jnp.float32, shape=()) for a in arrays]
    kept = [_common.kept_mass(a, mk) for a, mk in zip(arrays, masks)] \
        if diagnostics else zeros
    return NMProjectionState(
        count=jnp.zeros([], jnp.int32),
        masks=_common.scatter(params, pruned, masks),
        kept_mass=_common.scatter(params, pruned, kept),
        flip_rate=_common.scatter(params, pruned, zeros))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    pruned = pruned_of(params)
    count = state.count
    p_list = _common.gather(params, pruned)
    u_list = _common.gather(updates, pruned)
    new_list = [p + u for p, u in zip(p_list, u_list)]
    old_masks = _common.gather(state.masks, pruned)
    old_kept = _common.gather(state.kept_mass, pruned)
    old_flip = _common.gather(state.flip_rate, pruned)

    if init_masks:  # masks from init are used from step 0
      active = jnp.asarray(True)
      recompute = jnp.asarray(False) if update_every is None else (
          (count > 0) & (count % update_every == 0))
    else:
      active = count >= start_step
      recompute = (count == start_step) if update_every is None else (
          active & ((count - start_step) % update_every == 0))

    def held(values):  # state values, typed like fresh ones (shard_map)
      return [_common.match_vma(x, w) for x, w in zip(values, new_list)]

    def fresh(_):
      masks = masks_of(new_list, pruned, count)
      if not diagnostics:
        return masks, held(old_kept), held(old_flip)
      kept = [_common.kept_mass(w, mk) for w, mk in zip(new_list, masks)]
      flips = [_common.flip_rate(o, mk) for o, mk in zip(old_masks, masks)]
      return masks, kept, flips

    def keep(_):
      return held(old_masks), held(old_kept), held(old_flip)

    masks, kept, flips = lax.cond(recompute, fresh, keep, None)
    out = []
    for p, u, w, mk in zip(p_list, u_list, new_list, masks):
      projected = jnp.where(mk, w, jnp.zeros((), w.dtype)) - p
      out.append(jnp.where(active, projected, u.astype(projected.dtype)))
    new_updates = _common.replace(updates, pruned, out)
    new_state = NMProjectionState(
        count=optax.safe_increment(count),
        masks=_common.scatter(params, pruned, masks),
        kept_mass=_common.scatter(params, pruned, kept),
        flip_rate=_common.scatter(params, pruned, flips))
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
