"""IVON: the Improved Variational Online Newton optimizer, as an optax transform.

IVON (Shen et al., ICML 2024) learns a diagonal Gaussian posterior ``N(m,
sigma^2)`` with an Adam-like cost: one Monte-Carlo sample per step is enough,
and the Hessian estimate that sets ``sigma`` comes for free from the gradient
at the sample (Price's / the reparameterisation estimator). Algorithm 1 of the
paper, per entry, with ``theta = m + sigma eps``, ``eps ~ N(0, I)``:

    g_hat = grad of the batch-MEAN loss at theta   (mean over K samples)
    h_hat = g_hat * (theta - m) / sigma^2           (mean over K samples)
    g     <- beta1 g + (1 - beta1) g_hat
    h     <- beta2 h + (1 - beta2) h_hat
             + (1 - beta2)^2 (h - h_hat)^2 / (2 (h + delta))
    m     <- m - alpha (g / (1 - beta1^t) + delta m) / (h + delta)
    sigma <- 1 / sqrt(lambda (h + delta))

``lambda`` is the effective sample size (the training-set size for the
posterior of the data; smaller tempers it), ``delta`` the weight decay (the
prior precision is ``lambda delta``), and ``h`` starts at ``h0``. The third
term of the ``h`` update keeps ``h + delta > 0`` (the improved Bayesian
learning rule of Lin et al. 2020). With ``rescale_lr`` the learning rate is
multiplied by ``h0 + delta`` (the paper's optional step), so that the first
steps have the size of a plain SGD step of ``alpha``.

It shares FOO-VB's sampling API: draw the K points with
``foovb_sample(opt_state, K)``, pass the K stacked gradients to ``update``
(the noise is regenerated from the state's key), predict with
:mod:`sparse_jax.bayes.predict`; ``foovb_std`` returns ``sigma``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sparse_jax._core import checks
from sparse_jax._core import keys
from sparse_jax._core import numerics
from sparse_jax._core import trees
from sparse_jax.bayes import layout as lo
from sparse_jax.bayes.transform import (
    IVONState,
    _NOT_PARAMS,
    _normal,
    _param_dtypes,
    _sample_mean,
    check_sample_grads,
    sharded_update,
)

PyTree = Any


def ivon(
    learning_rate: Any,
    *,
    ess: Any,
    hess_init: Any = 1.0,
    beta1: Any = 0.9,
    beta2: Any = 0.99999,
    weight_decay: Any = 1e-4,
    num_samples: Any = 1,
    rescale_lr: bool = True,
    clip_radius: Any = None,
    loss: str = "mean",
    batch_size: Any = None,
    key: Any = 0,
    mask: lo.Filter = None,
) -> optax.GradientTransformationExtraArgs:
  """IVON (Shen et al. 2024): variational learning at the cost of Adam.

  A diagonal Gaussian posterior ``N(m, sigma^2)``; see the module docstring
  for Algorithm 1. Use it like :func:`~sparse_jax.bayes.foovb`: the
  gradients passed to ``update`` are those at the K samples of
  ``foovb_sample(opt_state, K)``, stacked on a leading axis, and the updates
  move the params to the new mean.

  Args:
    learning_rate: ``alpha`` (a float, or an optax schedule of the step).
    ess: effective sample size ``lambda`` (e.g. the number of training
      examples); ``sigma = 1 / sqrt(ess (h + weight_decay))``.
    hess_init: ``h0 > 0``, the initial Hessian estimate.
    beta1: gradient momentum in [0, 1).
    beta2: Hessian momentum in [0, 1) (the paper: 0.99999; shorter runs
      need smaller values for ``h`` to move).
    weight_decay: ``delta > 0``; the prior is ``N(0, 1 / (ess delta))``.
    num_samples: K Monte-Carlo samples per step (1 in the paper).
    rescale_lr: multiply the learning rate by ``hess_init + weight_decay``
      (the paper's optional step; the official code's default).
    clip_radius: optional elementwise clip of the preconditioned step
      ``(g / (1 - beta1^t) + delta m) / (h + delta)`` to ``[-r, r]``.
    loss: ``"mean"`` (default, the paper's ``l_bar``): grads are those of the
      batch-MEAN loss; ``"sum"``: of the summed loss, divided by the batch
      size (``batch_size`` here, or ``update(..., batch_size=n)``).
    batch_size: the batch size for ``loss="sum"``.
    key: int seed or PRNG key of the sampling noise.
    mask: which leaves are Bayesian, optax style (pytree of bools, a prefix
      or a callable); the others are point estimates (``sigma = 0``, never
      perturbed) stepped by ``lr' (g / (1 - beta1^t) + delta m) / (h0 +
      delta)`` with the same momentum and weight decay (``lr'`` the learning
      rate, rescaled as above): with ``rescale_lr``, momentum SGD at ``lr``.
      (Under ``optax.masked(ivon(...), ...)`` the excluded leaves are not in
      the state at all: ``foovb_sample`` returns them as
      ``optax.MaskedNode``; merge in your own params before the loss.)

  Non-finite gradients skip the step (zero updates; state kept; counted in
  ``state.skipped``), as in FOO-VB.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`~sparse_jax.bayes.IVONState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from sparse_jax.bayes import ivon, foovb_sample
    >>> params = {"w": jnp.zeros(3)}
    >>> tx = ivon(0.1, ess=100, num_samples=2)
    >>> state = tx.init(params)
    >>> loss = lambda p: jnp.sum((p["w"] - 1.0) ** 2)
    >>> grads = jax.vmap(jax.grad(loss))(foovb_sample(state, 2))
    >>> updates, state = tx.update(grads, state, params)
    >>> optax.apply_updates(params, updates)["w"].shape
    (3,)

  References:
    Shen, Daheim, Cong, Nickl, Marconi, Bazan, Rosales, Khan, Kahn,
    Moellenhoff, Chang, Chang, "Variational Learning is Effective for Large
    Deep Networks", ICML 2024, https://arxiv.org/abs/2402.17641 (Algorithm 1);
    Lin, Schmidt, Khan, "Handling the Positive-Definite Constraint in the
    Bayesian Learning Rule", ICML 2020, https://arxiv.org/abs/2002.10060
  """
  who = "ivon"
  if not callable(learning_rate):
    learning_rate = checks.check_float(learning_rate, "learning_rate", who=who,
                                       minimum=0.0, traced_ok=True)
  ess = checks.check_float(ess, "ess", who=who, minimum=0.0, min_open=True,
                           traced_ok=True)
  hess_init = checks.check_float(hess_init, "hess_init", who=who, minimum=0.0,
                                 min_open=True, traced_ok=True)
  beta1 = checks.check_float(beta1, "beta1", who=who, minimum=0.0,
                             maximum=1.0, max_open=True, traced_ok=True)
  beta2 = checks.check_float(beta2, "beta2", who=who, minimum=0.0,
                             maximum=1.0, max_open=True, traced_ok=True)
  weight_decay = checks.check_float(weight_decay, "weight_decay", who=who,
                                    minimum=0.0, min_open=True, traced_ok=True)
  num_samples = checks.check_int(num_samples, "num_samples", who=who,
                                 minimum=1, traced_ok=True)
  rescale_lr = checks.check_bool(rescale_lr, "rescale_lr", who=who)
  if clip_radius is not None:
    clip_radius = checks.check_float(clip_radius, "clip_radius", who=who,
                                     minimum=0.0, min_open=True,
                                     traced_ok=True)
  checks.check_choice(loss, "loss", ("mean", "sum"), who=who)
  batch_size = checks.check_int(batch_size, "batch_size", who=who,
                                allow_none=True, minimum=1, traced_ok=True)
  if not checks.is_traced(key):
    keys.as_key(key, who=who)

  def init_fn(params: PyTree) -> IVONState:
    if trees.is_params_placeholder(params):   # optax.tree_map_params
      return IVONState(count=jnp.zeros((), jnp.int32),
                       key=keys.key_data(key, who=who), mean=params,
                       std=params, momentum=params, hess=params,
                       layout=_NOT_PARAMS, skipped=jnp.zeros((), jnp.int32))
    layout = lo.build_layout(params, "diagonal", mask=mask, who=who)
    leaves, treedef = jax.tree.flatten(params, is_leaf=trees.is_masked)
    mean, std, mom, hess = [], [], [], []
    for x, kind in zip(leaves, layout.kinds):
      if kind == lo.ABSENT:
        mean.append(x)
        std.append(None)
        mom.append(None)
        hess.append(None)
        continue
      x = jnp.asarray(x)
      d = jnp.promote_types(x.dtype, jnp.float32)
      mean.append(jnp.array(x, d, copy=True))    # never the params' buffers
      mom.append(jnp.zeros(x.shape, d))
      if kind == lo.DIAG:
        h = jnp.full(x.shape, hess_init, d)
        hess.append(h)
        std.append(jax.lax.rsqrt(ess * (h + weight_decay)))
      else:
        hess.append(None)
        std.append(None)
    un = treedef.unflatten
    return IVONState(count=jnp.zeros((), jnp.int32),
                     key=keys.key_data(key, who=who), mean=un(mean),
                     std=un(std), momentum=un(mom), hess=un(hess),
                     layout=layout, skipped=jnp.zeros((), jnp.int32))

  def update_fn(updates: PyTree, state: IVONState, params: PyTree = None, *,
                batch_size: Any = batch_size,
                **extra_args: Any) -> tuple[PyTree, IVONState]:
    del extra_args
    return sharded_update(_update, updates, state, params, batch_size)

  def _update(updates: PyTree, state: IVONState, params: PyTree,
              batch_size: Any) -> tuple[PyTree, IVONState]:
    layout = state.layout
    grads = check_sample_grads(updates, state.mean, num_samples, who=who)
    if loss == "sum":
      if batch_size is None:
        raise ValueError(
            "ivon(loss='sum') needs the batch size to turn summed-loss "
            "gradients into mean-loss ones: pass ivon(batch_size=...) or "
            "tx.update(..., batch_size=n).")
    k = next((g.shape[0] for g, kind in zip(grads, layout.kinds)
              if kind != lo.ABSENT), 1)
    noise_key, next_key = jax.random.split(state.key)
    mean, treedef = jax.tree.flatten(state.mean, is_leaf=trees.is_masked)
    std, mom, hess = (treedef.flatten_up_to(t) for t in
                      (state.std, state.momentum, state.hess))
    dtypes = _param_dtypes(layout, mean)
    count = state.count + 1
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    if rescale_lr:
      lr = lr * (hess_init + weight_decay)
    debias = 1.0 - beta1 ** count.astype(jnp.float32)
    new_mean, new_std, new_mom, new_hess = (list(mean), list(std), list(mom),
                                            list(hess))
    out: list[Any] = [None] * len(mean)
    for i, kind in enumerate(layout.kinds):
      if kind == lo.ABSENT:
        out[i] = grads[i]
        continue
      m = mean[i]
      g = grads[i].astype(m.dtype)
      if loss == "sum":
        g = g / batch_size
      g_hat = _sample_mean(g)
      new_mom[i] = beta1 * mom[i] + (1.0 - beta1) * g_hat
      if kind == lo.DIAG:
        s, h = std[i], hess[i]
        eps = _normal(noise_key, layout.noise_index(i), k, m.shape, s.dtype)
        h_hat = _sample_mean(g * eps) / s            # g (theta - m) / sigma^2
        h_new = (beta2 * h + (1.0 - beta2) * h_hat
                 + 0.5 * (1.0 - beta2) ** 2 * jnp.square(h - h_hat)
                 / (h + weight_decay))
        new_hess[i] = h_new
        new_std[i] = jax.lax.rsqrt(ess * (h_new + weight_decay))
        precond = h_new + weight_decay
      else:      # fixed (not Bayesian): a momentum step at the mean
        precond = hess_init + weight_decay
      step = (new_mom[i] / debias + weight_decay * m) / precond
      if clip_radius is not None:
        step = jnp.clip(step, -clip_radius, clip_radius)
      new_mean[i] = m - lr * step
    if params is None:
      base = mean
    else:
      base, p_def = jax.tree.flatten(params, is_leaf=trees.is_masked)
      if p_def != treedef:
        trees.check_same_structure(state.mean, params, who=who,
                                   what="the params")
    for i, kind in enumerate(layout.kinds):
      if kind != lo.ABSENT:
        out[i] = (new_mean[i] - jnp.asarray(base[i]).astype(
            new_mean[i].dtype)).astype(dtypes[i])
    finite = numerics.all_finite(
        [g for g, kind in zip(grads, layout.kinds) if kind != lo.ABSENT])
    out = [o if kind == lo.ABSENT else
           jnp.where(finite, o, jnp.zeros((), o.dtype))
           for o, kind in zip(out, layout.kinds)]
    un = treedef.unflatten
    new = (count, next_key, un(new_mean), un(new_std), un(new_mom),
           un(new_hess))
    old = (state.count, state.key, state.mean, state.std, state.momentum,
           state.hess)
    count, next_key, m_t, s_t, g_t, h_t = numerics.where_finite(finite, new,
                                                               old)
    return un(out), IVONState(
        count=count, key=next_key, mean=m_t, std=s_t, momentum=g_t, hess=h_t,
        layout=layout, skipped=state.skipped + (~finite).astype(jnp.int32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
