"""PowerSGD: rank-r gradient compression with error feedback (optax transform).

Per matrix leaf (a kernel is viewed as ``(prod(shape[:-1]), shape[-1])``),
with ``lr`` placed as in :func:`~sparse_jax.compression.error_feedback`
(``None``: 1, output ``+M_hat``; a float/schedule: output ``-M_hat``):

    M_i = e_i + lr g_i                  (error feedback, per worker)
    P   = mean_i M_i Q                  (all-reduce of an (m, r) matrix)
    P   = orthonormal basis of P        (reduced QR)
    Q   = mean_i M_i^T P                (all-reduce of an (n, r) matrix)
    M_hat = P Q^T ;  e_i <- M_i - M_hat ;  step = M_hat

``Q`` is kept in the state and warm-starts the next step (one power
iteration per step). The compressor is linear, so ``M_hat`` is also the mean
over workers of each worker's compressed ``P P^T M_i``: the same data-parallel
mean as with sparsification, and the conservation invariant
``n (x_0 - x_T) + sum_i e_i = lr sum_t sum_i g_i,t`` holds as for EF.
Leaves where rank ``r`` does not save bytes (``(m + n) r >= m n``), vectors
and leaves excluded by ``mask`` are averaged dense.

The exchange is two all-reduces (not an all-gather), so it needs no
scatter-add and its bytes are ``2 (n_w - 1) / n_w * 4 (m + n) r`` per matrix
(ring all-reduce). The state is a
:class:`PowerSGDState` (``q`` holds the ``Q`` matrices, ``local`` the
per-worker memories, ``wire`` the bytes), so
:func:`~sparse_jax.compression.make_data_parallel_step` lays it out and
reports its metrics like error feedback's (it keys off ``local`` + ``wire``).

Non-finite gradients: as for error feedback, a worker whose gradient holds a
NaN or inf skips the step (sends zeros, keeps its memory, ``local.skipped``
counts it, ``local.error_ratio`` is NaN).

References:
  Vogels, Karimireddy, Jaggi, "PowerSGD: Practical Low-Rank Gradient
  Compression for Distributed Optimization", NeurIPS 2019,
  https://arxiv.org/abs/1905.13727
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparse_jax.compression import exchange
from sparse_jax.compression import wire
from sparse_jax._core import checks
from sparse_jax._core import keys
from sparse_jax._core import numerics
from sparse_jax._core import sharding
from sparse_jax._core import trees
from sparse_jax.compression.error_feedback import leaf_kinds

_MASKED = optax.MaskedNode()


class PowerSGDLocal(NamedTuple):
  """The per-worker part of :class:`PowerSGDState` (each device its own).

  Attributes:
    memory: the error-feedback residual ``e_i`` of each compressed matrix
      (``optax.MaskedNode`` elsewhere).
    error_ratio: float32, ``||e_i|| / ||lr g_i||`` this step (NaN when
      skipped).
    skipped: int32 number of steps skipped for a non-finite gradient.
  """
  memory: Any
  error_ratio: jax.Array
  skipped: jax.Array


class PowerSGDState(NamedTuple):
  """State of :func:`powersgd`.

  Attributes:
    count: int32 number of updates so far.
    key: uint32 PRNG key data (the initial ``Q``).
    q: the warm-started ``Q`` of each compressed matrix (the same on every
      device).
    wire: :class:`~sparse_jax.compression.WireBytes` of the last step.
    local: the :class:`PowerSGDLocal` per-worker part.
  """
  count: jax.Array
  key: jax.Array
  q: Any
  wire: wire.WireBytes
  local: PowerSGDLocal


def _matrix_shape(shape) -> tuple[int, int]:
  return math.prod(shape[:-1]), shape[-1]


def low_rank_saves(shape, rank: int) -> bool:
  """Whether rank ``rank`` factors are smaller than the dense matrix."""
  if len(shape) < 2:
    return False
  m, n = _matrix_shape(shape)
  return (m + n) * rank < m * n


def orthonormalize(p: jax.Array) -> jax.Array:
  """An orthonormal basis of the columns of ``p`` (reduced QR, float32)."""
  q, _ = jnp.linalg.qr(p.astype(jnp.float32), mode="reduced")
  return q.astype(p.dtype)


def powersgd(rank: int, *, learning_rate: optax.ScalarOrSchedule | None = None,
             axis_name: Any = None, mask: Any = None,
             key: Any = None,
             seed: Any = None) -> optax.GradientTransformationExtraArgs:
  """PowerSGD low-rank compression with error feedback.

  Args:
    rank: the rank ``r`` of the approximation, ``>= 1``.
    learning_rate: ``None`` (memories in gradient units, output ``+M_hat``:
      chain an optimizer) or a float/schedule (multiplies the gradient before
      the memory; output ``-M_hat``, ready to apply).
    axis_name: the ``jax.shard_map`` mesh axis of the workers, or ``None``.
    mask: optax-style mask of the leaves to compress (others: dense; a
      prefix or a callable also work; ``optax.MaskedNode`` leaves from
      ``optax.masked`` are left alone).
    key: an int seed or a PRNG key of the initial ``Q`` (the same on every
      worker; default 0).
    seed: deprecated name of ``key``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`PowerSGDState`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> tx = powersgd(2, learning_rate=0.1)
    >>> params = {"w": jnp.zeros((8, 6))}
    >>> state = tx.init(params)
    >>> g = {"w": jnp.outer(jnp.arange(8.0), jnp.ones(6))}   # rank 1
    >>> updates, state = tx.update(g, state, params)
    >>> bool(jnp.allclose(updates["w"], -0.1 * g["w"], atol=1e-5))
    True

  References:
    Vogels, Karimireddy, Jaggi, "PowerSGD: Practical Low-Rank Gradient
    Compression for Distributed Optimization", NeurIPS 2019,
    https://arxiv.org/abs/1905.13727
  """
  who = f"powersgd(rank={rank!r})"
  rank = checks.check_int(rank, "rank", who="powersgd")
  if learning_rate is not None and not callable(learning_rate):
    learning_rate = checks.check_float(
        learning_rate, "learning_rate (None, a number > 0 or a schedule)",
        who=who, minimum=0.0, min_open=True, traced_ok=True)
  key = keys.seed_or_key(key, seed, who="powersgd")

  def compressed_flags(tree):
    flags, _ = leaf_kinds(mask, tree, who)
    return [f and low_rank_saves(jnp.shape(x), rank)
            for x, f in zip(trees.leaves(tree), flags)]

  def init_fn(params):
    flat, treedef = trees.flatten(params)
    flags = compressed_flags(params)
    init_key = keys.as_key(key, who="powersgd")
    stream = trees.present_index([x for _, x in flat])
    memory, qs = [], []
    for i, ((path, x), f) in enumerate(zip(flat, flags)):
      if f and not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"{who}: parameter {trees.path_str(path)} has "
                         f"dtype {jnp.result_type(x)}; exclude it with `mask`")
      if not f:
        memory.append(_MASKED)
        qs.append(_MASKED)
        continue
      _, n = _matrix_shape(jnp.shape(x))
      memory.append(jnp.zeros_like(x, jnp.promote_types(x.dtype, jnp.float32)))
      qs.append(jax.random.normal(jax.random.fold_in(init_key, stream[i]),
                                  (n, rank),
                                  jnp.result_type(x)))
    zero = lambda: jnp.zeros((), jnp.float32)   # own buffers (donation)
    return PowerSGDState(
        count=jnp.zeros((), jnp.int32),
        key=jnp.array(jax.random.key_data(init_key), copy=True),
        q=jax.tree.unflatten(treedef, qs),
        wire=wire.WireBytes(zero(), zero(), zero()),
        local=PowerSGDLocal(memory=jax.tree.unflatten(treedef, memory),
                            error_ratio=zero(),
                          skipped=jnp.zeros((), jnp.int32)))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    # Selection (top-k, thresholds) and scatters have no sharding rule on an
    # Explicit-axes mesh: run with those axes Auto, keep the shardings.
    return sharding.auto_sharded(
        _update, updates, state,
        out_specs=(jax.tree.map(sharding.spec_of, updates),
                   jax.tree.map(sharding.spec_of, state)))

  def _update(updates, state):
    n_workers = (1 if axis_name is None
                 else exchange.bound_axis_size(axis_name, who))
    mean = ((lambda x: x) if axis_name is None
            else functools.partial(exchange.dense_mean, axis_name=axis_name))
    grads, treedef = jax.tree.flatten(updates, is_leaf=trees.is_masked)
    flags = compressed_flags(updates)
    if learning_rate is None:
      lr = 1.0
    elif callable(learning_rate):
      lr = learning_rate(state.count)
    else:
      lr = learning_rate
    sign = -1.0 if learning_rate is not None else 1.0
    # A NaN/inf anywhere: this worker skips the step (sends zeros, keeps its
    # memory, counts it); max |g| also scales the norms of the error ratio.
    gmax = numerics.max_abs([g for g in grads if not trees.is_masked(g)])
    finite = jnp.isfinite(gmax)
    grads = [g if trees.is_masked(g) else jnp.where(finite, g, jnp.zeros((), g.dtype))
             for g in grads]
    inv = 1.0 / jnp.where(finite & (gmax > 0), gmax, 1.0)
    memory = treedef.flatten_up_to(state.local.memory)
    qs = treedef.flatten_up_to(state.q)
    out, new_memory, new_qs = [], [], []
    unsent_sq = jnp.zeros((), jnp.float32)
    in_sq = jnp.zeros((), jnp.float32)
    sent = dense = 0.0
    for g, e, q, f in zip(grads, memory, qs, flags):
      if trees.is_masked(g):
        out.append(g)
        new_memory.append(e)
        new_qs.append(q)
        continue
      incoming = g * jnp.asarray(lr, g.dtype)
      nbytes = g.size * g.dtype.itemsize
      dense += wire.ring_all_reduce_bytes(nbytes, n_workers)
      if not f:
        out.append(sign * mean(incoming))
        new_memory.append(e)
        new_qs.append(q)
        sent += wire.ring_all_reduce_bytes(nbytes, n_workers)
        continue
      m, n = _matrix_shape(g.shape)
      mat = jnp.where(finite, e + incoming, jnp.zeros((), e.dtype)).reshape(m, n)
      p = orthonormalize(mean(mat @ q))
      q_new = mean(mat.T @ p)
      approx = p @ q_new.T
      residual = mat - approx
      out.append((sign * approx).reshape(g.shape))
      new_memory.append(jnp.where(finite, residual.reshape(g.shape).astype(e.dtype),
                                  e))
      new_qs.append(q_new.astype(q.dtype))
      unsent_sq += jnp.sum(jnp.square(residual.astype(jnp.float32) * inv))
      in_sq += jnp.sum(jnp.square(incoming.astype(jnp.float32) * inv))
      sent += wire.ring_all_reduce_bytes((m + n) * rank * g.dtype.itemsize,
                                         n_workers)
    ratio = jnp.where(in_sq > 0, jnp.sqrt(unsent_sq / jnp.where(
        in_sq > 0, in_sq, 1.0)), 0.0)
    ratio = jnp.where(finite, ratio, jnp.nan)
    unflat = functools.partial(jax.tree.unflatten, treedef)
    new_state = PowerSGDState(
        count=optax.safe_int32_increment(state.count),
        key=state.key,
        q=unflat(new_qs),
        wire=wire.WireBytes(jnp.float32(sent), jnp.float32(sent),
                            jnp.float32(dense)),
        local=PowerSGDLocal(memory=unflat(new_memory), error_ratio=ratio,
                            skipped=state.local.skipped
                          + (~finite).astype(jnp.int32)))
    return unflat(out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
