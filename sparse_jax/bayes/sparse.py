"""Sparse FOO-VB: the posterior mean projected onto (transposable) N:M masks.

The mask is chosen by the posterior's signal-to-noise ratio ``|mean| / std``
instead of the magnitude ``|mean|``: a weight whose sign the posterior is sure
of is kept before a larger one it is unsure of. With ``transposable=True``
every row AND column of each ``m x m`` tile of a kernel's last two axes
``(in, out)`` keeps ``n`` entries, so the mean network is N:M sparse for the
forward GEMM (``W``) and the backward one (``W^T``).

Why a wrapper. An optax transform in a chain only sees its own state, so a
projection placed after :func:`~sparse_jax.bayes.foovb` in an ``optax.chain``
cannot read the posterior std (the score) nor write the projected mean back
into the posterior. :func:`foovb_nm_projection` therefore WRAPS the FOO-VB
transform (or any transform containing it): it runs the FOO-VB update, scores
the new posterior, projects the mean and writes it back, all in one update::

    tx = foovb_nm_projection(sj.foovb(num_samples=K), 2, 4)
    opt_state = tx.init(params)
    samples = sj.foovb_sample(opt_state, K)   # finds the FOO-VB state inside
    grads = jax.vmap(jax.grad(summed_loss), (0, None))(samples, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)  # exactly N:M, = the mean

The wrapped transform is an ordinary optax transform: use it alone, as the
FOO-VB part of :func:`~sparse_jax.bayes.foovb_step`, or inside an
``optax.chain`` (as its last element, so that nothing changes the updates
after the projection).

What happens to the pruned weights. The projected posterior is ``q(w) =
N(P(mean), Sigma)``: only the MEAN is projected (pruned entries of the mean are
exactly 0); the covariance (diagonal std, Kronecker factors, full factor) is
left as the FOO-VB update made it. Consequences:

* the params you hold (the mean) are exactly N:M sparse, and the K training
  samples are drawn around them; the samples themselves are DENSE (a pruned
  weight is sampled as ``0 + std * eps``), so the gradients also reach the
  pruned weights and ``geps`` keeps updating their std;
* a pruned weight keeps its uncertainty: after the next update its mean is
  ``-eta std^2 gbar`` and it can come back when its ``|mean| / std`` beats a
  kept weight of its tile (the mask is re-scored every ``update_every`` steps);
* for predictions from sparse samples, mask the samples with the masks held
  in the state: ``apply_masks(samples, opt_state.masks)``
  (:func:`apply_masks`).

Setting the std of pruned weights to 0 instead would freeze them for good
(the BGD std update keeps a zero std at zero and the score ``0 / 0`` is
undefined), so it is not done.

References:
  Zeno, Golan, Hoffer, Soudry, "Task Agnostic Continual Learning Using Online
  Variational Bayes with Fixed-Point Updates", Neural Computation 2021,
  https://arxiv.org/abs/2010.00373;
  Hubara et al., "Accelerated Sparse Neural Training: A Provable and Efficient
  Method to Find N:M Transposable Masks", NeurIPS 2021,
  https://arxiv.org/abs/2102.08124.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparse_jax._core import nm_schedule
from sparse_jax._core import trees
from sparse_jax._core.nm_schedule import AxisSpec, MaskSpec, NMMaskState
from sparse_jax.bayes import layout as lo
from sparse_jax.bayes.transform import find_foovb_state, foovb_set_mean, foovb_std

PyTree = Any


class FooVBNMState(NamedTuple):
  """State of :func:`foovb_nm_projection`.

  Attributes:
    mask: the N:M mask state (:class:`~sparse_jax.sparsity.NMProjectionState`:
      count, masks, kept_mass, flip_rate), the same type ``nm_projection``
      keeps, so ``sparsity_diagnostics`` and the training loop see it.
    inner: the state of the wrapped transform (holds the
      :class:`~sparse_jax.bayes.FooVBState`, whose mean is the projected mean).

  ``state.count`` and ``state.masks`` read the mask state's (bool masks like
  params, ``optax.MaskedNode()`` on leaves that are not pruned; all True
  before the first projection).
  """
  mask: NMMaskState
  inner: PyTree

  @property
  def count(self) -> jax.Array:
    return self.mask.count

  @property
  def masks(self) -> PyTree:
    return self.mask.masks


def _snr_leaves(mean_leaves: list[jax.Array], std_leaves: list[jax.Array],
                kinds: tuple[str, ...], m: int) -> list[jax.Array]:
  """``|mean| / std`` per leaf in float32 (``|mean|`` for point estimates)."""
  out = []
  big = jnp.finfo(jnp.float32).max / (m * m)  # a tile's pattern sum stays finite
  tiny = jnp.finfo(jnp.float32).tiny
  for mu, sd, kind in zip(mean_leaves, std_leaves, kinds):
    a = jnp.abs(mu.astype(jnp.float32))
    if kind == lo.FIXED:
      out.append(a)
    else:
      s = jnp.maximum(sd.astype(jnp.float32), tiny)
      out.append(jnp.minimum(a / s, big))
  return out


def foovb_snr(opt_state: PyTree) -> PyTree:
  """Signal-to-noise ratio ``|mean| / std`` of every parameter, like params.

  ``std`` is the marginal posterior std (:func:`~sparse_jax.bayes.foovb_std`:
  diagonal, Kronecker or full). Leaves that are point estimates (outside the
  FOO-VB ``mask``, std 0) get ``|mean|``; a std that underflowed to 0 counts
  as the smallest positive float32. float32 scores.

  Args:
    opt_state: the state of :func:`~sparse_jax.bayes.foovb`, or of any
      transform containing it.

  Returns:
    A tree like params of nonnegative float32 arrays.

  Example:
    >>> import jax.numpy as jnp
    >>> from sparse_jax.bayes import foovb
    >>> state = foovb(init_std=0.5).init({"w": jnp.array([1.0, -2.0])})
    >>> foovb_snr(state)["w"]
    Array([2., 4.], dtype=float32)

  References:
    https://arxiv.org/abs/1803.10123 (BGD: the std as a per-weight certainty)
  """
  state = find_foovb_state(opt_state)
  idx = [i for i, k in enumerate(state.layout.kinds) if k != lo.ABSENT]
  return trees.replace(state.mean, idx, _snr_leaves(
      trees.gather(state.mean, idx), trees.gather(foovb_std(opt_state), idx),
      [state.layout.kinds[i] for i in idx], 1))


def _pruned_scores(opt_state: PyTree, idx: list[int], m: int) -> list:
  """``|mean| / std`` of the leaves at ``idx`` of the FOO-VB posterior."""
  state = find_foovb_state(opt_state)
  return _snr_leaves(trees.gather(state.mean, idx),
                     trees.gather(foovb_std(opt_state), idx),
                     [state.layout.kinds[i] for i in idx], m)


def foovb_nm_masks(opt_state: PyTree, n: int, m: int, *,
                   transposable: bool = False, method: str = "exact",
                   objective: str = "l1", axis: AxisSpec = -2,
                   mask: MaskSpec = None) -> PyTree:
  """N:M masks of the FOO-VB posterior mean, scored by ``|mean| / std``.

  ``n`` entries are KEPT per group of ``m``. With ``transposable=True`` each
  ``m x m`` tile of a kernel's last two axes keeps the mask with ``n`` per row
  and per column that maximises the tile's sum of ``|mean| / std`` (exact for
  ``method="exact"``; see
  :func:`~sparse_jax.masks.transposable_nm_mask`); otherwise the ``n``
  largest ``|mean| / std`` of every ``m`` consecutive entries along ``axis``.

  Args:
    opt_state: the state of :func:`~sparse_jax.bayes.foovb`, or of any
      transform containing it (e.g. :func:`foovb_nm_projection`).
    n: entries kept per group (per tile row and column when transposable).
    m: group (tile) size.
    transposable: transposable N:M masks, or plain N:M (default, as in
      ``nm_projection``; before 0.2 the default was True).
    method: transposable solver: ``"exact"``, ``"greedy"`` or
      ``"greedy_repair"``.
    objective: transposable objective on the scores, ``"l1"`` or ``"l2"``.
    axis: N:M axis of plain masks (default -2, the input axis of Flax
      kernels); an int, a pytree of ints or a callable.
    mask: which leaves to prune (pytree of bools, callable, or None for
      :func:`~sparse_jax.sparsity.default_filter`: kernels whose sizes are
      divisible by ``m``).

  Returns:
    A tree like params: bool masks on the pruned leaves, ``optax.MaskedNode()``
    on the others.

  Example:
    >>> import jax.numpy as jnp
    >>> from sparse_jax.bayes import foovb
    >>> state = foovb().init({"kernel": jnp.arange(1., 17.).reshape(4, 4)})
    >>> int(foovb_nm_masks(state, 2, 4, transposable=True)["kernel"].sum())
    8

  References:
    Hubara et al., NeurIPS 2021, https://arxiv.org/abs/2102.08124.
  """
  schedule = nm_schedule.make_schedule(
      n, m, who="foovb_nm_masks", transposable=transposable, axis=axis,
      method=method, objective=objective, mask=mask)
  state = find_foovb_state(opt_state)
  pruned = schedule.select(state.mean, m)
  idx = [p.index for p in pruned]
  masks = schedule.compute(_pruned_scores(opt_state, idx, m), pruned,
                           jnp.zeros([], jnp.int32), m)
  return trees.scatter(state.mean, idx, masks)


def apply_masks(tree: PyTree, masks: PyTree) -> PyTree:
  """Zeroes ``tree`` outside ``masks`` (leaves masked with MaskedNode pass).

  ``tree`` may carry leading axes (e.g. K samples from
  :func:`~sparse_jax.bayes.foovb_sample`); the masks broadcast over them.

  Args:
    tree: a tree like params (or with extra leading axes on every leaf).
    masks: bool masks like params, ``optax.MaskedNode()`` where not pruned
      (e.g. :attr:`FooVBNMState.masks` or :func:`foovb_nm_masks`).

  Returns:
    The masked tree.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> apply_masks({"a": jnp.ones(2), "b": jnp.ones(2)},
    ...             {"a": jnp.array([True, False]), "b": optax.MaskedNode()})["a"]
    Array([1., 0.], dtype=float32)
  """
  def one(mk, x):
    if trees.is_masked(mk):
      return x
    return jnp.where(mk, x, jnp.zeros((), x.dtype))
  return jax.tree.map(one, masks, tree, is_leaf=trees.is_masked)


def foovb_nm_projection(
    foovb_tx: optax.GradientTransformation, n: int, m: int, *,
    transposable: bool = False,
    axis: AxisSpec = -2,
    update_every: int | None = 1,
    start_step: int = 0,
    init_masks: bool = False,
    method: str = "exact",
    objective: str = "l1",
    mask: MaskSpec = None,
    diagnostics: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Wraps FOO-VB so that its posterior mean stays (transposable) N:M sparse.

  Each update: (1) the wrapped transform's update (the FOO-VB fixed-point
  step) gives the new mean ``mu = params + updates``; (2) every
  ``update_every`` steps the masks are recomputed from the new posterior by
  :func:`foovb_nm_masks` (score ``|mu| / std``); (3) the mean is projected,
  ``mu' = mask * mu``, and written back into the FOO-VB state
  (:func:`~sparse_jax.bayes.foovb_set_mean`), so the next samples are drawn
  around it and the next update starts from it; (4) the returned updates are
  ``mu' - params``. After ``optax.apply_updates`` the params are exactly N:M
  sparse (pruned entries are exactly 0) and equal the posterior mean. The
  covariance is not touched: see the module docstring for what that means for
  the pruned weights and the samples.

  Args:
    foovb_tx: :func:`~sparse_jax.bayes.foovb` or a transform containing it
      once (e.g. ``optax.chain(foovb(mask=...), optax.masked(adam, ...))``,
      whose point-estimate leaves are then projected too, by ``|mean|``).
      ``fixed_point_iterations`` must be 1.
    n: entries KEPT per group of ``m`` (per tile row and column when
      transposable).
    m: group (tile) size.
    transposable: transposable N:M, or plain N:M along ``axis`` (default, as
      in ``nm_projection``; before 0.2 the default was True: pass
      ``transposable=True`` for the former behaviour).
    axis: N:M axis of plain masks (int, pytree of ints or callable).
    update_every: re-score the masks every this many steps (from
      ``start_step``); None: score once at ``start_step`` and keep them.
    start_step: dense warm-up: updates pass through unchanged before it.
    init_masks: score the masks in ``init`` (from the initial posterior) and
      project from step 0 with them; ``start_step`` must then be 0.
    method: transposable solver: ``"exact"`` (optimal: maximises the tile's
      sum of ``|mean| / std``), ``"greedy"``, ``"greedy_repair"``.
    objective: transposable objective on the scores, ``"l1"`` or ``"l2"``.
    mask: which leaves to prune; None: :func:`~sparse_jax.sparsity.default_filter`
      (kernels whose sizes are divisible by ``m``; biases, norms and a head
      with 10 outputs stay dense).
    diagnostics: track ``kept_mass`` (of ``|mean|``) and ``flip_rate`` in
      the mask state, as ``nm_projection`` does.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`FooVBNMState`; its update needs ``params``.

  Raises:
    ValueError: bad ``n``/``m``/options at construction; at init, when
      ``foovb_tx`` holds no (or several) FOO-VB states or iterates the fixed
      point, or a selected leaf cannot be tiled (naming its path and shape).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from sparse_jax.bayes import foovb, foovb_sample
    >>> from sparse_jax.masks import is_transposable_nm_sparse
    >>> params = {"kernel": jax.random.normal(jax.random.key(0), (8, 8))}
    >>> tx = foovb_nm_projection(foovb(num_samples=2), 2, 4, transposable=True)
    >>> state = tx.init(params)
    >>> grads = jax.vmap(jax.grad(lambda p: jnp.sum(p["kernel"] ** 2)))(
    ...     foovb_sample(state, 2))
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> bool(is_transposable_nm_sparse(params["kernel"], 2, 4))
    True

  References:
    Zeno et al., https://arxiv.org/abs/2010.00373 (FOO-VB);
    Hubara et al., https://arxiv.org/abs/2102.08124 (transposable N:M).
  """
  who = "foovb_nm_projection"
  if not (hasattr(foovb_tx, "init") and hasattr(foovb_tx, "update")):
    raise ValueError(f"{who}: foovb_tx must be an optax transformation "
                     f"containing sparse_jax.foovb, got {foovb_tx!r}.")
  schedule = nm_schedule.make_schedule(
      n, m, who=who, transposable=transposable, axis=axis,
      update_every=update_every, start_step=start_step, init_masks=init_masks,
      method=method, objective=objective, mask=mask, diagnostics=diagnostics)

  def init_fn(params):
    inner = foovb_tx.init(params)
    try:
      fstate = find_foovb_state(inner)
    except ValueError as e:
      raise ValueError(f"{who}: {e}") from None
    if fstate.anchor is not None:
      raise ValueError(
          f"{who}: foovb(fixed_point_iterations > 1) is not supported: the "
          f"prior of the iterations (state.anchor) would keep the unprojected "
          f"mean. Use fixed_point_iterations=1.")
    m_now = schedule.group_size()
    idx = [p.index for p in schedule.select(params, m_now)]
    scores = _pruned_scores(inner, idx, m_now) if init_masks else None
    return FooVBNMState(mask=schedule.init(params, scores=scores)[1],
                        inner=inner)

  def update_fn(updates, state, params=None, **extra_args):
    sched = schedule.with_structure(state.mask)
    m_now = sched.m
    pruned = sched.select(params, m_now)
    idx = [p.index for p in pruned]
    inner_updates, inner = foovb_tx.update(updates, state.inner, params,
                                           **extra_args)
    p_list = trees.gather(params, idx)
    u_list = trees.gather(inner_updates, idx)
    new_list = [(p + u).astype(p.dtype) for p, u in zip(p_list, u_list)]
    active, masks, mask_state = sched.update(
        state.mask, params, new_list, pruned,
        scores=lambda: _pruned_scores(inner, idx, m_now))
    projected = [jnp.where(mk, w, jnp.zeros((), w.dtype))
                 for w, mk in zip(new_list, masks)]
    out = nm_schedule.project(p_list, u_list, new_list, masks, active)
    fstate = find_foovb_state(inner)
    old_means = trees.gather(fstate.mean, idx)
    means = [x.astype(o.dtype) if active is True else
             jnp.where(active, x.astype(o.dtype), o)
             for x, o in zip(projected, old_means)]
    inner = foovb_set_mean(inner, trees.replace(fstate.mean, idx, means))
    return (trees.replace(inner_updates, idx, out),
            FooVBNMState(mask=mask_state, inner=inner))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
