"""Error feedback for compressed gradients (EF, EF21, EControl, DGC) as an optax transform.

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
* ``"econtrol"`` (EControl, Gao, Islamov, Stich, Algorithm 1): each worker
  keeps an error ``e_i`` and an estimate ``h_i``, the server keeps
  ``h = mean_i h_i``: ``c_i = C(eta e_i + lr g_i - h_i)``;
  ``e_i <- e_i + lr g_i - h_i - c_i``; ``h_i <- h_i + c_i``;
  ``h <- h + mean_i c_i``; the step is ``h`` (the paper's ``h_t + Delta_t``).
  ``eta`` in ``[0, 1]`` is the feedback strength (default
  :data:`ECONTROL_ETA` = 0.01): only a fraction of the error is fed back each
  step; too large an ``eta`` for the compression (``eta >> k/d``) diverges.
  Nothing is lost, as for EF: ``e_i + h_i`` grows by exactly ``lr g_i`` each
  step, so with plain SGD
  ``n (x_0 - x_T) + sum_i e_i = lr sum_t sum_i g_i,t``. The memories start
  at 0 (the paper starts ``h_i`` at the first gradient, one dense message).
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
device keeps its own memories (the :class:`WorkerLocal` part of the state) and
the output is the mean over workers of their compressed tensors, identical on
every device (and typed invariant, so ``check_vma=True`` accepts it as a
replicated output). How the messages travel is chosen per leaf by bytes
(``collective="auto"``; :func:`~sparse_jax.compression.exchange_plan` tells
which): sparse ``(values, indices)`` are all-gathered and scatter-ADDED;
dense low-precision messages (``fp_quantize``, ``fp4``, ``lognormal_fp``) go
by reduce-scatter: device ``j`` receives chunk ``j`` of every worker's
message, sums them exactly, re-encodes the mean chunk in the same format and
all-gathers it (8-bit: 1/4 of an fp32 ring all-reduce). The re-encoding has
its own error feedback (the server side of bidirectional compression): device
``j`` keeps what it dropped in ``local.server_error`` and adds it to its next
mean chunk, so for EF nothing is lost either:
``n (x_0 - x_T) + sum_i e_i + n s = lr sum_t sum_i g_i,t`` with ``s`` the
devices' server errors summed. (Putting that error into a worker's own memory
instead, times ``n``, diverged with FP4.) Where neither saves
bytes (e.g. N:M 2:4 at 8 workers) each worker decompresses and the result is
all-reduced densely. Leaves excluded by ``mask`` are averaged with a dense
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
still averaged (over all n workers); for EF21 and EControl the step is the server estimate
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

VARIANTS = ("ef", "ef21", "econtrol", "dgc", "none")
"""The feedback variants :func:`error_feedback` accepts (``variant=``)."""
ECONTROL_ETA = 0.01
"""EControl's default feedback strength ``eta`` (see :func:`error_feedback`).

Chosen from measurements (docs/RESULTS.md, compress_digits): with top-0.1%
and top-1% on 8 workers, eta = 0.1 diverged (NaN) whenever the workers' data
were heterogeneous (Dirichlet 0.1) and at top-0.1% even on i.i.d. data,
while eta = 0.01 trained to 92-98%; the theory asks for eta of the order of
the compressor's contraction delta (k/d for top-k)."""
_MASKED = optax.MaskedNode()


class WorkerLocal(NamedTuple):
  """The per-worker part of the state: each device holds its own.

  Attributes:
    memory: ``"ef"``: the residual ``e_i``; ``"dgc"``: the accumulated
      ``v_i``; ``"ef21"``: the worker's estimate ``h_i``; ``"econtrol"``: the
      error ``e_i``; ``"none"``: empty.
      Leaves excluded by the mask hold an ``optax.MaskedNode``.
    momentum: ``"dgc"``: the corrected momentum ``u_i``; otherwise empty.
    error_ratio: float32 scalar, ``||not sent|| / ||incoming||`` this step
      (computed scale-safely; NaN on a skipped step).
    skipped: int32 number of steps this worker skipped because its gradient
      held a NaN or inf (see "Non-finite gradients" in the module docstring).
    estimate: ``"econtrol"``: the worker's gradient estimate ``h_i`` (its
      ``memory`` is the error ``e_i``); otherwise empty.
    exponent_bits: low-precision formats (``Compressor.format_of``): per
      compressed leaf, the float32 exponent width of the last message's
      format (mean over chunks; what ``lognormal_fp`` chose); otherwise
      empty.
    server_error: fixed-layout (low-precision) compressors under
      ``collective="auto"``/``"reduce_scatter"``: per compressed leaf, this
      device's error-feedback memory of the re-encoding of the mean chunk it
      owns (shaped like the leaf; only its chunk is non-zero); otherwise
      empty.
  """
  memory: Any
  momentum: Any
  error_ratio: jax.Array
  skipped: Any = None
  estimate: Any = None
  exponent_bits: Any = None
  server_error: Any = None


_AUX_FIELDS = ("momentum", "estimate")


class _Rule(NamedTuple):
  """One feedback variant: what a worker sends and what it keeps.

  ``send(g, memory, aux, opts) -> (p, aux)``: the tensor to compress (``g`` is
  ``lr`` times the gradient) and what ``keep`` needs of the second memory
  (DGC's new momentum; EControl's ``h``). ``keep(comp, p, c, memory, aux,
  opts) -> (memory, aux, residual)``: the memories after sending ``c =
  C(p)``, and ``p - c`` when the rule computes it (``None`` otherwise).
  ``server``: the step is the
  server estimate ``h <- h + mean_i c_i``. ``aux``: the ``WorkerLocal`` field
  of the second memory. ``hold``: the memories must be restored explicitly
  on a skipped step (a zero gradient still moves them).
  """
  send: Any
  keep: Any
  server: bool = False
  aux: str | None = None
  hold: bool = False


def _residual_rule(comp, p, c, memory, aux, opts):
  del memory, opts
  residual = comp.add_to(p, c, -1.0)     # in place, in p's buffer
  return residual, aux, residual


def _dgc_send(g, memory, u, opts):
  u = jnp.asarray(opts["momentum"], u.dtype) * u + g    # momentum correction
  return memory + u, u


def _dgc_keep(comp, p, c, memory, u, opts):
  residual, _, _ = _residual_rule(comp, p, c, memory, u, opts)
  return residual, comp.zero_where_sent(u, c), residual   # factor masking


def _econtrol_send(g, e, h, opts):
  # p = eta e + g - h, one pass over (e, g, h). On a skipped step h is
  # multiplied by 0 (g is already 0 and nothing is sent): p = eta e.
  h_used = h * opts["finite"].astype(h.dtype)
  return jnp.asarray(opts["eta"], e.dtype) * e + g - h_used, h


def _econtrol_keep(comp, p, c, e, h, opts):
  # e <- e + g - h - c = p + (1 - eta) e - c: one pass over (p, e), written
  # where e was (its buffer is free then: no copy when the state is
  # donated), the sent entries taken off in place; h <- h + c in place
  # (c is 0 on a skipped step, where e is kept bit for bit: eta e + (1 -
  # eta) e may round to a neighbour of e).
  base = jnp.where(opts["finite"],
                   p + jnp.asarray(1.0 - opts["eta"], e.dtype) * e, e)
  return comp.add_to(base, c, -1.0), comp.add_to(h, c), None


_RULES = {
    # EF14: p = e + g; e <- p - c.  (The barrier materialises p once: the
    # selection and the norms read it, and the residual scatter updates it in
    # place, in the donated memory buffer when the state is donated.)
    "ef": _Rule(lambda g, e, a, o: (jax.lax.optimization_barrier(e + g), a),
                _residual_rule),
    "none": _Rule(lambda g, e, a, o: (g, a),
                  lambda comp, p, c, e, a, o: (e, a, None)),
    # EF21: p = g - h_i; h_i <- h_i + c; the step is h <- h + mean c.
    "ef21": _Rule(lambda g, h, a, o: (g - h, a),
                  lambda comp, p, c, h, a, o: (comp.add_to(h, c), a, None),
                  server=True),
    # EControl: p = eta e + g - h_i; e <- e + g - h_i - c; h_i <- h_i + c;
    # the step is h <- h + mean c.
    "econtrol": _Rule(_econtrol_send, _econtrol_keep, server=True,
                      aux="estimate"),
    "dgc": _Rule(_dgc_send, _dgc_keep, aux="momentum", hold=True),
}


class ErrorFeedbackState(NamedTuple):
  """State of :func:`error_feedback`.

  Attributes:
    count: int32 number of updates so far.
    key: uint32 PRNG key data (random compressors), folded with the step,
      the leaf and the worker index.
    server: ``"ef21"``, ``"econtrol"``: the server estimate
      ``h = mean_i h_i`` (same on every
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
                       f"{shape} with {comp.name}: {e}. Send it dense with "
                       "`mask`, e.g. mask=lambda p: jax.tree.map(lambda x: "
                       "x.ndim >= 2, p) (kernels only)") from None


def _unsent_sq_norm(comp: Compressor, p: jax.Array, c, inv_scale) -> jax.Array:
  """``||(p - decompress(c)) * inv_scale||^2`` without the dense difference.

  ``||p||^2`` minus, at the sent positions, ``p_i^2 - (p_i - v_i)^2`` (a
  gather of the few sent entries instead of one more pass over ``p``).
  Accurate to float32 rounding of ``||p||^2``; clipped at 0.
  """
  p32 = p.astype(jnp.float32) * inv_scale
  dense_form = c.indices.shape[-1] == 0
  values = comp.values_of(c, p.size if dense_form else c.indices.shape[-1])
  values = values.astype(jnp.float32) * inv_scale
  if dense_form:
    return jnp.sum(jnp.square(p32 - values.reshape(p.shape)))
  index = comp.flat_indices(c.indices, p.shape)
  at = p32.reshape(-1).at[index].get(mode="fill", fill_value=0)
  sent = jnp.sum(jnp.square(at) - jnp.square(at - values))
  # ||p||^2 read from p as it is (no scaled copy written first); a
  # non-finite entry makes the norm inf (NaN too), as it should.
  total = numerics.scaled_sq_norm(p, inv_scale)
  total = jnp.where(jnp.isnan(total), jnp.inf, total)
  return jnp.maximum(total - sent, 0.0)


def _global_norm(leaves, inv_scale=1.0) -> jax.Array:
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(numerics.scaled_sq_norm(x, inv_scale) for x in leaves))


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
    eta: float | None = None,
    collective: str = "auto",
    key: Any = None,
    seed: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Compresses the gradients with error feedback (EF / EF21 / EControl / DGC / none).

  See the module docstring for the exact update of each variant and for
  where the learning rate sits.

  Args:
    compressor: a :class:`~sparse_jax.compression.Compressor`, e.g.
      ``top_k(0.001)``.
    variant: ``"ef"`` (EF14 memory), ``"ef21"``, ``"econtrol"``, ``"dgc"``
      or ``"none"``.
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
    collective: how workers' messages are combined under ``axis_name``:
      ``"auto"`` (default: per leaf, the cheapest in bytes), ``"all_gather"``,
      ``"all_reduce"`` (decompress, dense all-reduce) or ``"reduce_scatter"``
      (fixed-layout low-precision compressors only).
    eta: EControl's feedback strength in ``[0, 1]`` (default
      :data:`ECONTROL_ETA`); only for ``variant="econtrol"``. ``eta=1``
      feeds the whole error back each step; small values keep EControl
      stable with aggressive compression.
    key: an int seed or a PRNG key for random compressors (default 0).
    seed: deprecated name of ``key``.

  Composes with ``jax.jit`` (donated params and state), ``vmap``/``scan``,
  ``optax.masked`` / ``multi_transform`` / ``partition``,
  ``optax.MultiSteps``, ``optax.inject_hyperparams`` (``learning_rate``,
  ``momentum``, ``clip_norm``, ``eta`` injectable; a compressor's ``fraction`` fixes
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

    Data parallel in your own ``jax.shard_map``: every device keeps its own
    state (a leading device axis, ``P("data")``), and the params are marked
    per-device (``pcast``) BEFORE the gradient, else JAX all-reduces the
    gradient densely first (``update`` then raises, saying so):

    >>> from jax.sharding import PartitionSpec as P
    >>> n = jax.device_count()
    >>> mesh = jax.make_mesh((n,), ("data",))
    >>> tx = error_feedback(top_k(0.5), learning_rate=0.1, axis_name="data")
    >>> loss = lambda p, x: jnp.mean((x @ p["w"] - 1.0) ** 2)
    >>> def step(params, state, x):
    ...   state = jax.tree.map(lambda s: s[0], state)    # this device's own
    ...   mine = jax.lax.pcast(params, "data", to="varying")
    ...   grads = jax.grad(loss)(mine, x)                # this device's shard
    ...   updates, state = tx.update(grads, state, params)
    ...   return (optax.apply_updates(params, updates),
    ...           jax.tree.map(lambda s: s[None], state))
    >>> step = jax.jit(jax.shard_map(step, mesh=mesh,
    ...     in_specs=(P(), P("data"), P("data")), out_specs=(P(), P("data"))))
    >>> per_device = jax.NamedSharding(mesh, P("data"))
    >>> params = {"w": jnp.zeros((4,))}
    >>> state = jax.device_put(jax.tree.map(lambda s: jnp.stack([s] * n),
    ...                                     tx.init(params)), per_device)
    >>> x = jax.device_put(jnp.ones((2 * n, 4)), per_device)
    >>> params, state = step(params, state, x)
    >>> [round(w, 4) for w in params["w"].tolist()]
    [0.2, 0.2, 0.0, 0.0]
    >>> state.local.memory["w"].shape == (n, 4)   # one residual per device
    True

  References:
    Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS 2018,
    https://arxiv.org/abs/1809.07599;
    Gao, Islamov, Stich, "EControl: Fast Distributed Optimization with
    Compression and Error Control", ICLR 2024,
    https://arxiv.org/abs/2311.05645;
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
  if eta is not None and variant != "econtrol":
    raise ValueError(f"{who}: eta is only used by variant='econtrol'")
  eta = ECONTROL_ETA if eta is None else eta
  eta = checks.check_float(eta, "eta", who=who, minimum=0.0, maximum=1.0,
                           traced_ok=True)
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
  checks.check_choice(collective, "collective", exchange.COLLECTIVES,
                      who="error_feedback")
  # A reduce-scatter re-encodes the mean chunk: its error memory lives in the
  # state (full-size per leaf; each device uses its own chunk).
  reduce_scatter_possible = collective in ("auto", "reduce_scatter") and any(
      comp.fixed_layout for comp in levels)
  if collective == "reduce_scatter":
    for comp in levels:
      if not comp.fixed_layout:
        raise ValueError(f"{who}: collective='reduce_scatter' needs "
                         f"fixed-layout compressors (dense low-precision "
                         f"formats: fp_quantize, fp4, lognormal_fp), not "
                         f"{comp.name}")
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
        server=compressed() if _RULES[variant].server else empty(),
        dense_momentum=(zeros_where(flags, absent, leaves, False, treedef)
                        if variant == "dgc" else empty()),
        wire=wire.WireBytes(zero(), zero(), zero()),
        local=WorkerLocal(
            memory=compressed() if variant != "none" else empty(),
            momentum=compressed() if variant == "dgc" else empty(),
            error_ratio=zero(), skipped=jnp.zeros((), jnp.int32),
            estimate=compressed() if variant == "econtrol" else empty(),
            exponent_bits=jax.tree.unflatten(treedef, [
                jnp.zeros((), jnp.float32)
                if f and not gone and compressor.format_of is not None
                else _MASKED for f, gone in zip(flags, absent)]),
            server_error=(compressed() if reduce_scatter_possible
                          else empty())))

  def routes_for(comp, leaves, flags, n):
    """The exchange route of every compressed leaf (None elsewhere)."""
    return [exchange.route(comp, x.shape, x.dtype, n, collective)
            if f and not trees.is_masked(x) else None
            for x, f in zip(leaves, flags)]

  def wire_table(routes, leaves, flags, n):
    """Static bytes per device, one row per compressor level."""
    present = [(x, f) for x, f in zip(leaves, flags)
               if not trees.is_masked(x)]   # MaskedNode leaves send nothing
    dense = sum(wire.ring_all_reduce_bytes(x.size * x.dtype.itemsize, n)
                for x, _ in present)
    dense_sent = sum(wire.ring_all_reduce_bytes(x.size * x.dtype.itemsize, n)
                     for x, f in present if not f)
    rows = []
    for level_routes in routes:
      sent = dense_sent + sum(rt.nbytes for rt in level_routes
                              if rt is not None)
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
    # max |g|: non-finite anywhere -> this worker skips the step (zeros in,
    # nothing sent, local state kept); finite -> the scale that keeps the
    # norms below from overflowing or underflowing.
    present = [g for g, gone in zip(grads, absent) if not gone]
    gmax = numerics.max_abs(present)
    finite = jnp.isfinite(gmax)
    gmax = jnp.where(finite, gmax, 0.0)
    inv_scale = 1.0 / jnp.where(gmax > 0, gmax, 1.0)
    idx = [i for i, f in enumerate(flags) if f]   # never a MaskedNode
    # ||g|| / max |g| of the compressed leaves, read from the gradients as
    # they came (NaN on a skipped step, whose ratio is NaN anyway), so that
    # the zeroed copy below has one reader and fuses into it. Clipping
    # scales g and max |g| alike, so this is also the clipped gradient's.
    g_norm = _global_norm([grads[i] for i in idx], inv_scale)
    grads = [g if gone else jnp.where(finite, g, jnp.zeros((), g.dtype))
             for g, gone in zip(grads, absent)]
    if clip_norm is not None:   # the norm of the gradients as they came
      norm = gmax * _global_norm(present, inv_scale)
      scale = jnp.where(finite, jnp.minimum(
          1.0, clip_norm / jnp.maximum(norm, 1e-30)), 1.0)
      grads = [g if gone else g * scale.astype(g.dtype)
               for g, gone in zip(grads, absent)]
      gmax = gmax * scale
      inv_scale = 1.0 / jnp.where(gmax > 0, gmax, 1.0)
    incoming = [g if gone else g * jnp.asarray(lr, g.dtype)
                for g, gone in zip(grads, absent)]

    memory = treedef.flatten_up_to(state.local.memory)
    server = treedef.flatten_up_to(state.server)
    dense_mom = treedef.flatten_up_to(state.dense_momentum)

    rule = _RULES[variant]
    aux_field = rule.aux
    aux = (treedef.flatten_up_to(getattr(state.local, aux_field))
           if aux_field else [None] * len(grads))

    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), count)
    if axis_name is not None:
      key = jax.random.fold_in(key, exchange.worker_index(axis_name))

    sign = -1.0 if learning_rate is not None else 1.0
    opts = dict(momentum=momentum, eta=eta, finite=finite)
    # What each worker compresses (and DGC's new momentum).
    sends = {i: rule.send(incoming[i], memory[i], aux[i], opts) for i in idx}

    routes = [routes_for(comp, grads, flags, n) for comp in levels]
    server_err = treedef.flatten_up_to(state.local.server_error)
    server_err = [None if trees.is_masked(s) else s for s in server_err]

    def compress_and_exchange(level_routes):
      """Per compressed leaf: new memory, new aux memory, the step."""
      new_mem, new_aux, step_part, unsent_sq, bits = [], [], [], [], []
      server_errs = []
      for i in idx:
        p, a = sends[i]
        rt = level_routes[i]
        comp = rt.compressor
        leaf_key = jax.random.fold_in(key, stream[i])
        c = comp.compress(p, leaf_key)
        c = c._replace(values=jnp.where(finite, c.values,
                                        jnp.zeros((), c.values.dtype)))
        if compressor.format_of is not None:   # logged: the format used
          bits.append(jnp.float32(-1.0) if comp.format_of is None
                      else comp.format_of(c).astype(jnp.float32))
        m, a, residual = rule.keep(comp, p, c, memory[i], a, opts)
        new_mem.append(m)
        new_aux.append(a)
        # ||what was not sent||: read from the residual when the rule makes
        # one (after its in-place scatter: a sum over p before it would make
        # XLA:CPU copy p first), else from p and the few sent entries.
        unsent_sq.append(
            numerics.scaled_sq_norm(residual, inv_scale)
            if residual is not None else _unsent_sq_norm(comp, p, c, inv_scale))
        # The step: the server estimate h <- h + mean_i c_i (EF21, EControl;
        # stored as is) or mean_i c_i with the output sign folded into the
        # scatter (no extra dense pass).
        base = (server[i] if rule.server
                else jnp.zeros(p.shape, p.dtype))  # not zeros_like: p varies
        step, s_err = exchange.mean_into(
            rt, c, base, 1.0 if rule.server else sign, axis_name, n,
            key=leaf_key, server_error=server_err[i])
        server_errs.append(s_err)
        step_part.append(step)
      return (new_mem, new_aux, step_part,
              sum(unsent_sq, jnp.zeros((), jnp.float32)), bits, server_errs)

    if len(levels) == 1:
      level = jnp.zeros((), jnp.int32)
      (kept_back, kept_aux, step_part, unsent_sq, bits,
       server_errs) = compress_and_exchange(routes[0])
    else:
      level = jnp.minimum(count // warmup_steps, len(levels) - 1)
      (kept_back, kept_aux, step_part, unsent_sq, bits,
       server_errs) = jax.lax.switch(
          level, [functools.partial(compress_and_exchange, r) for r in routes])

    out = [None] * len(grads)
    new_memory, new_server, new_dense_mom = (list(memory), list(server),
                                             list(dense_mom))
    new_aux = list(aux)
    for j, i in enumerate(idx):
      new_memory[i] = kept_back[j]
      new_aux[i] = kept_aux[j]
      if rule.server:
        new_server[i] = step_part[j]
      out[i] = sign * step_part[j] if rule.server else step_part[j]
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

    if rule.hold:  # a skipped step leaves the worker's state as it was
      # (EF and EF21 memories are unchanged already: zero in, zero sent.)
      hold = lambda new, old: [n if trees.is_masked(o) or o is None else
                               jnp.where(finite, n, o) for n, o in zip(new, old)]
      new_memory, new_aux = hold(new_memory, memory), hold(new_aux, aux)
    # The state keeps its dtypes (a scan carry), whatever the gradients'.
    unflat = functools.partial(jax.tree.unflatten, treedef)
    keep = lambda new, old: [n if o is None or trees.is_masked(o) or n is o
                             else n.astype(o.dtype) for n, o in zip(new, old)]
    new_memory, new_server = keep(new_memory, memory), keep(new_server, server)
    new_aux, new_dense_mom = keep(new_aux, aux), keep(new_dense_mom, dense_mom)
    local_aux = {f: getattr(state.local, f) for f in _AUX_FIELDS}
    if aux_field:
      local_aux[aux_field] = unflat(new_aux)

    # ||lr g||, as |lr| ||g|| (no dense lr * g is kept around just for this
    # norm). Both norms of the vectors divided by max |g|, so the ratio is
    # right for gradients of any scale.
    in_norm = jnp.abs(jnp.asarray(lr, jnp.float32)) * g_norm
    ratio = jnp.sqrt(unsent_sq) / jnp.where(in_norm > 0, in_norm, 1.0)
    ratio = jnp.where(in_norm > 0, ratio, 0.0)
    ratio = jnp.where(finite, ratio, jnp.nan)
    wire_row = wire_table(routes, grads, flags, n)[level]
    new_state = ErrorFeedbackState(
        count=optax.safe_int32_increment(count),
        key=state.key,
        server=unflat(new_server),
        dense_momentum=unflat(new_dense_mom),
        wire=wire.WireBytes(*wire_row),
        local=WorkerLocal(memory=unflat(new_memory),
                          error_ratio=ratio.astype(jnp.float32),
                          skipped=state.local.skipped
                          + (~finite).astype(jnp.int32), **local_aux,
                          exponent_bits=(trees.replace(
                              state.local.exponent_bits, idx, bits) if bits
                                         else state.local.exponent_bits),
                          server_error=trees.replace(
                              state.local.server_error, idx,
                              [s if s is not None else old for s, old in zip(
                                  server_errs, trees.gather(
                                      state.local.server_error, idx))])))
    return unflat(out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
