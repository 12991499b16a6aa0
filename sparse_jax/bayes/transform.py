"""FOO-VB online variational Bayes as an optax transformation.

One training step with K Monte-Carlo samples::

    samples = foovb_sample(opt_state, K)                  # (K, ...) per leaf
    grads = jax.vmap(jax.grad(summed_loss), (0, None))(samples, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)          # the posterior mean

Where the mean lives. The state holds the whole posterior, including its mean
(``FooVBState.mean``): samples are drawn around it and every update starts from
it, so sampling and update can never disagree. ``update`` returns ``new_mean -
params`` (``new_mean - state.mean`` without params), hence after
``apply_updates`` the params you hold equal ``state.mean`` -- as long as no
later transform in an ``optax.chain`` changes the updates. If one does (e.g.
a projection onto an N:M mask), the params become ``projection(state.mean)``
while the state keeps the unprojected mean ("dense shadow mean"). To make the
projected point the posterior mean instead (samples drawn around it, the next
update starting from it) write it back after each step with
``opt_state = foovb_set_mean(opt_state, params)``.

Noise. ``foovb_sample`` does not advance the PRNG key; ``update`` regenerates
exactly the same noise from ``state.key`` (nothing is stored between the two),
then advances the key. Noise of sample k does not depend on K.

References:
  Zeno, Golan, Hoffer, Soudry, "Task Agnostic Continual Learning Using Online
  Variational Bayes with Fixed-Point Updates", Neural Computation 2021,
  https://arxiv.org/abs/2010.00373
  Zeno, Golan, Hoffer, Soudry, "Bayesian Gradient Descent",
  https://arxiv.org/abs/1803.10123
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from sparse_jax._core import checks
from sparse_jax._core import keys
from sparse_jax._core import lapack
from sparse_jax._core import numerics
from sparse_jax._core import sharding
from sparse_jax._core import states
from sparse_jax._core import trees
from sparse_jax.bayes import fixed_point as fp
from sparse_jax.bayes import kronecker as kr
from sparse_jax.bayes import layout as lo

PyTree = Any

MAX_FULL_SIZE = 16384  # a (D, D) factor beyond this is not "a small model"
MAX_KRON_SIZE = 8192   # a Kronecker factor side (256 MiB in float32, an SVD per step)

# What the non-params fields of a symbolic init hold (optax.tree_map_params
# initialises with a params placeholder; these fields are not params-like).
_NOT_PARAMS = object()


class KronFactors(NamedTuple):
  """Square-root factors of one matrix-variate group, ``cov = (a a^T) kron (b b^T)``."""
  a: jax.Array  # (rows, rows): inputs (fan_in, plus one for the bias row)
  b: jax.Array  # (cols, cols): outputs


class FooVBPosterior(NamedTuple):
  """The Gaussian posterior: mean and covariance parameters."""
  mean: PyTree             # like params
  std: PyTree              # like params; None where the leaf is not diagonal
  kron: dict[str, KronFactors]  # per Kronecker group, keyed by the kernel's path
  scale: jax.Array | None  # "full": (D, D) with cov = scale scale^T


class FooVBState(NamedTuple):
  """State of :func:`foovb`.

  Attributes:
    count: number of updates applied (int32).
    key: PRNG key of the next step's noise (advanced by every update).
    mean: the posterior mean, like params.
    std: per-entry std of the diagonal leaves, like params (None for leaves
      that are fixed, Kronecker or full).
    kron: ``{kernel path: KronFactors(a, b)}`` for ``covariance="kron"``.
    scale: the ``(D, D)`` square-root factor of the full covariance over the
      flattened Bayesian leaves (tree order), or None.
    anchor: with ``fixed_point_iterations > 1``: the posterior at the start of
      the current batch (the prior of the fixed-point iterations), else None.
    layout: static description of which leaf has which posterior
      (:class:`sparse_jax.bayes.layout.Layout`); it has no array leaves.
    skipped: int32 number of steps skipped because a gradient held a NaN or
      inf (the posterior, count and key were left as they were).
  """
  count: jax.Array
  key: jax.Array
  mean: PyTree
  std: PyTree
  kron: dict[str, KronFactors]
  scale: jax.Array | None
  anchor: FooVBPosterior | None
  layout: lo.Layout
  skipped: Any = None

  @property
  def posterior(self) -> FooVBPosterior:
    return FooVBPosterior(self.mean, self.std, self.kron, self.scale)


class IVONState(NamedTuple):
  """State of :func:`sparse_jax.bayes.ivon` (a diagonal Gaussian posterior).

  It shares the sampling API of :class:`FooVBState`: ``foovb_sample``,
  ``foovb_std``, ``foovb_set_mean`` and ``find_foovb_state`` accept it.

  Attributes:
    count: number of updates applied (int32).
    key: PRNG key of the next step's noise (advanced by every update).
    mean: the posterior mean ``m``, like params.
    std: ``sigma = 1 / sqrt(ess (hess + weight_decay))``, like params (None
      for fixed leaves).
    momentum: the gradient momentum ``g``, like params.
    hess: the Hessian estimate ``h``, like params.
    layout: static: which leaves are Bayesian.
    skipped: int32 number of steps skipped because a gradient held a NaN or
      inf.
  """
  count: jax.Array
  key: jax.Array
  mean: PyTree
  std: PyTree
  momentum: PyTree
  hess: PyTree
  layout: lo.Layout
  skipped: Any = None

  @property
  def posterior(self) -> FooVBPosterior:
    return FooVBPosterior(self.mean, self.std, {}, None)

  @property
  def kron(self) -> dict:
    return {}

  @property
  def scale(self) -> None:
    return None


_POSTERIOR_STATES = (FooVBState, IVONState)


# ----------------------------------------------------------------------------
# Argument checks (the shared validators; injected hyperparameters arrive
# as traced scalars inside the update and pass unchecked).


def _positive_float(value: Any, name: str, *, allow_zero: bool = False,
                    maximum: float | None = None) -> Any:
  return checks.check_float(value, name, who="foovb", minimum=0.0,
                            min_open=not allow_zero, maximum=maximum,
                            traced_ok=True)


# ----------------------------------------------------------------------------
# Noise, flattening and sampling (shared by foovb_sample and update).


def _normal(key: jax.Array, index: int, num_samples: int,
            shape: tuple[int, ...], dtype: Any) -> jax.Array:
  """``(K, *shape)`` standard normals; sample k depends on (key, index, k) only."""
  leaf_key = jax.random.fold_in(key, index)
  return jax.vmap(lambda k: jax.random.normal(
      jax.random.fold_in(leaf_key, k), shape, dtype))(jnp.arange(num_samples))


def _sample_mean(x: jax.Array) -> jax.Array:
  """Mean over the leading (sample) axis.

  For small K it is an unrolled sum of the K slices: XLA fuses it (with the
  noise generation feeding it) into one elementwise loop, where a reduction
  over a leading axis is ~25x slower on CPU.
  """
  k = x.shape[0]
  if k > 64:
    return jnp.mean(x, axis=0)
  total = x[0]
  for i in range(1, k):
    total = total + x[i]
  return total / k


def _group_matrix(leaves: list[jax.Array], group: lo.KronGroup, dtype: Any,
                  lead: tuple[int, ...] = ()) -> jax.Array:
  """The ``(*lead, rows, cols)`` matrix of a group (kernel rows, then bias row)."""
  kernel = leaves[group.kernel].astype(dtype)
  mat = kernel.reshape(lead + (group.fan_in, group.cols))
  if group.bias is not None:
    bias = leaves[group.bias].astype(dtype).reshape(lead + (1, group.cols))
    mat = jnp.concatenate([mat, bias], axis=-2)
  return mat


def _scatter_group(out: list, mat: jax.Array, group: lo.KronGroup,
                   dtypes: list[Any], lead: tuple[int, ...] = ()) -> None:
  """Writes a group's ``(*lead, rows, cols)`` matrix back into kernel/bias leaves."""
  kernel = mat[..., :group.fan_in, :].reshape(lead + group.kernel_shape)
  out[group.kernel] = kernel.astype(dtypes[group.kernel])
  if group.bias is not None:
    out[group.bias] = mat[..., group.fan_in, :].astype(dtypes[group.bias])


def _ravel_full(leaves: list[jax.Array], layout: lo.Layout, dtype: Any,
                lead: tuple[int, ...] = ()) -> jax.Array:
  return jnp.concatenate(
      [leaves[i].astype(dtype).reshape(lead + (-1,)) for i in layout.full], -1)


def _unravel_full(out: list, flat: jax.Array, layout: lo.Layout,
                  dtypes: list[Any], lead: tuple[int, ...] = ()) -> None:
  offset = 0
  for i in layout.full:
    size = math.prod(layout.shapes[i])
    out[i] = flat[..., offset:offset + size].reshape(
        lead + layout.shapes[i]).astype(dtypes[i])
    offset += size


def _draw(post: FooVBPosterior, layout: lo.Layout, noise_key: jax.Array,
          num_samples: int) -> PyTree:
  """K samples of the posterior, stacked on a leading axis of every leaf."""
  mean_leaves, treedef = jax.tree.flatten(post.mean, is_leaf=trees.is_masked)
  std_leaves = treedef.flatten_up_to(post.std)
  dtypes = _param_dtypes(layout, mean_leaves)
  lead = (num_samples,)
  out: list[Any] = [None] * len(mean_leaves)
  for i, kind in enumerate(layout.kinds):
    m = mean_leaves[i]
    if kind == lo.ABSENT:
      out[i] = m
    elif kind == lo.FIXED:
      out[i] = jnp.broadcast_to(m, lead + m.shape).astype(dtypes[i])
    elif kind == lo.DIAG:
      s = std_leaves[i]
      eps = _normal(noise_key, layout.noise_index(i), num_samples, m.shape,
                    s.dtype)
      out[i] = (m.astype(s.dtype) + s * eps).astype(dtypes[i])
  for g in layout.groups:
    fac = post.kron[g.name]
    mat = _group_matrix(mean_leaves, g, fac.a.dtype)
    phi = _normal(noise_key, layout.noise_index(g.kernel), num_samples,
                  (g.rows, g.cols), fac.a.dtype)
    _scatter_group(out, kr.kron_sample(mat, fac.a, fac.b, phi), g, dtypes, lead)
  if layout.full:
    mu = _ravel_full(mean_leaves, layout, post.scale.dtype)
    eps = _normal(noise_key, layout.noise_index(len(mean_leaves)), num_samples,
                  mu.shape,
                  post.scale.dtype)
    _unravel_full(out, mu + eps @ post.scale.T, layout, dtypes, lead)
  return treedef.unflatten(out)


def _param_dtypes(layout: lo.Layout, mean_leaves: list[Any]) -> list[Any]:
  """The params' dtypes (samples and updates are returned in them)."""
  if layout.dtypes:
    return list(layout.dtypes)
  return [getattr(m, "dtype", None) for m in mean_leaves]


# ----------------------------------------------------------------------------
# Finding the state inside a chain.


def find_foovb_state(opt_state: PyTree) -> FooVBState:
  """Returns the (single) :class:`FooVBState` (or ``IVONState``) inside ``opt_state``.

  ``opt_state`` may be the state of :func:`foovb` (or
  :func:`~sparse_jax.bayes.ivon`) itself, of any optax
  combinator containing it (``optax.chain``, ``optax.masked`` ...), or an
  ``nnx.Optimizer`` (or its ``opt_state``) built with such a transform.

  Args:
    opt_state: an optax state.

  Returns:
    The FOO-VB state.

  Raises:
    ValueError: there is no FOO-VB state, or more than one.

  Example:
    >>> tx = optax.chain(foovb(num_samples=2), optax.identity())
    >>> find_foovb_state(tx.init({"w": jnp.zeros(3)})).count
    Array(0, dtype=int32)
  """
  return states.find_one(opt_state, _POSTERIOR_STATES, who="foovb",
                         what="FOO-VB or IVON state (FooVBState / IVONState)")


def _replace_state(opt_state: PyTree, new: FooVBState) -> PyTree:
  return states.replace(opt_state, _POSTERIOR_STATES, new)


def foovb_sample(opt_state: PyTree, num_samples: int, *,
                 like: Any = None) -> PyTree:
  """Draws K parameter samples from the FOO-VB posterior held in ``opt_state``.

  The samples are exactly the points at which the next ``update`` expects its
  K gradients: the update regenerates the same noise from the same key. The
  state is not changed (call it again and you get the same samples).

  With Flax NNX, pass the optimizer itself and the model:
  ``foovb_sample(optimizer, K, like=model)`` (``optimizer = nnx.Optimizer(
  model, foovb(...), wrt=nnx.Param)``) returns ``nnx.state(model,
  nnx.Param)`` with a leading K axis on every ``Param``; gradients taken at
  ``nnx.merge(graphdef, sample, rest)`` then keep the ``Param`` type, as
  ``optimizer.update(model, grads)`` requires (see the README section "Use
  it with nnx.Optimizer").

  Args:
    opt_state: the state of :func:`foovb`, of a chain containing it, or an
      ``nnx.Optimizer`` holding one.
    num_samples: K, a Python int (the transform's ``num_samples`` for
      training; any K for prediction).
    like: optional: an ``nnx.Module`` (or a tree with as many leaves) whose
      structure and NNX Variable types the samples take (``nnx.state(like,
      optimizer.wrt)`` for a module).

  Returns:
    A tree like params whose leaves have a leading axis of size K, in the
    params' dtypes.

  Example:
    >>> tx = foovb(num_samples=4, init_std=0.1)
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> foovb_sample(state, 4)["w"].shape
    (4, 3)

  References:
    https://arxiv.org/abs/2010.00373
  """
  k = checks.check_int(num_samples, "num_samples", who="foovb_sample")
  samples = _sample_state(find_foovb_state(opt_state), k)
  if like is not None:
    samples = states.retype_like(samples, like, getattr(opt_state, "wrt", None))
  return samples


@functools.partial(jax.jit, static_argnums=1)
def _sample_state(state: FooVBState, num_samples: int) -> PyTree:
  # Jitted so that eager use compiles once per (tree structure, K) instead of
  # once per small op; under an outer jit it is simply inlined.
  noise_key = jax.random.split(state.key)[0]
  specs = jax.tree.map(lambda m: jax.P(None, *sharding.spec_of(m)), state.mean)
  return sharding.auto_sharded(
      lambda post, key: _draw(post, state.layout, key, num_samples),
      state.posterior, noise_key, out_specs=specs)


def foovb_set_mean(opt_state: PyTree, mean: PyTree) -> PyTree:
  """Returns ``opt_state`` with the FOO-VB posterior mean replaced by ``mean``.

  Use it after ``optax.apply_updates`` when a later transform in the chain
  changed the updates (a projection onto a sparsity mask, or an optimizer
  stepping the leaves outside ``mask``), so that the params you hold become
  the posterior mean: the next samples are drawn around them and the next
  update starts from them.

  Args:
    opt_state: the state of :func:`foovb`, or of a chain containing it.
    mean: a tree like params.

  Returns:
    The new optax state (same structure).

  Example:
    >>> tx = foovb(num_samples=2)
    >>> state = foovb_set_mean(tx.init({"w": jnp.zeros(2)}), {"w": jnp.ones(2)})
    >>> find_foovb_state(state).mean["w"]
    Array([1., 1.], dtype=float32)
  """
  state = find_foovb_state(opt_state)
  opt_state = states.unwrap(opt_state)
  old, treedef = trees.flatten(state.mean)
  old = [x for _, x in old]
  new_with_path, new_def = trees.flatten(mean)
  if new_def != treedef:
    raise ValueError(f"foovb_set_mean: mean must have the params' structure "
                     f"{treedef}, got {new_def}.")
  leaves = []
  for (path, x), o in zip(new_with_path, old):
    if trees.is_masked(o):
      leaves.append(o)
      continue
    if jnp.shape(x) != o.shape:
      raise ValueError(f"foovb_set_mean: {lo.path_string(path)} has shape "
                       f"{jnp.shape(x)}, the posterior mean has {o.shape}.")
    leaves.append(jnp.asarray(x, o.dtype))
  return _replace_state(opt_state,
                        state._replace(mean=treedef.unflatten(leaves)))


def foovb_std(opt_state: PyTree) -> PyTree:
  """Marginal posterior standard deviation of every parameter, like params.

  Diagonal leaves: their std. Kronecker groups: ``sqrt(diag(A A^T)_i
  diag(B B^T)_j)``. Full: ``sqrt(diag(L L^T))``. Fixed leaves: 0.

  Args:
    opt_state: the state of :func:`foovb`, or of a chain containing it.

  Returns:
    A tree like params.

  Example:
    >>> tx = foovb(init_std=0.03)
    >>> foovb_std(tx.init({"w": jnp.zeros(2)}))["w"]
    Array([0.03, 0.03], dtype=float32)
  """
  state = find_foovb_state(opt_state)
  layout = state.layout
  mean_leaves, treedef = jax.tree.flatten(state.mean, is_leaf=trees.is_masked)
  std_leaves = treedef.flatten_up_to(state.std)
  dtypes = _param_dtypes(layout, mean_leaves)
  out: list[Any] = [None] * len(mean_leaves)
  for i, kind in enumerate(layout.kinds):
    if kind == lo.ABSENT:
      out[i] = mean_leaves[i]
    elif kind == lo.FIXED:
      out[i] = jnp.zeros_like(mean_leaves[i], dtypes[i])
    elif kind == lo.DIAG:
      out[i] = std_leaves[i].astype(dtypes[i])
  for g in layout.groups:
    fac = state.kron[g.name]
    row = jnp.sum(fac.a * fac.a, axis=1)
    col = jnp.sum(fac.b * fac.b, axis=1)
    _scatter_group(out, jnp.sqrt(row[:, None] * col[None, :]), g, dtypes)
  if layout.full:
    _unravel_full(out, jnp.sqrt(jnp.sum(state.scale ** 2, axis=1)), layout,
                  dtypes)
  return treedef.unflatten(out)


def sharded_update(update: Any, updates: PyTree, state: Any, params: PyTree,
                   *extra: Any) -> tuple[PyTree, Any]:
  """``update(updates, state, params, *extra)`` with any Explicit mesh axes Auto.

  On an Explicit-axes mesh the group matrices (kernel + bias row, Conv
  kernels read as matrices, the full-covariance vector) cannot be typed, so
  the step runs with those axes Auto; the updates and the state keep the
  params' and the state's shardings.
  """
  like = state.mean if params is None else params
  specs = (jax.tree.map(sharding.spec_of, like),
           jax.tree.map(sharding.spec_of, state))
  return sharding.auto_sharded(lambda u, s, p: update(u, s, p, *extra),
                               updates, state, params, out_specs=specs)


def check_sample_grads(grads: PyTree, mean: PyTree, num_samples: Any, *,
                       who: str) -> list[Any]:
  """The flat K-sample gradients, checked against the posterior ``mean``.

  Every selected leaf must have shape ``(K, *param_shape)``; K is
  ``num_samples``, or read from the gradients when it is traced (injected).
  Errors name ``who`` and the leaf.
  """
  mean_leaves, treedef = jax.tree.flatten(mean, is_leaf=trees.is_masked)
  g_with_path, g_def = trees.flatten(grads)
  if not g_with_path and mean_leaves:
    raise ValueError(
        f"{who}: got no gradient leaves. With nnx.Optimizer(model, tx, "
        "wrt=nnx.Param) the gradients must keep the nnx.Param type or the "
        "wrt filter drops them: draw the samples with foovb_sample("
        "optimizer, K, like=model) and differentiate at those.")
  if g_def != treedef:   # names the first differing leaf
    trees.check_same_structure(
        mean, grads, who=who,
        what="the gradients (a tree like params with a leading sample axis)")
  k = num_samples
  if checks.is_traced(k):   # injected: the gradients say how many samples
    k = next((jnp.shape(g)[0] for (_, g), m in zip(g_with_path, mean_leaves)
              if not trees.is_masked(m) and jnp.ndim(g) == m.ndim + 1), None)
  out = []
  for (path, g), m in zip(g_with_path, mean_leaves):
    if trees.is_masked(m):
      out.append(g)
      continue
    want = (k,) + m.shape
    if jnp.shape(g) != want:
      hint = ""
      if jnp.shape(g) == m.shape:
        hint = (" They lack the leading sample axis: take the gradient at "
                "each of the K samples of foovb_sample(opt_state, K) (e.g. "
                f"jax.vmap(jax.grad(loss))(samples)). optax.MultiSteps and "
                f"optax.apply_if_finite cannot wrap {who}: they assume "
                "gradients shaped like the params.")
      elif jnp.ndim(g) == m.ndim + 1:
        hint = (f" The sample axis has size {jnp.shape(g)[0]}, but the "
                f"transform was built with num_samples={k}.")
      raise ValueError(
          f"{who}: gradient {lo.path_string(path)} has shape {jnp.shape(g)}, "
          f"expected (num_samples, *param_shape) = {want}.{hint}")
    out.append(jnp.asarray(g))
  return out


# ----------------------------------------------------------------------------
# One fixed-point step per posterior kind (arrays in, arrays out).


class _Hyper(NamedTuple):
  eta: float
  damping: float
  forgetting: float
  centered: bool


def _centre(g: jax.Array, hp: _Hyper) -> tuple[jax.Array, jax.Array]:
  """``(gbar, g')``: ``g'`` enters the covariance statistic (``geps``, ``E``).

  With ``hp.centered``, ``g'_k = (g_k - gbar) K / (K - 1)``: the statistic
  keeps its expectation (the curvature term ``H L``, exactly for a quadratic
  loss) but loses the zero-mean term ``gbar epsbar^T``, whose size grows with
  the gradient norm.
  """
  gbar = _sample_mean(g)
  if not hp.centered:
    return gbar, g
  k = g.shape[0]
  return gbar, (g - gbar) * (k / (k - 1))


def _is(value: Any, const: float) -> bool:
  """``value == const`` for a static hyperparameter (False when injected/traced)."""
  return not checks.is_traced(value) and value == const


def _relax(cur: jax.Array, new: jax.Array, weight: Any) -> jax.Array:
  return new if _is(weight, 1.0) else cur + weight * (new - cur)


def _diag_step(g: jax.Array, eps: jax.Array, mean: jax.Array, mean0: jax.Array,
               std: jax.Array, std0: jax.Array, init_var: float,
               hp: _Hyper) -> tuple[jax.Array, jax.Array]:
  """BGD step of one leaf; ``mean0, std0`` is the prior, ``mean, std`` the iterate."""
  gbar, g = _centre(g, hp)
  geps = _sample_mean(g * eps)
  new_mean = _relax(mean, mean0 - hp.eta * (std0 * std0) * gbar, hp.damping)
  new_std = fp.diagonal_std_update(std0, geps)
  if not _is(hp.damping, 1.0):
    new_std = fp.mix_std(std, new_std * new_std, hp.damping)
  if not _is(hp.forgetting, 0.0):
    new_std = fp.mix_std(new_std, init_var, hp.forgetting)
  return new_mean, new_std


def _kron_step(psi: jax.Array, phi: jax.Array, mean: jax.Array,
               mean0: jax.Array, fac: KronFactors, fac0: KronFactors,
               init_var: float, hp: _Hyper) -> tuple[jax.Array, KronFactors]:
  """Matrix-variate step of one group (``(K, rows, cols)`` gradients and noise)."""
  psi_bar, psi = _centre(psi, hp)
  _, e_a, e_b = kr.kron_statistics(psi, phi, fac.a, fac.b)
  new_mean = _relax(mean, kr.kron_mean_step(mean0, fac0.a, fac0.b, psi_bar,
                                            hp.eta), hp.damping)
  a = fp.fixed_point_factor(fac0.a, e_a)
  b = fp.fixed_point_factor(fac0.b, e_b)
  if not _is(hp.damping, 1.0):
    a = fp.mix_scale(fac.a, a @ a.T, hp.damping)
    b = fp.mix_scale(fac.b, b @ b.T, hp.damping)
  if not _is(hp.forgetting, 0.0):
    a = fp.mix_scale(a, init_var * jnp.eye(a.shape[0], dtype=a.dtype),
                     hp.forgetting)
    b = fp.mix_scale(b, init_var * jnp.eye(b.shape[0], dtype=b.dtype),
                     hp.forgetting)
  return new_mean, KronFactors(a=a, b=b)


def _full_step(g: jax.Array, eps: jax.Array, mean: jax.Array, mean0: jax.Array,
               scale: jax.Array, scale0: jax.Array, init_var: float,
               hp: _Hyper) -> tuple[jax.Array, jax.Array]:
  """Full-covariance step (``(K, D)`` gradients and noise)."""
  gbar, g = _centre(g, hp)
  e = g.T @ eps / g.shape[0]
  step = scale0 @ (scale0.T @ gbar)                 # V gbar, V not formed
  new_mean = _relax(mean, mean0 - hp.eta * step, hp.damping)
  new_scale = fp.fixed_point_factor(scale0, e)
  if not _is(hp.damping, 1.0):
    new_scale = fp.mix_scale(scale, new_scale @ new_scale.T, hp.damping)
  if not _is(hp.forgetting, 0.0):
    new_scale = fp.mix_scale(new_scale, init_var * jnp.eye(
        new_scale.shape[0], dtype=new_scale.dtype), hp.forgetting)
  return new_mean, new_scale


# ----------------------------------------------------------------------------
# The transformation.


def foovb(
    *,
    covariance: str = "diagonal",
    eta: float = 1.0,
    init_std: float = 0.05,
    num_samples: int = 10,
    key: int | ArrayLike = 0,
    loss: str = "sum",
    batch_size: int | None = None,
    mask: lo.Filter = None,
    kron_filter: lo.Filter = None,
    kron_init: str = "alpha_split",
    alpha: float = 0.5,
    damping: float = 1.0,
    fixed_point_iterations: int = 1,
    forgetting: float = 0.0,
    centered: bool | None = None,
    dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """FOO-VB: online variational Bayes with fixed-point updates, as an optax transform.

  Keeps a Gaussian posterior over the parameters and moves it with the
  closed-form fixed-point equations of Zeno et al. (2021) from K gradients taken
  at K posterior samples (:func:`foovb_sample`):

  * ``"diagonal"`` (= BGD): ``mu <- mu - eta sigma^2 gbar``; ``sigma <-
    sigma sqrt(1 + x^2) - sigma x``, ``x = sigma geps / 2``, with ``gbar =
    mean_k g_k``, ``geps = mean_k g_k eps_k`` (computed stably:
    :func:`~sparse_jax.bayes.fixed_point.diagonal_std_update`).
  * ``"kron"``: a matrix-variate Gaussian per Dense/Conv kernel, ``W = M + A
    Phi B^T`` in the Flax ``(in, out)`` layout (Conv ``(H, W, in, out)`` read as
    ``(H*W*in, out)``), the layer's sibling ``bias`` leaf joined as an extra
    input row; all other Bayesian leaves (norm scales, lone biases,
    embeddings) diagonal. Updates derived in :mod:`sparse_jax.bayes.kronecker`.
  * ``"full"``: one covariance ``L L^T`` over all Bayesian parameters
    flattened in tree order; ``mu <- mu - eta V gbar``, ``L <- X`` solving ``X
    X^T + V E X^T - V = 0`` in closed form
    (:func:`~sparse_jax.bayes.fixed_point.solve_fixed_point_factor`). Small models
    only (the exact reference for the others).

  ``update(grads, state, params)`` expects ``grads`` like params with a leading
  axis of size ``num_samples``: the gradients at the samples of
  :func:`foovb_sample`. It returns ``new_mean - params`` (see the module
  docstring for where the mean lives). Leaves outside ``mask`` are point
  estimates: never perturbed; their update is the mean of their K gradients
  (as given, not a step), for a later transform such as
  ``optax.masked(optax.adam(1e-3), not_mask)``, followed by
  :func:`foovb_set_mean`.

  Options the papers lack:

  * ``fixed_point_iterations=n``: each batch is meant to be fed n times in a
    row (each time with fresh samples from the current iterate); the prior of
    all n updates is the posterior at the start of the batch (held in
    ``state.anchor``), so the updates iterate the batch's fixed-point map
    towards its fixed point instead of taking one step.
  * ``damping=w`` in (0, 1]: relaxation of each fixed-point step, ``q <- (1 -
    w) q + w F(q)`` (mean; covariance mixed as covariances). Use ``w < 1``
    with several iterations when a batch carries much information (spectral
    radius of ``Sigma H_batch`` > 1 makes the single step unstable).
  * ``centered=True``: the covariance statistic ``E = mean_k g_k eps_k^T``
    is unbiased (expectation ``H L``, Stein's lemma), but with K samples it
    carries a zero-mean Monte-Carlo term ``gbar epsbar^T`` whose size grows
    with the gradient and falls like ``1/sqrt(K)``. The closed-form root
    never lets the covariance grow, so this noise only ever SHRINKS it --
    Monte-Carlo variance, not a wrong estimator. Centring, ``E = sum_k (g_k -
    gbar) eps_k^T / (K - 1)``, removes the term and keeps the expectation.
    Which one wins depends on K (10 permuted-digits tasks, Kronecker, the
    papers' init, no forgetting; final average accuracy, papers' vs centred):
    K = 10: 55.2% vs 87.0%; K = 30: 81.9% vs
    86.5%; K = 100: 89.8% vs 84.7%. At small K the extra
    shrinkage stalls learning after a few tasks; at large K it is small and
    protects old tasks (centred forgets more). Centred is the default for
    ``"kron"`` and ``"full"``: with the default K = 10 it is the best
    accuracy per second of compute (K = 100 took 6-9x the time). With a
    full covariance and the papers' statistic a 64-8-10 MLP stays at chance
    at K = 10. The diagonal (BGD) root grows sigma when ``geps < 0``, so there
    the noise is symmetric and the papers' estimator stays the default.
  * ``forgetting=g`` in [0, 1]: after each update the covariance is mixed
    with the initial one, ``Sigma <- (1 - g) Sigma + g Sigma_0`` (a diffusion
    that keeps long streams plastic; the variance otherwise only shrinks).

  Cost: the diagonal update regenerates the K noise arrays (as many Gaussian
  draws as ``foovb_sample``), which dominates it; in one jitted train step
  with ``foovb_sample`` XLA computes that noise once (the step costs the
  same with or without the sampling). ``"kron"`` and ``"full"``
  take the new square-root factor from one SVD per factor and step
  (:func:`~sparse_jax.bayes.fixed_point.fixed_point_factor`: the paper's
  covariance, a canonical factor). Measured on a 2-core CPU, 64-200-200-10
  MLP, K = 10: a Kronecker update takes ~23 ms, ~14 ms of it in the four
  ~200 x 200 SVDs (~3.5 ms each) and most of the rest in the statistics
  ``E_A, E_B`` (~0.8 GFLOP); an Adam update on the same params takes
  ~0.12 ms (``python -m benchmarks.foovb``). On CPU the SVD runs in LAPACK
  on scipy's OpenBLAS, whose worker threads would compete with XLA's;
  building a ``"kron"``/``"full"`` transform therefore pins that library to
  one thread (unless ``OPENBLAS_NUM_THREADS`` is set; only on the CPU
  backend), so no environment variable is needed. This also makes ``scipy.linalg`` calls in
  the same process single-threaded; restore them with ``threadpoolctl``.

  Args:
    covariance: ``"diagonal"``, ``"kron"`` or ``"full"``.
    eta: step size on the mean (1 in the papers; 1-10 for BGD).
    init_std: initial posterior std of every Bayesian parameter (diagonal
      leaves, "full", and Kronecker groups with ``kron_init="std"``, where ``A
      = B = sqrt(init_std) I``).
    num_samples: K, the number of Monte-Carlo samples per update.
    key: int seed or PRNG key of the sampling noise.
    loss: ``"sum"`` (default, as in the papers): grads are those of the
      SUMMED batch loss; ``"mean"``: grads of the batch-mean loss, multiplied
      by the batch size (``batch_size`` here, or ``update(...,
      batch_size=n)``, which wins).
    batch_size: the batch size for ``loss="mean"``.
    mask: which leaves are Bayesian, optax style (pytree of bools or callable
      params -> pytree); default all.
    kron_filter: with ``"kron"``: which leaves get Kronecker factors (default:
      leaves named ``kernel`` with >= 2 axes). A selected leaf that is not a
      matrix raises.
    kron_init: ``"alpha_split"`` (the paper: ``A = B = (2 (1 - alpha) /
      (fan_in + 2))^(1/4) I``; draw the mean with :func:`alpha_split_init`) or
      ``"std"``.
    alpha: the split of ``kron_init="alpha_split"``, in (0, 1).
    damping: fixed-point relaxation in (0, 1].
    fixed_point_iterations: updates per batch (see above), >= 1.
    forgetting: covariance diffusion towards the initial one, in [0, 1].
    centered: estimate the covariance statistic (``geps`` / ``E``) from the
      centred gradients ``(g_k - gbar) K / (K - 1)`` (same expectation; see
      "Options the papers lack"). Default (None): True for ``"kron"`` and
      ``"full"``, False (the papers' estimator) for ``"diagonal"``. Needs K >= 2.
    dtype: floating dtype of the covariance parameters and of their matrix
      solves (default: the params' dtype, at least float32); e.g.
      ``jnp.float64`` under ``jax.enable_x64`` like the reference
      implementation's solves.

  Precision: the posterior (mean and covariance) is kept in at least float32
  (bf16 or fp16 params would round the small mean steps ``eta sigma^2 gbar``
  away and fp16 has no matrix solves); samples and updates come back in the
  params' dtypes, so the model runs in bf16 and ``apply_updates`` keeps the
  params' dtype.

  Non-finite gradients: a step whose gradients hold a NaN or inf anywhere is
  SKIPPED: the updates are zero and the posterior (mean, std, factors),
  ``count`` and ``key`` stay as they were; ``state.skipped`` counts such steps.
  So sigma and the mean stay finite.

  Size limits: a Kronecker factor side is at most ``MAX_KRON_SIZE`` (8192) and
  a full covariance at most ``MAX_FULL_SIZE`` (16384) entries; larger ones
  raise at init naming the leaf.

  ``optax.MultiSteps`` and ``optax.apply_if_finite`` cannot wrap it: they
  assume gradients shaped like the params (FOO-VB takes K stacked ones); to
  accumulate, sum the micro-batch gradients of the summed loss yourself.

  Composes with ``jax.jit`` (params and state donated), ``vmap``/``scan``,
  ``optax.masked`` / ``multi_transform`` (other leaves untouched),
  ``optax.inject_hyperparams`` (``eta``, ``damping``, ``forgetting`` ...
  injectable; ``num_samples`` is read from the gradients), ``nnx.Optimizer``
  (``foovb_sample(optimizer, K)``), orbax and ``tree_map_params``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`FooVBState`.

  Example:
    >>> params = {"w": jnp.zeros(3)}
    >>> tx = foovb(num_samples=4, init_std=0.1)
    >>> state = tx.init(params)
    >>> loss = lambda p: jnp.sum((p["w"] - 1.0) ** 2)
    >>> samples = foovb_sample(state, 4)
    >>> grads = jax.vmap(jax.grad(loss))(samples)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> params["w"].shape
    (3,)

  References:
    Zeno et al., "Task Agnostic Continual Learning Using Online Variational
    Bayes with Fixed-Point Updates", https://arxiv.org/abs/2010.00373;
    Zeno et al., "Bayesian Gradient Descent", https://arxiv.org/abs/1803.10123
  """
  who = "foovb"
  checks.check_choice(covariance, "covariance", ("diagonal", "kron", "full"),
                      who=who)
  if covariance != "diagonal":
    lapack.single_thread_lapack()
  eta = _positive_float(eta, "eta", allow_zero=True)
  init_std = _positive_float(init_std, "init_std")
  num_samples = checks.check_int(num_samples, "num_samples", who=who,
                                 traced_ok=True)
  checks.check_choice(loss, "loss", ("sum", "mean"), who=who)
  batch_size = checks.check_int(batch_size, "batch_size", who=who,
                                allow_none=True, traced_ok=True)
  checks.check_choice(kron_init, "kron_init", ("alpha_split", "std"), who=who)
  alpha = checks.check_float(alpha, "alpha", who=who, minimum=0.0,
                             maximum=1.0, min_open=True, max_open=True,
                             traced_ok=True)
  damping = _positive_float(damping, "damping", maximum=1.0)
  fixed_point_iterations = checks.check_int(
      fixed_point_iterations, "fixed_point_iterations", who=who,
      traced_ok=True)
  forgetting = _positive_float(forgetting, "forgetting", allow_zero=True,
                               maximum=1.0)
  if not checks.is_traced(key):   # checked now; an injected one at init
    keys.as_key(key, who=who)
  dtype = checks.check_float_dtype(dtype, "dtype", who=who, allow_none=True)
  init_var = init_std ** 2
  centered = checks.check_bool(centered, "centered", who=who, allow_none=True)
  if centered is None:
    centered = covariance in ("kron", "full")
  if centered and checks.is_static_int(num_samples) and num_samples < 2:
    raise ValueError("foovb: centered=True estimates the covariance statistic "
                     "from the spread of the K gradients: it needs num_samples "
                     f">= 2, got num_samples={num_samples}.")
  hp = _Hyper(eta=eta, damping=damping, forgetting=forgetting, centered=centered)

  def group_scale(g: lo.KronGroup) -> Any:
    if kron_init == "alpha_split":
      return kr.alpha_split_scale(g.fan_in, alpha)
    return init_std ** 0.5

  def forget_var(g: lo.KronGroup) -> Any:
    return 0.0 if _is(forgetting, 0.0) else group_scale(g) ** 2

  def mean_dtype(x_dtype: Any) -> Any:
    return jnp.promote_types(x_dtype, jnp.float32)

  def cov_dtype(x_dtype: Any) -> Any:
    return dtype if dtype is not None else mean_dtype(x_dtype)

  def init_fn(params: PyTree) -> FooVBState:
    if trees.is_params_placeholder(params):   # optax.tree_map_params
      return FooVBState(count=jnp.zeros((), jnp.int32),
                        key=keys.key_data(key, who=who),
                        mean=params, std=params, kron=_NOT_PARAMS,
                        scale=_NOT_PARAMS,
                        anchor=(None if _is(fixed_point_iterations, 1)
                                else _NOT_PARAMS),
                        layout=_NOT_PARAMS, skipped=jnp.zeros((), jnp.int32))
    layout = lo.build_layout(params, covariance, mask=mask,
                             kron_filter=kron_filter)
    leaves, treedef = jax.tree.flatten(params, is_leaf=trees.is_masked)
    std, mean = [], []
    for i, x in enumerate(leaves):
      if layout.kinds[i] == lo.ABSENT:
        std.append(None)
        mean.append(x)
        continue
      x = jnp.asarray(x)
      # A copy in the posterior's dtype: never the params' own buffers, so
      # a step may donate both params and state.
      mean.append(jnp.array(x, mean_dtype(x.dtype), copy=True))
      if layout.kinds[i] == lo.DIAG:
        std.append(jnp.full_like(x, init_std, cov_dtype(x.dtype)))
      else:
        std.append(None)
    kron = {}
    for g in layout.groups:
      if max(g.rows, g.cols) > MAX_KRON_SIZE:
        raise ValueError(
            f"foovb(covariance='kron'): {g.name} needs Kronecker factors of "
            f"{g.rows} x {g.rows} and {g.cols} x {g.cols} (limit "
            f"MAX_KRON_SIZE={MAX_KRON_SIZE} per side: each costs an SVD per "
            "step). Leave it out with kron_filter (it then gets a diagonal "
            "posterior) or use covariance='diagonal'.")
      d = cov_dtype(jnp.asarray(leaves[g.kernel]).dtype)
      c = group_scale(g)
      kron[g.name] = KronFactors(a=c * jnp.eye(g.rows, dtype=d),
                                 b=c * jnp.eye(g.cols, dtype=d))
    scale = None
    if layout.full:
      size = layout.full_size
      if size > MAX_FULL_SIZE:
        raise ValueError(
            f"foovb(covariance='full'): the Bayesian params have {size} entries; "
            f"a full covariance needs a {size} x {size} factor and its SVD per "
            f"step (limit {MAX_FULL_SIZE}). Use 'kron' or 'diagonal', or "
            f"restrict mask.")
      d = cov_dtype(jnp.result_type(*[leaves[i] for i in layout.full]))
      scale = init_std * jnp.eye(size, dtype=d)
    post = FooVBPosterior(mean=treedef.unflatten(mean),
                          std=treedef.unflatten(std), kron=kron, scale=scale)
    anchor = None
    if fixed_point_iterations > 1:   # its own buffers (donation)
      anchor = jax.tree.map(lambda x: jnp.array(x, copy=True), post)
    return FooVBState(count=jnp.zeros((), jnp.int32),
                      key=keys.key_data(key, who=who),
                      mean=post.mean, std=post.std, kron=kron, scale=scale,
                      anchor=anchor, layout=layout,
                      skipped=jnp.zeros((), jnp.int32))

  def update_fn(updates: PyTree, state: FooVBState, params: PyTree = None,
                *, batch_size: int | None = batch_size,
                **extra_args: Any) -> tuple[PyTree, FooVBState]:
    del extra_args
    return sharded_update(_update, updates, state, params, batch_size)

  def _update(updates: PyTree, state: FooVBState, params: PyTree,
              batch_size: Any) -> tuple[PyTree, FooVBState]:
    layout = state.layout
    grads = check_sample_grads(updates, state.mean, num_samples, who=who)
    k = next((g.shape[0] for g, kind in zip(grads, layout.kinds)
              if kind != lo.ABSENT), 1)
    if loss == "mean":
      if batch_size is None:
        raise ValueError(
            "foovb(loss='mean') needs the batch size to turn mean-loss "
            "gradients into summed-loss ones: pass foovb(batch_size=...) or "
            "tx.update(..., batch_size=n).")
      gscale = batch_size
    else:
      gscale = None
    noise_key, next_key = jax.random.split(state.key)
    cur = state.posterior
    prior = state.anchor if state.anchor is not None else cur
    cur_mean, treedef = jax.tree.flatten(cur.mean, is_leaf=trees.is_masked)
    prior_mean = trees.leaves(prior.mean)
    cur_std = treedef.flatten_up_to(cur.std)
    prior_std = treedef.flatten_up_to(prior.std)
    dtypes = _param_dtypes(layout, cur_mean)
    mdtypes = [getattr(m, "dtype", None) for m in cur_mean]
    new_mean = list(cur_mean)
    new_std = list(cur_std)
    out: list[Any] = [None] * len(cur_mean)

    def scaled(g: jax.Array, d: Any) -> jax.Array:
      g = g.astype(d)
      return g * gscale if gscale is not None else g

    for i, kind in enumerate(layout.kinds):
      if kind == lo.ABSENT:
        out[i] = grads[i]
      elif kind == lo.FIXED:
        out[i] = _sample_mean(grads[i]).astype(dtypes[i])
      elif kind == lo.DIAG:
        d = cur_std[i].dtype
        eps = _normal(noise_key, layout.noise_index(i), k, cur_std[i].shape,
                      d)
        m_new, new_std[i] = _diag_step(
            scaled(grads[i], d), eps, cur_mean[i].astype(d),
            prior_mean[i].astype(d), cur_std[i], prior_std[i], init_var, hp)
        new_mean[i] = m_new.astype(mdtypes[i])

    new_kron = {}
    for g in layout.groups:
      fac = cur.kron[g.name]
      d = fac.a.dtype
      phi = _normal(noise_key, layout.noise_index(g.kernel), k,
                    (g.rows, g.cols), d)
      m_new, new_kron[g.name] = _kron_step(
          scaled(_group_matrix(grads, g, d, (k,)), d), phi,
          _group_matrix(cur_mean, g, d), _group_matrix(prior_mean, g, d),
          fac, prior.kron[g.name], forget_var(g), hp)
      _scatter_group(new_mean, m_new, g, mdtypes)

    new_scale = cur.scale
    if layout.full:
      d = cur.scale.dtype
      gmat = scaled(_ravel_full(grads, layout, d, (k,)), d)  # (K, D)
      eps = _normal(noise_key, layout.noise_index(len(cur_mean)), k,
                    (gmat.shape[1],), d)
      m_new, new_scale = _full_step(
          gmat, eps, _ravel_full(cur_mean, layout, d),
          _ravel_full(prior_mean, layout, d), cur.scale, prior.scale, init_var,
          hp)
      _unravel_full(new_mean, m_new, layout, mdtypes)

    if params is None:
      base = cur_mean
    else:
      base, p_def = jax.tree.flatten(params, is_leaf=trees.is_masked)
      if p_def != treedef:
        trees.check_same_structure(state.mean, params, who="foovb",
                                   what="the params")
    for i, kind in enumerate(layout.kinds):
      if kind not in (lo.FIXED, lo.ABSENT):
        step = new_mean[i] - jnp.asarray(base[i]).astype(mdtypes[i])
        out[i] = step.astype(dtypes[i])

    post = FooVBPosterior(mean=treedef.unflatten(new_mean),
                          std=treedef.unflatten(new_std), kron=new_kron,
                          scale=new_scale)
    count = state.count + 1
    anchor = None
    if state.anchor is not None:
      done = (count % fixed_point_iterations) == 0
      anchor = jax.tree.map(lambda n, o: jnp.where(done, n, o), post,
                            state.anchor)
    # Non-finite gradients: the step is skipped (zero updates; posterior,
    # anchor, count and key as they were) and counted.
    finite = numerics.all_finite(
        [g for g, kind in zip(grads, layout.kinds) if kind != lo.ABSENT])
    out = [o if kind == lo.ABSENT else jnp.where(finite, o, jnp.zeros((), o.dtype))
           for o, kind in zip(out, layout.kinds)]
    kept = numerics.where_finite(
        finite, (count, next_key, post, anchor),
        (state.count, state.key, cur, state.anchor))
    (count, next_key, post, anchor) = kept
    new_state = FooVBState(count=count, key=next_key, mean=post.mean,
                           std=post.std, kron=post.kron, scale=post.scale,
                           anchor=anchor, layout=layout,
                           skipped=state.skipped + (~finite).astype(jnp.int32))
    return treedef.unflatten(out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def alpha_split_init(params: PyTree, key: int | ArrayLike, *, alpha: float = 0.5,
                     mask: lo.Filter = None,
                     kron_filter: lo.Filter = None) -> PyTree:
  """Redraws the Kronecker groups' kernels and biases as in the paper's init.

  Each entry of a group (kernel and joined bias) becomes ``N(0, 2 alpha /
  (fan_in + 2))``; together with ``foovb(covariance="kron",
  kron_init="alpha_split", alpha=alpha)`` (posterior variance ``2 (1 - alpha) /
  (fan_in + 2)``) the prior variance of a weight is ``2 / (fan_in + 2)``. Other
  leaves are returned unchanged. Call it before ``tx.init``.

  Args:
    params: the params tree.
    key: int seed or PRNG key.
    alpha: the split, in (0, 1).
    mask: as in :func:`foovb`.
    kron_filter: as in :func:`foovb`.

  Returns:
    A new params tree.

  Example:
    >>> p = alpha_split_init({"d": {"kernel": jnp.zeros((98, 50)), "bias": jnp.zeros(50)}}, 0)
    >>> round(float(p["d"]["kernel"].std()), 2)
    0.1

  References:
    https://arxiv.org/abs/2010.00373 (experiments: initialisation)
  """
  alpha = float(alpha)
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"alpha_split_init: alpha must be in (0, 1), got {alpha}.")
  layout = lo.build_layout(params, "kron", mask=mask, kron_filter=kron_filter)
  leaves, treedef = jax.tree.flatten(params, is_leaf=trees.is_masked)
  leaves = [x if trees.is_masked(x) else jnp.asarray(x) for x in leaves]
  key = keys.as_key(key, who="alpha_split_init")
  dtypes = list(layout.dtypes)
  for g in layout.groups:
    std = math.sqrt(2.0 * alpha / (g.fan_in + 2.0))
    mat = std * jax.random.normal(jax.random.fold_in(key, g.kernel),
                                  (g.rows, g.cols), jnp.float32)
    _scatter_group(leaves, mat, g, dtypes)
  return treedef.unflatten(leaves)
