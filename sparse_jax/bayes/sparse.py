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
from jax import lax
import optax

from sparse_jax.bayes import layout as lo
from sparse_jax.bayes.transform import find_foovb_state, foovb_set_mean, foovb_std
from sparse_jax.sparsity import _common
from sparse_jax.sparsity import leaves as leaves_lib

PyTree = Any


class FooVBNMState(NamedTuple):
  """State of :func:`foovb_nm_projection`.

  Attributes:
    count: number of updates seen (int32).
    masks: bool masks like params (``optax.MaskedNode()`` on leaves that are
      not pruned); all True before the first projection.
    inner: the state of the wrapped transform (holds the
      :class:`~sparse_jax.bayes.FooVBState`, whose mean is the projected mean).
  """
  count: jax.Array
  masks: PyTree
  inner: PyTree


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
  mean_leaves, treedef = jax.tree.flatten(state.mean)
  std_leaves = treedef.flatten_up_to(foovb_std(opt_state))
  return treedef.unflatten(_snr_leaves(mean_leaves, std_leaves,
                                       state.layout.kinds, 1))


def _masks_from(arrays, std_arrays, kinds, pruned, n, m, transposable, method):
  scores = _snr_leaves(arrays, std_arrays, kinds, m)
  return _common.compute_masks(scores, pruned, n, m, transposable=transposable,
                               method=method, objective="l1")


def foovb_nm_masks(opt_state: PyTree, n: int, m: int, *,
                   transposable: bool = True, method: str = "exact",
                   axis: leaves_lib.AxisSpec = -2,
                   mask: leaves_lib.MaskSpec = None) -> PyTree:
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
    transposable: transposable N:M masks (default) or plain N:M.
    method: transposable solver: ``"exact"``, ``"greedy"`` or
      ``"greedy_repair"``.
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
    >>> int(foovb_nm_masks(state, 2, 4)["kernel"].sum())
    8

  References:
    Hubara et al., NeurIPS 2021, https://arxiv.org/abs/2102.08124.
  """
  who = "foovb_nm_masks"
  n, m = _common.check_options(n, m, transposable=transposable, method=method,
                               objective="l1", who=who)
  state = find_foovb_state(opt_state)
  pruned = leaves_lib.resolve(state.mean, m, mask=mask, axis=axis,
                              transposable=transposable, who=who)
  mean_leaves, treedef = jax.tree.flatten(state.mean)
  std_leaves = treedef.flatten_up_to(foovb_std(opt_state))
  kinds = state.layout.kinds
  masks = _masks_from([mean_leaves[p.index] for p in pruned],
                      [std_leaves[p.index] for p in pruned],
                      [kinds[p.index] for p in pruned], pruned, n, m,
                      transposable, method)
  return _common.scatter(state.mean, pruned, masks)


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
    if _common.is_masked_node(mk):
      return x
    return jnp.where(mk, x, jnp.zeros((), x.dtype))
  return jax.tree.map(one, masks, tree, is_leaf=_common.is_masked_node)


def foovb_nm_projection(
    foovb_tx: optax.GradientTransformation, n: int, m: int, *,
    transposable: bool = True,
    method: str = "exact",
    axis: leaves_lib.AxisSpec = -2,
    mask: leaves_lib.MaskSpec = None,
    update_every: int | None = 1,
    start_step: int = 0,
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
    transposable: transposable N:M (default) or plain N:M along ``axis``.
    method: transposable solver: ``"exact"`` (optimal: maximises the tile's
      sum of ``|mean| / std``), ``"greedy"``, ``"greedy_repair"``.
    axis: N:M axis of plain masks (int, pytree of ints or callable).
    mask: which leaves to prune; None: :func:`~sparse_jax.sparsity.default_filter`
      (kernels whose sizes are divisible by ``m``; biases, norms and a head
      with 10 outputs stay dense).
    update_every: re-score the masks every this many steps (from
      ``start_step``); None: score once at ``start_step`` and keep them.
    start_step: dense warm-up: updates pass through unchanged before it.

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
    >>> tx = foovb_nm_projection(foovb(num_samples=2), 2, 4)
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
  n, m = _common.check_options(n, m, transposable=transposable, method=method,
                               objective="l1", who=who)
  if not isinstance(n, int):
    raise ValueError(f"{who}: n must be a Python int, got {n!r}.")
  update_every = _common.check_step(update_every, "update_every", who,
                                    allow_none=True, minimum=1)
  start_step = _common.check_step(start_step, "start_step", who)

  def pruned_of(params):
    return leaves_lib.resolve(params, m, mask=mask, axis=axis,
                              transposable=transposable, who=who)

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
    pruned = pruned_of(params)
    arrays = _common.gather(params, pruned)
    masks = [jnp.ones(jnp.shape(a), bool) for a in arrays]
    return FooVBNMState(count=jnp.zeros([], jnp.int32),
                        masks=_common.scatter(params, pruned, masks),
                        inner=inner)

  def update_fn(updates, state, params=None, **extra_args):
    pruned = pruned_of(params)
    inner_updates, inner = foovb_tx.update(updates, state.inner, params,
                                           **extra_args)
    fstate = find_foovb_state(inner)
    count = state.count
    p_list = _common.gather(params, pruned)
    u_list = _common.gather(inner_updates, pruned)
    new_list = [(p + u).astype(p.dtype) for p, u in zip(p_list, u_list)]
    mean_leaves, treedef = jax.tree.flatten(fstate.mean)
    std_leaves = treedef.flatten_up_to(foovb_std(inner))
    kinds = [fstate.layout.kinds[p.index] for p in pruned]
    stds = [std_leaves[p.index] for p in pruned]

    active = count >= start_step
    recompute = (count == start_step) if update_every is None else (
        active & ((count - start_step) % update_every == 0))
    old_masks = _common.gather(state.masks, pruned)
    masks = lax.cond(
        recompute,
        lambda _: _masks_from(new_list, stds, kinds, pruned, n, m,
                              transposable, method),
        lambda _: list(old_masks), None)

    out, means = [], list(mean_leaves)
    for pr, p, u, w, mk in zip(pruned, p_list, u_list, new_list, masks):
      projected = jnp.where(mk, w, jnp.zeros((), w.dtype))
      out.append(jnp.where(active, projected - p, u.astype(p.dtype)))
      old = mean_leaves[pr.index]
      means[pr.index] = jnp.where(active, projected.astype(old.dtype), old)
    inner = foovb_set_mean(inner, treedef.unflatten(means))
    new_state = FooVBNMState(count=optax.safe_increment(count),
                             masks=_common.scatter(params, pruned, masks),
                             inner=inner)
    return _common.replace(inner_updates, pruned, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
