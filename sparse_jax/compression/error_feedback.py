"""Error feedback for compressed gradients (EF, EF21, DGC) as an optax transform.

Worker ``i`` of ``n`` holds its gradient ``g_i`` and a compressor ``C``. Let
``lr`` be the ``learning_rate`` argument (``1`` when it is ``None``, see
"Where the learning rate sits" below). Per step:

* ``"ef"`` (EF14, memory): ``p_i = e_i + lr g_i``; ``c_i = C(p_i)``;
  ``e_i <- p_i - c_i``; the step is ``mean_i c_i``. Nothing is lost: what was
  not sent is still in ``e_i``.
* ``"none"``: ``c_i = C(lr g_i)``; no memory (the baseline that needs EF).
* ``"ef21"``: each worker keeps ``h_i``, the server (every device) keeps
  ``h = mean_i h_i``: ``c_i = C(lr g_i - h_i)``; ``h_i <- h_i + c_i``;
  ``h <- h + mean_i c_i``; the step is ``h``.
* ``"dgc"`` (Deep Gradient Compression): momentum correction
  ``u_i <- momentum u_i + lr g_i``; ``v_i <- v_i + u_i``; ``c_i = C(v_i)``;
  ``v_i <- v_i - c_i``; momentum factor masking ``u_i <- 0`` where ``c_i`` is
  non-zero; the step is ``mean_i c_i``. Leaves excluded by ``mask`` get plain
  momentum on the averaged gradient. Local gradient clipping (``clip_norm``)
  and a sparsity warm-up (``warmup_compressors``) are options of every variant.

Where the learning rate sits:

* ``learning_rate=None`` (default): the memories hold GRADIENTS and the
  transform outputs ``+mean_i c_i`` (a compressed gradient estimate). Chain an
  optimizer after it, e.g. ``optax.chain(error_feedback(...),
  optax.sgd(lr))``. With a constant ``lr`` and plain SGD this is exactly EF14
  with ``e`` scaled by ``1/lr``; with a schedule, the residual sent at step
  ``t`` is scaled by ``lr_t`` rather than by the step size it was accumulated
  with.
* ``learning_rate=lr`` (float or ``optax`` schedule of the step count): ``lr_t``
  multiplies the gradient BEFORE it enters any memory (``p = e + lr_t g``, as
  in EF14), so the memories hold parameter displacements, and the output is
  the ready-to-apply update ``-mean_i c_i``: use it as the whole optimizer,
  ``optax.apply_updates(params, updates)``, like ``optax.sgd(lr)``.

Data parallel (``axis_name``): inside ``jax.shard_map`` over a mesh axis, each
device keeps its own memories (the :class:`WorkerLocal` part of the state);
the compressed ``(values, indices)`` are all-gathered and scatter-ADDED, so the
output is the mean over workers of their compressed tensors, identical on
every device (and typed invariant, so ``check_vma=True`` accepts it as a
replicated output). Leaves excluded by ``mask`` are averaged with a dense
all-reduce. :func:`~sparse_jax.compression.make_data_parallel_step` lays out
the state for this.

The state also reports, for logging: ``local.error_ratio``, the norm of what
this worker did NOT send this step over the norm of what came in
(``||e_i|| / ||lr g_i||`` for EF; it grows without bound when the residual
blows up, e.g. 99.9% sparsity at a large learning rate; both norms are taken
of the vectors divided by ``max |g_i|``, so gradients of 1e30 or 1e-30 give
the right ratio, not inf/NaN or 0), and ``wire``, the bytes per device of this
step's exchange and of a dense ring all-reduce
(:mod:`sparse_jax.compression.wire`).

Non-finite gradients: a worker whose gradient holds a NaN or inf anywhere
(in a compressed or a dense leaf) SKIPS the step: it sends nothing (zeros),
its memories and momentum stay exactly as they were, ``local.skipped`` counts
the step and ``local.error_ratio`` is NaN. The other workers' messages are
still averaged (over all n workers); for EF21 the step is the server estimate
``h``, which a step with no messages leaves unchanged. So a NaN never enters a
residual, and the next finite step continues from the memories as they were.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from sparse_jax._core import checks
from sparse_jax._core import keys
from sparse_jax._core import numerics
from sparse_jax._core import sharding
from sparse_jax._core import trees
from sparse_jax.compression import exchange
from sparse_jax.compression import wire
from sparse_jax.compression.compressors import Compressor

VARIANTS = ("ef", "ef21", "dgc", "none")
"""The feedback variants :func:`error_feedback` accepts (``variant=``)."""
_MASKED = optax.MaskedNode()


class WorkerLocal(NamedTuple):
  """The per-worker part of the state: each device holds its own.

  Attributes:
    memory: ``"ef"``: the residual ``e_i``; ``"dgc"``: the accumulated
      ``v_i``; ``"ef21"``: the worker's estimate ``h_i``; ``"none"``: empty.
      Leaves excluded by the mask hold an ``optax.MaskedNode``.
    momentum: ``"dgc"``: the corrected momentum ``u_i``; otherwise empty.
    error_ratio: float32 scalar, ``||not sent|| / ||incoming||`` this step
      (computed scale-safely; NaN on a skipped step).
    skipped: int32 number of steps this worker skipped because its gradient
      held a NaN or inf (see "Non-finite gradients" in the module docstring).
  """
  memory: Any
  momentum: Any
  error_ratio: jax.Array
  skipped: Any = None


class ErrorFeedbackState(NamedTuple):
  """State of :func:`error_feedback`.

  Attributes:
    count: int32 number of updates so far.
    key: uint32 PRNG key data (random compressors), folded with the step,
      the leaf and the worker index.
    server: ``"ef21"``: the server estimate ``h = mean_i h_i`` (same on every
      device); otherwise empty.
    dense_momentum: ``"dgc"``: momentum of the leaves excluded by the mask
      (averaged, same on every device); otherwise empty.
    wire: :class:`~sparse_jax.compression.wire.WireBytes` of the last step,
      float32 bytes per device.
    local: the :class:`WorkerLocal` per-worker part.
  """
  count: jax.Array
  key: jax.Array
  server: Any
  dense_momentum: Any
  wire: wire.WireBytes
  local: WorkerLocal


def leaf_kinds(mask: Any, tree: Any, who: str) -> tuple[list[bool], list[bool]]:
  """``(compressed, absent)`` per leaf (flatten order of ``_core.trees``).

  ``mask`` is an optax-style mask (pytree of bools, a prefix of one, or a
  callable); ``absent`` marks ``optax.MaskedNode`` leaves (handed to another
  transform by ``optax.masked`` & co.), which are neither compressed nor
  exchanged.
  """
  absent = [trees.is_masked(x) for x in trees.leaves(tree)]
  return trees.select(mask, tree, who=who, name="mask"), absent


def _check_leaf(path, leaf, compressors: Sequence[Compressor], who: str):
  where = trees.path_str(path)
  shape, dtype = jnp.shape(leaf), jnp.result_type(leaf)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{who}: parameter {where} has dtype {dtype}; only "
                     "floating-point leaves can be compressed (exclude it with "
                     "`mask`)")
  if 0 in shape:
    raise ValueError(f"{who}: parameter {where} is empty (shape {shape}); "
                     "exclude it with `mask`")
  for comp in compressors:
    try:
      jax.eval_shape(comp.compress, jax.ShapeDtypeStruct(shape, dtype),
                     jax.ShapeDtypeStruct((2,), jnp.uint32))
    except ValueError as e:
      raise ValueError(f"{who}: cannot compress parameter {where} of shape "
                       f"{shape} with {comp.name}: {e}") from None


def _unsent_sq_norm(comp: Compressor, p: jax.Array, c, inv_scale) -> jax.Array:
  """``||(p - decompress(c)) * inv_scale||^2`` without the dense difference.

  ``||p||^2`` minus, at the sent positions, ``p_i^2 - (p_i - v_i)^2`` (a
  gather of the few sent entries instead of one more pass over ``p``).
  Accurate to float32 rounding of ``||p||^2``; clipped at 0.
  """
  p32 = p.astype(jnp.float32) * inv_scale
  values = c.values.astype(jnp.float32) * inv_scale
  if c.indices.shape[-1] == 0:    # dense form
    return jnp.sum(jnp.square(p32 - values.reshape(p.shape)))
  index = comp.flat_indices(c.indices, p.shape)
  at = p32.reshape(-1).at[index].get(mode="fill", fill_value=0)
  sent = jnp.sum(jnp.square(at) - jnp.square(at - values))
  # (The where() keeps XLA:CPU from turning this reduction into a library
  # call that makes it copy p before the in-place residual scatter; a
  # non-finite entry makes the norm inf, as it should.)
  total = jnp.sum(jnp.where(jnp.isfinite(p32), jnp.square(p32), jnp.inf))
  return jnp.maximum(total - sent, 0.0)


def _global_norm(leaves, inv_scale=1.0) -> jax.Array:
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32) * inv_scale))
                      for x in leaves))


def _check_per_worker(updates, axis_name, who: str) -> None:
  """Raises when the gradients are the same on every worker (no varying type).

  In ``shard_map``, the gradient of REPLICATED (invariant) params is summed
  over the devices by JAX's autodiff, a dense all-reduce, before error
  feedback sees it; compressing that sum is the opposite of what was asked.
  """
  if not sharding.varying_checked(axis_name):
    return
  for path, g in trees.flatten(updates)[0]:
    if trees.is_masked(g):
      continue
    if sharding.is_varying(g, axis_name) is False:
      raise ValueError(
          f"{who}: the gradient {trees.path_str(path)} is the same on every "
          f"device of {axis_name!r} (not device-varying): JAX has already "
          "all-reduced it densely, because the params entered shard_map "
          "replicated. Mark them per-device before taking the gradient:\n"
          f"  params = jax.tree.map(lambda p: jax.lax.pcast(p, {axis_name!r}, "
          "to='varying'), params)\n"
          "  grads = jax.grad(loss)(params, batch)\n"
          "  updates, state = tx.update(grads, state, params)\n"
          "(or use make_data_parallel_step, which lays out the per-worker "
          "state).")


def error_feedback(
    compressor: Compressor,
    *,
    variant: str = "ef",
    learning_rate: optax.ScalarOrSchedule | None = None,
    axis_name: Any = None,
    mask: Any = None,
    momentum: float | None = None,
    clip_norm: float | None = None,
    warmup_compressors: Sequence[Compressor] = (),
    warmup_steps: int = 0,
    key: Any = None,
    seed: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Compresses the gradients with error feedback (EF / EF21 / DGC / none).

  See the module docstring for the exact update of each variant and for
  where the learning rate sits.

  Args:
    compressor: a :class:`~sparse_jax.compression.Compressor`, e.g.
      ``top_k(0.001)``.
    variant: ``"ef"`` (EF14 memory), ``"ef21"``, ``"dgc"`` or ``"none"``.
    learning_rate: ``None`` (memories hold gradients; output ``+mean c``, chain
      an optimizer after it) or a float/schedule (multiplies the gradient
      before it enters the memories; output ``-mean c``, ready to apply).
    axis_name: the ``jax.shard_map`` mesh axis of the workers (e.g.
      ``"data"``); ``None`` for a single worker. The update then has to run
      where the axis is bound.
    mask: which leaves are compressed, in the optax way: a pytree of bools
      matching the params (or a prefix of it, e.g. ``{"body": True, "head":
      False}``), or a callable ``params -> such a pytree``. Other leaves are
      sent dense (averaged with an all-reduce). ``None``: all. Leaves that
      ``optax.masked`` / ``multi_transform`` hand to another transform
      (``optax.MaskedNode``) are left alone.
    momentum: DGC momentum (default 0.9); only for ``variant="dgc"``.
    clip_norm: if set, each worker clips its own gradient to this global norm
      before anything else (DGC's local clipping: pass the global threshold
      times ``n ** -0.5``).
    warmup_compressors: sparsity warm-up: the compressors used, one after the
      other, for ``warmup_steps`` steps each before ``compressor`` (DGC:
      ``[top_k(0.25), top_k(0.0625), top_k(0.015625), top_k(0.004)]``).
    warmup_steps: steps per warm-up compressor.
    key: an int seed or a PRNG key for random compressors (default 0).
    seed: deprecated name of ``key``.

  Composes with ``jax.jit`` (donated params and state), ``vmap``/``scan``,
  ``optax.masked`` / ``multi_transform`` / ``partition``,
  ``optax.MultiSteps``, ``optax.inject_hyperparams`` (``learning_rate``,
  ``momentum``, ``clip_norm`` injectable; a compressor's ``fraction`` fixes
  the compressed shapes, so it is not), ``nnx.Optimizer`` and orbax; inside
  ``jax.shard_map`` with ``axis_name``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`ErrorFeedbackState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from sparse_jax.compression import top_k, error_feedback
    >>> tx = error_feedback(top_k(0.5), learning_rate=0.1)
    >>> params = {"w": jnp.array([1.0, -2.0, 3.0, 0.5])}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.array([1.0, 4.0, -3.0, 0.1])},
    ...                            state, params)
    >>> [round(u, 4) for u in updates["w"].tolist()]   # -top_k(0.1 g)
    [0.0, -0.4, 0.3, 0.0]
    >>> [round(e, 4) for e in state.local.memory["w"].tolist()]  # residual
    [0.1, 0.0, 0.0, 0.01]

  References:
    Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS 2018,
    https://arxiv.org/abs/1809.07599;
    Richtarik, Sokolov, Fatkhullin, "EF21: A New, Simpler, Theoretically
    Better, and Practically Faster Error Feedback", NeurIPS 2021,
    https://arxiv.org/abs/2106.05203;
    Lin et al., "Deep Gradient Compression", ICLR 2018,
    https://arxiv.org/abs/1712.01887;
    Alistarh et al., "The Convergence of Sparsified Gradient Methods",
    NeurIPS 2018, https://arxiv.org/abs/1809.10505
  """
  who = f"error_feedback(variant={variant!r})"
  if not isinstance(compressor, Compressor):
    raise ValueError(f"error_feedback: compressor must be a Compressor (e.g. "
                     f"sparse_jax.compression.top_k(0.01)), got {compressor!r}")
  checks.check_choice(variant, "variant", VARIANTS, who="error_feedback")
  if momentum is not None and variant != "dgc":
    raise ValueError(f"{who}: momentum is only used by variant='dgc'")
  momentum = 0.9 if momentum is None else momentum
  momentum = checks.check_float(momentum, "momentum", who=who, minimum=0.0,
                                maximum=1.0, max_open=True, traced_ok=True)
  clip_norm = checks.check_float(clip_norm, "clip_norm", who=who, minimum=0.0,
                                 min_open=True, allow_none=True,
                                 traced_ok=True)
  if learning_rate is not None and not callable(learning_rate):
    learning_rate = checks.check_float(
        learning_rate, "learning_rate (None, a number > 0 or a schedule)",
        who=who, minimum=0.0, min_open=True, traced_ok=True)
  warmup_compressors = tuple(warmup_compressors)
  for comp in warmup_compressors:
    if not isinstance(comp, Compressor):
      raise ValueError(f"{who}: warmup_compressors must be Compressors, got "
                       f"{comp!r}")
  warmup_steps = checks.check_int(warmup_steps, "warmup_steps", who=who,
                                  minimum=0, traced_ok=True)
  if not checks.is_traced(warmup_steps) and (
      bool(warmup_compressors) != bool(warmup_steps)):
    raise ValueError(f"{who}: give both warmup_compressors and warmup_steps "
                     f"> 0 (or neither), got {len(warmup_compressors)} "
                     f"compressors and warmup_steps={warmup_steps}")
  levels = warmup_compressors + (compressor,)
  key = keys.seed_or_key(key, seed, who="error_feedback")
  if not checks.is_traced(key):   # checked now; an injected one at init
    keys.as_key(key, who="error_feedback")

  def zeros_where(flags, absent, leaves, want: bool, treedef):
    return jax.tree.unflatten(treedef, [
        # Memories accumulate many small steps: at least float32 (a bf16
        # residual would round them away).
        jnp.zeros_like(x, jnp.promote_types(x.dtype, jnp.float32))
        if flag == want and not gone else _MASKED
        for x, flag, gone in zip(leaves, flags, absent)])

  def zero():   # one buffer per field: a state may be donated
    return jnp.zeros((), jnp.float32)

  def init_fn(params):
    flat, treedef = trees.flatten(params)
    flags, absent = leaf_kinds(mask, params, who)
    leaves = [x for _, x in flat]
    for (path, leaf), flag in zip(flat, flags):
      if flag:
        _check_leaf(path, leaf, levels, who)
    compressed = functools.partial(zeros_where, flags, absent, leaves, True,
                                   treedef)
    empty = lambda: jax.tree.unflatten(treedef, [_MASKED] * len(leaves))
    return ErrorFeedbackState(
        count=jnp.zeros((), jnp.int32),
        key=keys.key_data(key, who="error_feedback"),
        server=compressed() if variant == "ef21" else empty(),
        dense_momentum=(zeros_where(flags, absent, leaves, False, treedef)
                        if variant == "dgc" else empty()),
        wire=wire.WireBytes(zero(), zero(), zero()),
        local=WorkerLocal(
            memory=compressed() if variant != "none" else empty(),
            momentum=compressed() if variant == "dgc" else empty(),
            error_ratio=zero(), skipped=jnp.zeros((), jnp.int32)))

  def wire_table(leaves, flags, n):
    """Static bytes per device, one row per compressor level."""
    present = [(x, f) for x, f in zip(leaves, flags)
               if not trees.is_masked(x)]   # MaskedNode leaves send nothing
    dense = sum(wire.ring_all_reduce_bytes(x.size * x.dtype.itemsize, n)
                for x, _ in present)
    dense_sent = sum(wire.ring_all_reduce_bytes(x.size * x.dtype.itemsize, n)
                     for x, f in present if not f)
    rows = []
    for comp in levels:
      sent = dense_sent + sum(
          wire.all_gather_bytes(comp.wire_bytes(x.shape, x.dtype), n)
          for x, f in present if f)
      rows.append((sent, sent, dense))
    return jnp.asarray(rows, jnp.float32)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    # Selection (top-k, thresholds) and scatters have no sharding rule on an
    # Explicit-axes mesh: run with those axes Auto, keep the shardings.
    return sharding.auto_sharded(
        _update, updates, state,
        out_specs=(jax.tree.map(sharding.spec_of, updates),
                   jax.tree.map(sharding.spec_of, state)))

  def _update(updates, state):
    trees.check_same_structure(state.local.memory, updates, who=who,
                               what="the updates")
    n = 1 if axis_name is None else exchange.bound_axis_size(axis_name, who)
    if axis_name is not None:
      _check_per_worker(updates, axis_name, who)
    flat, treedef = trees.flatten(updates)
    grads = [g for _, g in flat]
    flags, absent = leaf_kinds(mask, updates, who)
    stream = trees.present_index(grads)   # same draws as on a subtree
    count = state.count
    if learning_rate is None:
      lr = 1.0
    elif callable(learning_rate):
      lr = learning_rate(count)
    else:
      lr = learning_rate
    # One pass for max |g|: non-finite anywhere -> this worker skips the step
    # (zeros in, nothing sent, local state kept); finite -> the scale that
    # keeps the norms below from overflowing or underflowing.
    present = [g for g, gone in zip(grads, absent) if not gone]
    gmax = numerics.max_abs(present)
    finite = jnp.isfinite(gmax)
    grads = [g if gone else jnp.where(finite, g, jnp.zeros((), g.dtype))
             for g, gone in zip(grads, absent)]
    gmax = jnp.where(finite, gmax, 0.0)
    if clip_norm is not None:
      inv = 1.0 / jnp.where(gmax > 0, gmax, 1.0)
      norm = gmax * _global_norm(
          [g for g, gone in zip(grads, absent) if not gone], inv)
      scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-30))
      grads = [g if gone else g * scale.astype(g.dtype)
               for g, gone in zip(grads, absent)]
      gmax = gmax * scale
    inv_scale = 1.0 / jnp.where(gmax > 0, gmax, 1.0)
    incoming = [g if gone else g * jnp.asarray(lr, g.dtype)
                for g, gone in zip(grads, absent)]

    memory = treedef.flatten_up_to(state.local.memory)
    mom = treedef.flatten_up_to(state.local.momentum)
    server = treedef.flatten_up_to(state.server)
    dense_mom = treedef.flatten_up_to(state.dense_momentum)
    idx = [i for i, f in enumerate(flags) if f]

    # What each worker compresses.
    new_mom = list(mom)
    to_send = {}
    for i in idx:
      if variant == "ef":
        # Materialised once (the barrier keeps XLA from recomputing e + lr g
        # inside every consumer): the selection and the norms read p, and
        # the residual scatter then updates it in place (in the donated
        # memory buffer when the state is donated).
        to_send[i] = jax.lax.optimization_barrier(memory[i] + incoming[i])
      elif variant == "none":
        to_send[i] = incoming[i]
      elif variant == "ef21":
        to_send[i] = incoming[i] - memory[i]
      else:  # dgc
        new_mom[i] = jnp.asarray(momentum, mom[i].dtype) * mom[i] + incoming[i]
        to_send[i] = memory[i] + new_mom[i]

    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), count)
    if axis_name is not None:
      key = jax.random.fold_in(key, exchange.worker_index(axis_name))

    sign = -1.0 if learning_rate is not None else 1.0

    def compress_and_exchange(comp: Compressor):
      """Per compressed leaf: the new memory, the step, the new momentum."""
      kept_back, step_part, new_mom_part, unsent_sq = [], [], [], []
      for i in idx:
        p = to_send[i]
        c = comp.compress(p, jax.random.fold_in(key, stream[i]))
        c = c._replace(values=jnp.where(finite, c.values,
                                        jnp.zeros((), c.values.dtype)))
        if variant in ("ef", "dgc"):
          # The residual p - c_i, updated in place; its norm is read from it
          # after the scatter (a sum over p before the scatter would make
          # XLA:CPU copy p first).
          residual = comp.add_to(p, c, -1.0)
          kept_back.append(residual)
          unsent_sq.append(jnp.sum(jnp.square(
              residual.astype(jnp.float32) * inv_scale)))
        else:
          kept_back.append(comp.add_to(memory[i], c) if variant == "ef21"
                           else None)
          unsent_sq.append(_unsent_sq_norm(comp, p, c, inv_scale))
        if variant == "ef21":
          # h_i <- h_i + c_i; h <- h + mean_i c_i (the step is h).
          base = server[i]
        else:
          base = jnp.zeros(p.shape, p.dtype)  # not zeros_like: p varies
        # The output sign is folded into the scatter (no extra dense pass),
        # except for EF21 whose server estimate h is stored as is.
        scale = 1.0 if variant == "ef21" else sign
        if axis_name is None:
          step_part.append(comp.add_to(base, c, scale))
        else:
          gathered = exchange.all_gather(c, axis_name)
          step_part.append(comp.add_to(base, gathered, scale / n))
        if variant == "dgc":
          new_mom_part.append(comp.zero_where_sent(new_mom[i], c))
      return (kept_back, step_part, new_mom_part,
              sum(unsent_sq, jnp.zeros((), jnp.float32)))

    if len(levels) == 1:
      level = jnp.zeros((), jnp.int32)
      kept_back, step_part, new_mom_part, unsent_sq = compress_and_exchange(
          compressor)
    else:
      level = jnp.minimum(count // warmup_steps, len(levels) - 1)
      kept_back, step_part, new_mom_part, unsent_sq = jax.lax.switch(
          level, [functools.partial(compress_and_exchange, c) for c in levels])

    out = [None] * len(grads)
    new_memory, new_server, new_dense_mom = (list(memory), list(server),
                                             list(dense_mom))
    for j, i in enumerate(idx):
      if variant == "ef21":
        new_memory[i] = kept_back[j]
        new_server[i] = step_part[j]
      elif variant != "none":
        new_memory[i] = kept_back[j]
      if variant == "dgc":
        new_mom[i] = new_mom_part[j]
      out[i] = sign * step_part[j] if variant == "ef21" else step_part[j]
    for i, f in enumerate(flags):
      if f:
        continue
      if absent[i]:
        out[i] = grads[i]
        continue
      x = incoming[i]
      if axis_name is not None:
        x = exchange.dense_mean(x, axis_name)
      if variant == "dgc":
        x = jnp.asarray(momentum, x.dtype) * dense_mom[i] + x
        new_dense_mom[i] = x
      out[i] = sign * x

    if variant == "dgc":  # a skipped step leaves the worker's state as it was
      # (EF and EF21 memories are unchanged already: zero in, zero sent.)
      hold = lambda new, old: [n if trees.is_masked(o) else
                               jnp.where(finite, n, o) for n, o in zip(new, old)]
      new_memory, new_mom = hold(new_memory, memory), hold(new_mom, mom)
    # The state keeps its dtypes (a scan carry), whatever the gradients'.
    keep = lambda new, old: [n if trees.is_masked(o) or n is o
                             else n.astype(o.dtype) for n, o in zip(new, old)]
    new_memory, new_server = keep(new_memory, memory), keep(new_server, server)
    new_mom, new_dense_mom = keep(new_mom, mom), keep(new_dense_mom, dense_mom)

    # ||lr g||, as |lr| ||g||: reads the gradient itself (no dense lr * g is
    # kept around just for this norm).
    # Both norms of the vectors divided by max |g|, so the ratio is right for
    # gradients of any scale.
    in_norm = jnp.abs(jnp.asarray(lr, jnp.float32)) * _global_norm(
        [grads[i] for i in idx], inv_scale)
    ratio = jnp.sqrt(unsent_sq) / jnp.where(in_norm > 0, in_norm, 1.0)
    ratio = jnp.where(in_norm > 0, ratio, 0.0)
    ratio = jnp.where(finite, ratio, jnp.nan)
    wire_row = wire_table(grads, flags, n)[level]
    unflat = functools.partial(jax.tree.unflatten, treedef)
    new_state = ErrorFeedbackState(
        count=optax.safe_int32_increment(count),
        key=state.key,
        server=unflat(new_server),
        dense_momentum=unflat(new_dense_mom),
        wire=wire.WireBytes(*wire_row),
        local=WorkerLocal(memory=unflat(new_memory), momentum=unflat(new_mom),
                          error_ratio=ratio.astype(jnp.float32),
                          skipped=state.local.skipped
                          + (~finite).astype(jnp.int32)))
    return unflat(out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
