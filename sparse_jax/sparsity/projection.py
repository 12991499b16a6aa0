"""Hard N:M projection as an optax transform: params stay exactly N:M."""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax

from sparse_jax._core import nm_schedule
from sparse_jax._core import trees
from sparse_jax._core.nm_schedule import AxisSpec, MaskSpec, NMMaskState

NMProjectionState = NMMaskState
"""State of :func:`nm_projection` (the one N:M mask state type, :class:`NMMaskState`)."""


def nm_projection(
    n: int | Callable[[jax.Array], jax.Array], m: int, *,
    transposable: bool = False,
    axis: AxisSpec = -2,
    update_every: int | None = 1,
    start_step: int = 0,
    end_step: int | None = None,
    init_masks: bool = False,
    method: str = "exact",
    objective: str = "l1",
    mask: MaskSpec = None,
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

  Recomputing transposable masks is the expensive part: ``update_every=k``
  (e.g. 40, the published T-N:M recipe) is the cheap path; plain N:M masks
  cost about one elementwise pass and can be recomputed every step.

  Composes with the optax idioms (tested for every transform): ``jax.jit``
  with donated params and state, ``vmap``/``scan``, ``optax.masked`` /
  ``multi_transform`` / ``partition`` (excluded leaves are left alone),
  ``optax.MultiSteps``, ``optax.inject_hyperparams`` (``n`` injectable for
  plain N:M; ``m`` is read from the state), ``nnx.Optimizer``, orbax, and
  meshes with Auto or Explicit axes.

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
    end_step: dense fine-tuning: from this step on updates pass through
      unchanged (the pruned entries train again); None: project to the end.
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

  Non-finite weights: NaN ranks as the SMALLEST magnitude (as in
  :func:`~sparse_jax.masks.nm_mask`; it is pruned first), +-inf as the
  largest; ``kept_mass`` counts them as 0 and ``sparsity_diagnostics`` reports
  their fraction (``nonfinite``). A NaN weight stays NaN (``NaN + update`` is
  NaN); the runners' ``max_nonfinite_steps`` stops such a run.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`NMProjectionState`; its update needs ``params``.

  Raises:
    ValueError: at construction for bad options; at init/trace time naming the
      leaf path and shape for a selected leaf that cannot be pruned; at init
      when ``mask``/the default filter selects no leaf (naming the leaves
      seen); in update when params or updates miss a leaf of the init params
      (naming it).

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
  schedule = nm_schedule.make_schedule(
      n, m, who="nm_projection", transposable=transposable, axis=axis,
      update_every=update_every, start_step=start_step, init_masks=init_masks,
      method=method, objective=objective, mask=mask, diagnostics=diagnostics,
      end_step=end_step)

  def init_fn(params):
    return schedule.init(params)[1]

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is not None:
      trees.check_same_structure(params, updates, who="nm_projection",
                                 what="the updates")
    sched = schedule.with_structure(state)
    pruned = sched.select(params, sched.m)
    idx = [p.index for p in pruned]
    p_list = trees.gather(params, idx)
    u_list = trees.gather(updates, idx)
    new_list = [p + u for p, u in zip(p_list, u_list)]
    active, masks, new_state = sched.update(state, params, new_list, pruned)
    out = nm_schedule.project(p_list, u_list, new_list, masks, active)
    return trees.replace(updates, idx, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
