"""Straight-through N:M training: STE and S-STE forward transforms, SR-STE.

:func:`nm_ste` masks the params for the forward pass and passes the gradient
straight through to the dense weights (STE); :func:`s_ste` replaces the hard
mask by the continuous 2:4 soft-thresholding of S-STE (with the fixed
per-tensor scale from :func:`s_ste_scales`); :func:`sr_ste` adds SR-STE's decay
on the pruned weights to the gradients (placed before the optimizer it is also
the "masked decay on gradients" of Hu et al. 2024).
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


def _soft_threshold(w: jax.Array, keep: jax.Array, m: int,
                    axis: int) -> jax.Array:
  """``sign(w) * max(|w| - t, 0)`` with ``t`` the largest pruned ``|w|`` of
  each group of ``m`` along ``axis`` (the (n+1)-th largest; 0 when n = m)."""
  axis %= w.ndim
  shape = w.shape
  grouped = shape[:axis] + (shape[axis] // m, m) + shape[axis + 1:]
  a = jnp.abs(w)
  dropped = jnp.where(keep, jnp.zeros((), w.dtype), a).reshape(grouped)
  t = jnp.broadcast_to(dropped.max(axis=axis + 1, keepdims=True),
                       grouped).reshape(shape)
  return jnp.where(keep, jnp.sign(w) * (a - t), jnp.zeros((), w.dtype))


def s_ste_scales(params, n: int, m: int, *, axis: AxisSpec = -2,
                 mask: MaskSpec = None) -> dict[str, jax.Array]:
  """S-STE's fixed per-tensor scales ``beta = <w, S(w)> / <S(w), S(w)>``.

  ``S`` is the N:M soft-thresholding of :func:`s_ste`; ``beta`` minimises
  ``||w - beta S(w)||^2`` per tensor. The paper computes it ONCE, from the
  initial weights, and keeps it fixed for the whole run (recomputing it every
  step lets it drift and destabilises training); pass the result to
  ``s_ste(..., scales=...)``.

  Args:
    params: the (initial) dense params.
    n: entries kept per group of ``m``.
    m: group size.
    axis: N:M axis (int, pytree or callable; see :func:`axis_by_path`).
    mask: which leaves to prune (None: :func:`default_filter`).

  Returns:
    ``{leaf path: float32 scalar}`` for every pruned leaf, keyed by
    ``jax.tree_util.keystr`` of its path as in the diagnostics (1 where
    ``S(w)`` is all zero).

  Example:
    >>> import jax.numpy as jnp
    >>> from sparse_jax.sparsity import s_ste_scales
    >>> params = {"kernel": jnp.array([[4.], [-3.], [2.], [1.]])}
    >>> {k: round(float(v), 4) for k, v in s_ste_scales(params, 2, 4).items()}
    {"['kernel']": 2.2}

  References:
    Hu, Zhu, Chen, "S-STE: Continuous Pruning Function for Efficient 2:4
    Sparse Pre-training", NeurIPS 2024, https://arxiv.org/abs/2409.09099.
  """
  schedule = nm_schedule.make_schedule(n, m, who="s_ste_scales", axis=axis,
                                       mask=mask)
  pruned, arrays, masks = schedule.oneshot(params)
  out = {}
  for p, w, mk in zip(pruned, arrays, masks):
    w32 = jnp.asarray(w, jnp.float32)
    s = _soft_threshold(w32, mk, m, p.axis)
    ss = jnp.vdot(s, s)
    out[p.path] = jnp.where(ss > 0, jnp.vdot(w32, s) / jnp.where(ss > 0, ss, 1),
                            1.0)
  return out


def s_ste(params, n: int, m: int, *, scales=None, axis: AxisSpec = -2,
          mask: MaskSpec = None):
  """S-STE: continuously N:M-pruned params for the forward pass.

  Each pruned leaf ``w`` becomes ``beta * S(w)`` in value, with the gradient
  passed straight through to the dense ``w`` (as :func:`nm_ste`). ``S`` is
  soft-thresholding per group of ``m`` along ``axis``: the ``n`` largest
  ``|w|`` are kept, shrunk towards zero by ``t``, the largest magnitude that
  is dropped (the (n+1)-th largest), so ``S`` is continuous in ``w`` -- no
  jump when two magnitudes swap order, which is what makes hard-threshold
  STE oscillate. For 2:4 this is the paper's ``S(a)_i = sign(a_i)
  max(|a_i| - |a_(3)|, 0)``; for other n:m it is the same rule.
  ``beta`` is a fixed per-tensor scale that undoes the shrinkage; compute it
  once from the initial weights with :func:`s_ste_scales`.

  Args:
    params: the dense params (any pytree, e.g. an ``nnx.State``).
    n: entries kept per group of ``m`` (a Python int).
    m: group size.
    scales: ``{leaf path: beta}`` from :func:`s_ste_scales` (the paper's
      fixed scale), or None for ``beta = 1`` (soft-thresholding alone).
    axis: N:M axis (int, pytree or callable; see :func:`axis_by_path`).
    mask: which leaves to prune (pytree of bools, callable, or None for
      :func:`default_filter`).

  Returns:
    Params of the same structure with the pruned leaves soft-thresholded and
    scaled; the result is exactly N:M sparse.

  Raises:
    ValueError: ``scales`` lacks a pruned leaf's path.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sparse_jax.sparsity import s_ste
    >>> params = {"kernel": jnp.array([[4.], [-3.], [2.], [1.]])}
    >>> loss = lambda p: jnp.sum(s_ste(p, 2, 4)["kernel"])
    >>> s_ste(params, 2, 4)["kernel"].ravel().tolist()   # t = 2
    [2.0, -1.0, 0.0, 0.0]
    >>> jax.grad(loss)(params)["kernel"].ravel().tolist()
    [1.0, 1.0, 1.0, 1.0]

  References:
    Hu, Zhu, Chen, "S-STE: Continuous Pruning Function for Efficient 2:4
    Sparse Pre-training", NeurIPS 2024, https://arxiv.org/abs/2409.09099.
  """
  if callable(n):
    raise ValueError("s_ste: pass n as a Python int (the soft threshold is "
                     "defined per fixed n), not a schedule.")
  schedule = nm_schedule.make_schedule(n, m, who="s_ste", axis=axis, mask=mask)
  if not checks.is_static_int(schedule.n):
    raise ValueError(f"s_ste: n must be a Python int, got {n!r}.")
  if scales is not None and not isinstance(scales, dict):
    raise ValueError("s_ste: scales must be the dict {leaf path: beta} that "
                     f"s_ste_scales returns (or None), got {type(scales).__name__}.")
  pruned, arrays, masks = schedule.oneshot(params)
  out = []
  for p, w, mk in zip(pruned, arrays, masks):
    soft = _soft_threshold(jax.lax.stop_gradient(w), mk, m, p.axis)
    if scales is not None:
      if p.path not in scales:
        raise ValueError(f"s_ste: scales has no entry for the pruned leaf "
                         f"{p.path!r} (it has {sorted(scales)}); compute them "
                         "with s_ste_scales on the same params and options.")
      soft = soft * jnp.asarray(scales[p.path]).astype(w.dtype)
    out.append(w + jax.lax.stop_gradient(soft - w))
  return trees.replace(params, [p.index for p in pruned], out)


SRSTEState = NMMaskState
"""State of :func:`sr_ste` (the one N:M mask state type, :class:`NMMaskState`)."""


def sr_ste(n: int | Callable[[jax.Array], jax.Array], m: int, *,
           decay: float = 2e-4, transposable: bool = False,
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
  """SR-STE: adds ``decay * (1 - mask(params)) * params`` to the gradients.

  Put it BEFORE the optimizer, like ``optax.add_decayed_weights``:
  ``optax.chain(sr_ste(2, 4), optax.sgd(lr))`` with a loss that uses
  :func:`nm_ste`. Then ``W <- W - lr * (grad(W~) + decay * (1 - mask) * W)``,
  the sparse-refined straight-through estimator. The mask (``n`` KEPT of every
  ``m`` along ``axis``) is recomputed from the current params at every step,
  the same mask :func:`nm_ste` uses in the forward pass.

  Before an adaptive optimizer (``optax.chain(sr_ste(2, 4), optax.adam(lr))``)
  the decay enters Adam's moments: this is the "masked decay on gradients" of
  Hu et al. 2024, whose 2:4 pre-training recipe also recomputes the mask
  every few steps (``update_every``) and ends with dense fine-tuning
  (``end_step``, with the forward pass switched to dense at that step).

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
    end_step: dense fine-tuning (Hu et al. 2024): no decay from this step on;
      switch the forward pass to the dense weights at the same step. None:
      decay to the end.
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

    Hu et al., "Accelerating Transformer Pre-training with 2:4 Sparsity",
    ICML 2024, https://arxiv.org/abs/2404.01847.
  """
  schedule = nm_schedule.make_schedule(
      n, m, who="sr_ste", transposable=transposable, axis=axis,
      update_every=update_every, start_step=start_step, init_masks=init_masks,
      method=method, objective=objective, mask=mask, diagnostics=diagnostics,
      end_step=end_step)
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
