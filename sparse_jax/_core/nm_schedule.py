"""The score-parameterised N:M mask schedule behind every mask transform.

``nm_projection`` (score ``|w|``), ``sr_ste`` (score ``|w|``, decay instead of
projection) and ``foovb_nm_projection`` (score ``|mean| / std``) are thin
choices over :class:`MaskSchedule`: the same options, defaults, validation,
leaf selection, schedule (dense warm-up, every-k recomputation, fixed masks,
masks from init) and diagnostics, and one state type, :class:`NMMaskState`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import optax

from sparse_jax._core import checks
from sparse_jax._core import sharding
from sparse_jax._core import trees
from sparse_jax.masks import nm_mask, transposable_nm_mask_tree
from sparse_jax.masks.transposable import METHODS, OBJECTIVES

PyTree = Any
AxisSpec = Any   # int | pytree of ints | callable params -> pytree of ints
MaskSpec = Any   # None | pytree of bools (or prefix) | callable



@dataclasses.dataclass(frozen=True)
class Static:
  """Static (leafless, hashable) values kept in a state: ``(m, axis)``.

  ``optax.inject_hyperparams`` hands the factory every numeric argument as a
  (traced) array; the group size ``m`` and an int ``axis`` fix array shapes,
  so the update reads the values the state was initialised with from here.
  """
  value: Any


jax.tree_util.register_static(Static)


class NMMaskState(NamedTuple):
  """State of the N:M mask transforms (``nm_projection``, ``sr_ste``).

  Attributes:
    count: number of updates seen (int32).
    masks: bool masks with the params' structure (``optax.MaskedNode()`` on
      leaves that are not pruned); all True before the first mask update
      unless computed at init.
    kept_mass: per pruned leaf, the fraction of ``sum |w|`` the mask kept when
      it was last computed (float32 scalar; 0 with ``diagnostics=False``).
    flip_rate: per pruned leaf, the fraction of mask entries that changed at
      the last mask update (float32 scalar; 0 with ``diagnostics=False``).
    group: the static ``(m, axis)`` (no array leaves).
  """
  count: jax.Array
  masks: PyTree
  kept_mass: PyTree
  flip_rate: PyTree
  group: Static = Static(None)


class PrunedLeaf(NamedTuple):
  """A leaf chosen for pruning: its index in flatten order, path and axis."""
  index: int
  path: str
  axis: int


# ------------------------------------------------------------- selection --


def _resolve_axes(axis: AxisSpec, params: PyTree, who: str) -> tuple[list, bool]:
  """Per-leaf axes in flatten order, and whether they were one plain int."""
  n = len(trees.leaves(params))
  if checks.is_static_int(axis):
    return [int(axis)] * n, True
  spec = axis(params) if callable(axis) else axis
  return trees.broadcast(spec, params, who=who, name="axis"), False


def axis_by_path(rules: Mapping[str, int], *,
                 default: int = -2) -> Callable[[PyTree], PyTree]:
  """Per-leaf N:M axes chosen by regular expressions on the leaf path.

  Args:
    rules: ``{regex: axis}``; the first regex that ``re.search``-es the leaf's
      path name (``jax.tree_util.keystr`` without the trailing ``.value`` of
      NNX variables, e.g. ``"['attn']['query']['kernel']"``) gives its axis.
    default: axis of leaves no rule matches.

  Returns:
    A callable ``params -> pytree of ints`` for the ``axis`` argument of the
    sparsity transforms.

  Example:
    >>> import jax.numpy as jnp
    >>> from sparse_jax.sparsity import axis_by_path
    >>> params = {"query": {"kernel": jnp.ones((8, 2, 4))},
    ...           "mlp": {"kernel": jnp.ones((8, 8))}}
    >>> axis_by_path({r"query|key|value": 0})(params)
    {'mlp': {'kernel': -2}, 'query': {'kernel': 0}}

  References:
    Mishra et al., https://arxiv.org/abs/2104.08378 (groups along the GEMM
    reduction axis).
  """
  compiled = [(re.compile(k), int(v)) for k, v in rules.items()]

  def fn(params):
    def pick(path, _):
      s = trees.path_str(path)
      for rx, ax in compiled:
        if rx.search(s):
          return ax
      return default
    return jax.tree_util.tree_map_with_path(pick, params)

  return fn


def default_filter(m: int, *, axis: AxisSpec = -2, transposable: bool = False,
                   kernel_names: Sequence[str] = ("kernel",),
                   exclude: str | Sequence[str] = ()) -> Callable[[PyTree],
                                                                  PyTree]:
  """The default choice of pruned leaves: divisible kernels, nothing else.

  A leaf is pruned iff it is named like a kernel (``kernel_names``; unnamed
  leaves, e.g. a bare array, count as kernels), has ``ndim >= 2``, no regex in
  ``exclude`` matches its path, and its size along the N:M axis is divisible by
  ``m`` (both of the last two sizes when ``transposable``). So biases, norm
  scales, embeddings (``"embedding"``), position tables and a first Conv with 3
  input channels stay dense.

  A 3-D kernel is ambiguous -- Conv1D ``(W, in, out)`` wants axis -2, a
  ``DenseGeneral`` ``(in, heads, head_dim)`` wants axis 0 -- so when ``axis`` is
  one plain int, a 3-D kernel raises a ValueError naming it: give its axis with
  :func:`axis_by_path` or leave it out with ``exclude``.

  Args:
    m: group size.
    axis: the N:M axis: an int, a pytree of ints or a callable (see module).
    transposable: select for transposable masks (last two axes tiled).
    kernel_names: leaf names treated as kernels.
    exclude: regex (or regexes) of leaf path names (``keystr`` without
      ``.value``) to keep dense, e.g. the first and last layers.

  Returns:
    A callable ``params -> pytree of bools``.

  Example:
    >>> import jax.numpy as jnp
    >>> from sparse_jax.sparsity import default_filter
    >>> params = {"conv0": {"kernel": jnp.ones((3, 3, 3, 16))},  # 3 inputs
    ...           "dense": {"kernel": jnp.ones((16, 8)), "bias": jnp.ones(8)}}
    >>> default_filter(4)(params)
    {'conv0': {'kernel': False}, 'dense': {'bias': False, 'kernel': True}}

  References:
    Hubara et al., NeurIPS 2021, https://arxiv.org/abs/2102.08124.
  """
  m = checks.check_m(m, who="default_filter")
  excludes = [exclude] if isinstance(exclude, str) else list(exclude)
  excludes = [re.compile(e) for e in excludes]
  names = tuple(kernel_names)

  def fn(params):
    flat, treedef = trees.flatten(params)
    axes, plain = _resolve_axes(axis, params, "default_filter")
    out = []
    for (path, leaf), ax in zip(flat, axes):
      if trees.is_masked(leaf):
        out.append(leaf)
        continue
      name = trees.leaf_name(path)
      where = trees.path_str(path)
      ndim = len(getattr(leaf, "shape", ()))
      if (ndim < 2 or (name is not None and name not in names)
          or any(e.search(where) for e in excludes)):
        out.append(False)
        continue
      if ndim == 3 and plain:
        raise ValueError(
            f"The 3-D kernel at {trees.path_str(path)} (shape "
            f"{tuple(leaf.shape)}) is ambiguous: a Conv1D (W, in, out) groups "
            "along axis -2, a DenseGeneral (in, heads, head_dim) along axis 0. "
            "Give its axis explicitly, e.g. axis=axis_by_path({r'query|key|"
            "value': 0}), or exclude it.")
      shape = leaf.shape
      if transposable:
        ok = shape[-1] % m == 0 and shape[-2] % m == 0
      else:
        ax = checks.normalize_axis(ax, ndim,
                                   name=f"axis of {trees.path_str(path)}")
        ok = shape[ax] % m == 0
      out.append(ok)
    return jax.tree_util.tree_unflatten(treedef, out)

  return fn


def resolve(params: PyTree, m: int, *, mask: MaskSpec, axis: AxisSpec,
            transposable: bool, who: str) -> list[PrunedLeaf]:
  """Validates the selection and returns the pruned leaves (trace time).

  ``MaskedNode`` leaves (from ``optax.masked`` & co.) are never pruned.
  Raises a ValueError naming the leaf path and shape when a selected leaf has
  ``ndim < 2``, an invalid axis, or a size not divisible by ``m``.
  """
  if params is None:
    raise ValueError(f"{who} needs the params (pass params=... to update).")
  default = default_filter(m, axis=axis, transposable=transposable)
  chosen = trees.select(mask, params, who=who, name="mask", default=default)
  flat, _ = trees.flatten(params)
  axes, _ = _resolve_axes(axis, params, who)
  out = []
  for i, ((path, leaf), sel, ax) in enumerate(zip(flat, chosen, axes)):
    if not sel:
      continue
    where = trees.path_str(path)
    shape = tuple(getattr(leaf, "shape", ()))
    if len(shape) < 2:
      raise ValueError(f"{who}: the leaf at {where} has shape {shape}; N:M "
                       "masks need a kernel with ndim >= 2 (leave it out of "
                       "the mask).")
    ax = checks.normalize_axis(ax, len(shape), name=f"{who}: axis of {where}")
    if transposable:
      if ax != len(shape) - 2:
        raise ValueError(
            f"{who}: transposable masks tile the last two axes (in, out), but "
            f"the leaf at {where} (shape {shape}) has axis {ax}.")
      if shape[-1] % m or shape[-2] % m:
        raise ValueError(
            f"{who}: the leaf at {where} has shape {shape}; transposable "
            f"masks need both of the last two sizes divisible by m={m}.")
    elif shape[ax] % m:
      raise ValueError(
          f"{who}: the leaf at {where} has shape {shape}, whose size "
          f"{shape[ax]} along axis {ax} is not divisible by m={m}. Leave it "
          "out with the mask/filter argument or choose another axis.")
    out.append(PrunedLeaf(i, where, ax))
  present = [(trees.path_str(path), tuple(getattr(leaf, "shape", ())))
             for path, leaf in flat if not trees.is_masked(leaf)]
  if not out and present:
    seen = ", ".join(f"{p} {s}" for p, s in present[:6])
    more = f" and {len(present) - 6} more" if len(present) > 6 else ""
    hint = ("pass mask=... (a pytree of bools, a prefix or a callable) to "
            "choose the leaves" if mask is not None else
            "the default filter prunes leaves named 'kernel' with ndim >= 2 "
            f"whose N:M axis is divisible by m={m}: for other names (e.g. "
            "Haiku's 'w') pass mask=... or default_filter(m, kernel_names="
            "('w',)), and check axis=")
    raise ValueError(f"{who}: no leaf is selected for N:M pruning, so it "
                     f"would do nothing (leaves seen: {seen}{more}); {hint}.")
  return out


# ------------------------------------------------------------ diagnostics --


def _finite_abs(w: jax.Array) -> jax.Array:
  a = jnp.abs(w.astype(jnp.float32))
  return jnp.where(jnp.isfinite(a), a, 0.0)  # NaN / inf weigh nothing


def _ratio(kept, total):
  return jnp.where(total > 0, kept / jnp.where(total > 0, total, 1.0), 1.0)


def kept_mass(w: jax.Array, mask: jax.Array) -> jax.Array:
  """Fraction of ``sum |w|`` on the kept entries (1 for an all-zero ``w``).

  Non-finite entries count as zero magnitude (the masks rank them last).
  """
  a = _finite_abs(w)
  return _ratio(jnp.where(mask, a, 0.0).sum(), a.sum())


def flip_rate(old: jax.Array, new: jax.Array) -> jax.Array:
  """Fraction of entries whose mask changed."""
  return jnp.mean((old != new).astype(jnp.float32))


def _zero() -> jax.Array:
  return jnp.zeros((), jnp.float32)


# --------------------------------------------------------------- schedule --


def check_nm_options(n: Any, m: Any, *, transposable: bool, method: str,
                     objective: str, who: str) -> tuple[Any, Any]:
  """Validates ``n``, ``m``, ``method`` and ``objective``.

  ``n``: a Python int, or -- for plain N:M only -- a schedule (a callable
  ``count -> n``) or an integer scalar array (e.g. injected by
  ``optax.inject_hyperparams``). ``m``: a Python int, or a traced integer
  (injected; the state then supplies the static value).
  """
  checks.check_bool(transposable, "transposable", who=who)
  if checks.is_traced(m):
    checks.check_int(m, "m", who=who, traced_ok=True)
  else:
    m = checks.check_m(m, who=who)
  if checks.is_static_int(n) and not checks.is_traced(m):
    n, m = checks.check_nm(n, m, who=who)
  elif checks.is_static_int(n):
    n = checks.check_int(n, "n", who=who)
  elif transposable:
    raise ValueError(f"{who}: transposable masks need n as a Python int (no "
                     f"schedule or traced n), got {n!r}; with "
                     "optax.inject_hyperparams pass static_args=('n',).")
  elif not callable(n):
    n = checks.check_traced_n(n, who=who)
  checks.check_choice(method, "method", METHODS, who=who)
  checks.check_choice(objective, "objective", OBJECTIVES, who=who)
  return n, m


@dataclasses.dataclass(frozen=True)
class MaskSchedule:
  """When and how the N:M masks of a transform are (re)computed.

  Build it with :func:`make_schedule` (which validates). ``update_every``:
  recompute every this many steps from ``start_step`` (None: once, then
  fixed); ``start_step``: dense warm-up before it; ``init_masks``: masks
  computed by ``init`` and used from step 0; ``end_step``: from this step on
  the transform is inactive (masks held, nothing projected or decayed: dense
  fine-tuning), None: never.
  """
  n: Any
  m: Any
  transposable: bool
  axis: AxisSpec
  update_every: Any
  start_step: Any
  init_masks: bool
  method: str
  objective: str
  mask: MaskSpec
  diagnostics: bool
  who: str
  end_step: Any = None

  # -- static facts
  @property
  def always(self) -> bool:
    """True when every step recomputes and projects (no cond, no warm-up)."""
    return (not self.init_masks and self.update_every is not None
            and checks.is_static_int(self.update_every)
            and checks.is_static_int(self.start_step)
            and int(self.update_every) == 1 and int(self.start_step) == 0
            and self.end_step is None)

  def structure(self, state: NMMaskState | None = None) -> tuple[int, Any]:
    """``(m, axis)``: static, from the state when injected (traced) here."""
    if not (checks.is_traced(self.m) or checks.is_traced(self.axis)):
      return self.m, self.axis
    if state is None or state.group.value is None:
      raise ValueError(
          f"{self.who}: m and axis fix the shapes of the masks, so they "
          "cannot be traced values here; with optax.inject_hyperparams pass "
          "static_args=('m', 'axis') or call init eagerly.")
    return state.group.value

  def group_size(self, state: NMMaskState | None = None) -> int:
    return self.structure(state)[0]

  def with_structure(self, state: NMMaskState | None) -> "MaskSchedule":
    """This schedule with ``m`` and ``axis`` made static (see :class:`Static`)."""
    m, axis = self.structure(state)
    if m is self.m and axis is self.axis:
      return self
    return dataclasses.replace(self, m=m, axis=axis)

  def n_at(self, count: jax.Array) -> Any:
    return self.n(count) if callable(self.n) else self.n

  def select(self, params: PyTree, m: int) -> list[PrunedLeaf]:
    return resolve(params, m, mask=self.mask, axis=self.axis,
                   transposable=self.transposable, who=self.who)

  def compute(self, scores: list[jax.Array], pruned: list[PrunedLeaf],
              count: jax.Array, m: int) -> list[jax.Array]:
    """Masks of the pruned arrays (one batched solve when transposable)."""
    if not scores:
      return []
    n = self.n_at(count)
    if self.transposable:
      return list(transposable_nm_mask_tree(
          list(scores), n, m, method=self.method, objective=self.objective))
    return [nm_mask(s, n, m, axis=p.axis) for s, p in zip(scores, pruned)]

  def phase(self, count: jax.Array) -> tuple[Any, Any]:
    """``(active, recompute)`` at ``count``: Python True when static."""
    if self.always:
      return True, True
    if self.init_masks:   # masks from init are used from step 0
      active = True if self.end_step is None else count < self.end_step
      recompute = False if self.update_every is None else (
          active & (count > 0) & (count % self.update_every == 0))
      return active, recompute
    active = count >= self.start_step
    if self.end_step is not None:
      active = active & (count < self.end_step)
    recompute = (count == self.start_step) if self.update_every is None else (
        active & ((count - self.start_step) % self.update_every == 0))
    return active, recompute

  def oneshot(self, params: PyTree) -> tuple[list[PrunedLeaf], list, list]:
    """``(pruned, arrays, masks)``: masks of the params now (no state).

    The arrays are the pruned params; the masks are computed from their
    values with ``stop_gradient`` (a mask is never differentiated).
    """
    m = self.group_size()
    pruned = self.select(params, m)
    arrays = trees.gather(params, [p.index for p in pruned])
    scores = [lax.stop_gradient(a) for a in arrays]
    return pruned, arrays, self.compute(scores, pruned,
                                        jnp.zeros([], jnp.int32), m)

  # -- state
  def init(self, params: PyTree, *, values: list[jax.Array] | None = None,
           scores: list[jax.Array] | None = None,
           compute: bool | None = None) -> tuple[list[PrunedLeaf], NMMaskState]:
    """The pruned leaves and the initial state.

    ``values`` (default: the pruned params) are what the diagnostics measure,
    ``scores`` (default: ``values``) what the masks rank. The initial masks
    are computed when ``compute`` (default: ``init_masks``), else all True.
    """
    m = self.group_size()
    pruned = self.select(params, m)
    if values is None:
      values = trees.gather(params, [p.index for p in pruned])
    compute = self.init_masks if compute is None else compute
    count = jnp.zeros([], jnp.int32)
    if compute:
      masks = self.compute(values if scores is None else scores, pruned,
                           count, m)
    else:
      masks = [jnp.ones_like(a, dtype=bool) for a in values]
    kept = [kept_mass(a, mk) if self.diagnostics else _zero()
            for a, mk in zip(values, masks)]
    return pruned, self._state(params, pruned, count, masks, kept,
                               [_zero() for _ in values], m)

  def _state(self, params, pruned, count, masks, kept, flips, m):
    idx = [p.index for p in pruned]
    return NMMaskState(count=count,
                       masks=trees.scatter(params, idx, masks),
                       kept_mass=trees.scatter(params, idx, kept),
                       flip_rate=trees.scatter(params, idx, flips),
                       group=Static((m, self.axis if checks.is_static_int(
                           self.axis) else None)))

  def update(self, state: NMMaskState, params: PyTree,
             values: list[jax.Array], pruned: list[PrunedLeaf], *,
             scores: Callable[[], list[jax.Array]] | None = None,
             ) -> tuple[Any, list[jax.Array], NMMaskState]:
    """``(active, masks, new_state)`` after a step whose new weights are ``values``.

    ``scores`` (default: ``values``) is called only when the masks are
    recomputed, inside the branch that recomputes them.
    """
    trees.check_same_structure(state.masks, params, who=self.who,
                               what="the params")
    m = self.group_size(state)
    count = state.count
    idx = [p.index for p in pruned]
    old_masks = trees.gather(state.masks, idx)
    old_kept = trees.gather(state.kept_mass, idx)
    old_flip = trees.gather(state.flip_rate, idx)
    active, recompute = self.phase(count)

    def held(xs):  # state values, typed like fresh ones (shard_map)
      return [sharding.match_vma(x, w) for x, w in zip(xs, values)]

    def fresh(_):
      masks = self.compute(values if scores is None else scores(), pruned,
                           count, m)
      if not self.diagnostics:
        return masks, held(old_kept), held(old_flip)
      kept = [kept_mass(w, mk) for w, mk in zip(values, masks)]
      flips = [flip_rate(o, mk) for o, mk in zip(old_masks, masks)]
      return masks, kept, flips

    def keep(_):
      return held(old_masks), held(old_kept), held(old_flip)

    if recompute is True:
      masks, kept, flips = fresh(None)
    elif recompute is False:
      masks, kept, flips = keep(None)
    else:
      masks, kept, flips = lax.cond(recompute, fresh, keep, None)
    new_state = self._state(params, pruned, optax.safe_increment(count),
                            masks, kept, flips, m)
    return active, masks, new_state


def make_schedule(n: Any, m: Any, *, who: str, transposable: bool = False,
                  axis: AxisSpec = -2, update_every: Any = 1,
                  start_step: Any = 0, init_masks: bool = False,
                  method: str = "exact", objective: str = "l1",
                  mask: MaskSpec = None,
                  diagnostics: bool = True,
                  end_step: Any = None) -> MaskSchedule:
  """A validated :class:`MaskSchedule` (errors name ``who`` and the option)."""
  n, m = check_nm_options(n, m, transposable=transposable, method=method,
                          objective=objective, who=who)
  if checks.is_static_int(axis):
    axis = int(axis)   # hashable: it is kept in the state (Static)
  update_every = checks.check_int(update_every, "update_every", who=who,
                                  allow_none=True, traced_ok=True)
  start_step = checks.check_int(start_step, "start_step", who=who, minimum=0,
                                traced_ok=True)
  end_step = checks.check_int(end_step, "end_step", who=who, minimum=1,
                              allow_none=True, traced_ok=True)
  if (end_step is not None and checks.is_static_int(end_step)
      and checks.is_static_int(start_step) and end_step <= start_step):
    raise ValueError(f"{who}: end_step={end_step} must be after "
                     f"start_step={start_step} (the transform would never act).")
  init_masks = checks.check_bool(init_masks, "init_masks", who=who)
  diagnostics = checks.check_bool(diagnostics, "diagnostics", who=who)
  if init_masks and (checks.is_traced(start_step) or start_step):
    raise ValueError(f"{who}: init_masks=True projects from step 0, so "
                     f"start_step must be 0 (got {start_step}).")
  if callable(n) and update_every is None:
    raise ValueError(f"{who}: a schedule for n needs masks that are "
                     "recomputed (update_every=None keeps them fixed).")
  return MaskSchedule(n=n, m=m, transposable=transposable, axis=axis,
                      update_every=update_every, start_step=start_step,
                      init_masks=init_masks, method=method,
                      objective=objective, mask=mask, diagnostics=diagnostics,
                      who=who, end_step=end_step)


def project(p_list: list[jax.Array], u_list: list[jax.Array],
            values: list[jax.Array], masks: list[jax.Array],
            active: Any) -> list[jax.Array]:
  """``P(values) - params`` where active, the incoming updates elsewhere."""
  out = []
  for p, u, w, mk in zip(p_list, u_list, values, masks):
    # In the wider of the two dtypes, so that apply_updates gives exact
    # zeros: p + (0 - p) == 0 (also for bf16 params and f32 updates).
    projected = jnp.where(mk, w, jnp.zeros((), w.dtype)) - p.astype(w.dtype)
    out.append(projected if active is True else
               jnp.where(active, projected, u.astype(projected.dtype)))
  return out
