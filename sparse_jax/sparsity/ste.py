"""Straight-through N:M training: STE forward masking and the SR-STE transform.

:func:`nm_ste` masks the params for the forward pass and passes the gradient
straight through to the dense weights (STE); :func:`sr_ste` adds SR-STE's decay
on the pruned weights to the gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from sparse_jax._core import checks
from sparse_jax._core import nm_schedule
from sparse_jax._core import trees
from sparse_jax._core.nm_schedule import AxisSpec, MaskSpec, NMMaskState


def nm_ste(params, n: int | jax.Array, m: int, *, transposable: bool = False,
           axis: AxisSpec = -2, method: str = "exact",
           objective: str = "l1", mask: MaskSpec = None):
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
  if callable(n):
    raise ValueError("nm_ste: pass n as an int or an integer scalar (e.g. "
                     "schedule(step)), not the schedule itself.")
  schedule = nm_schedule.make_schedule(
      n, m, who="nm_ste", transposable=transposable, axis=axis, method=method,
      objective=objective, mask=mask)
  pruned, arrays, masks = schedule.oneshot(params)
  out = []
  for w, mk in zip(arrays, masks):
    sparse = jnp.where(mk, w, jnp.zeros((), w.dtype))
    out.append(w + jax.lax.stop_gradient(sparse - w))
  return trees.replace(params, [p.index for p in pruned], out)


SRSTEState = NMMaskState
"""State of :func:`sr_ste` (the one N:M mask state type, :class:`NMMaskState`)."""


def sr_ste(n: int | Callable[[jax.Array], jax.Array], m: int, *,
           decay: float = 2e-4, transposable: bool = False,
           axis: AxisSpec = -2,
           update_every: int | None = 1,
           start_step: int = 0,
           init_masks: bool = False,
           method: str = "exact",
           objective: str = "l1",
           mask: MaskSpec = None,
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
    update_every: recompute the mask from the current params every this many
      steps (default 1: every step, the paper's SR-STE; from ``start_step``);
      None: keep the first mask. Use the same masks in the forward pass.
    start_step: dense warm-up: no decay before this step.
    init_masks: use the masks of the params given to ``init`` from step 0.
    method: transposable solver.
    objective: transposable objective.
    mask: which leaves to prune (None: :func:`default_filter`).
    diagnostics: track ``kept_mass`` and ``flip_rate`` in the state (two
      extra reductions per step; with False they stay 0).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`SRSTEState`; its update needs ``params``.

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
  schedule = nm_schedule.make_schedule(
      n, m, who="sr_ste", transposable=transposable, axis=axis,
      update_every=update_every, start_step=start_step, init_masks=init_masks,
      method=method, objective=objective, mask=mask, diagnostics=diagnostics)
  decay = checks.check_float(decay, "decay", who="sr_ste", minimum=0.0,
                             traced_ok=True)

  def init_fn(params):
    # The masks of the init params (what nm_ste masks at step 0).
    return schedule.init(params, compute=True)[1]

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is not None:
      trees.check_same_structure(params, updates, who="sr_ste",
                                 what="the updates")
    sched = schedule.with_structure(state)
    pruned = sched.select(params, sched.m)
    idx = [p.index for p in pruned]
    arrays = trees.gather(params, idx)
    active, masks, new_state = sched.update(state, params, arrays, pruned)
    out = []
    for u, w, mk in zip(trees.gather(updates, idx), arrays, masks):
      pruned_w = jnp.where(mk, jnp.zeros((), w.dtype), w)
      decayed = u + (decay * pruned_w).astype(u.dtype)
      out.append(decayed if active is True else jnp.where(active, decayed, u))
    return trees.replace(updates, idx, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
