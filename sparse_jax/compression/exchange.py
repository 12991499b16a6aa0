"""The data-parallel exchange of compressed tensors over a named mesh axis.

Inside ``jax.shard_map`` every device compresses its own tensor; the
fixed-size ``(values, indices)`` buffers are exchanged with
``jax.lax.all_gather(..., to="invarying")`` and scatter-ADDED into a dense
tensor (an index sent by several workers gets the sum of their values). The
result is the same on every device, and JAX's ``check_vma`` typing knows it:
the mean update it gives can leave ``shard_map`` with a replicated
``out_specs``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax._core import keys
from sparse_jax.compression import wire
from sparse_jax.compression.compressors import Compressed
from sparse_jax.compression.compressors import Compressor


def bound_axis_size(axis_name, who: str) -> int:
  """The size of a bound mesh axis, or a ValueError that says what to do."""
  try:
    return jax.lax.axis_size(axis_name)
  except NameError:
    raise ValueError(
        f"{who}: axis_name={axis_name!r} is not bound here. Call the update "
        f"inside jax.shard_map over a mesh with a {axis_name!r} axis (e.g. "
        "through sparse_jax.compression.make_data_parallel_step), or pass "
        "axis_name=None for a single worker.") from None


def all_gather(compressed, axis_name):
  """Every worker's compressed buffers, stacked on a new leading axis.

  The result is typed invariant (``to="invarying"``): it is the same on every
  device, which is what lets the scatter-added update leave ``shard_map``
  replicated under ``check_vma=True``.

  Args:
    compressed: this device's ``Compressed`` buffers (static shapes).
    axis_name: the bound mesh axis.

  Returns:
    ``Compressed`` with a leading axis of size ``axis_size(axis_name)``; pass
    it to ``Compressor.add_to``/``decompress`` to scatter-add it.
  """
  return jax.lax.all_gather(compressed, axis_name, to="invarying")


COLLECTIVES = ("auto", "all_gather", "all_reduce", "reduce_scatter")
"""How compressed messages are combined (``error_feedback(collective=...)``)."""


class Route(NamedTuple):
  """How one leaf's messages travel, and what it costs.

  Attributes:
    collective: ``"all_gather"`` (every worker's message, scatter-added),
      ``"all_reduce"`` (each worker decompresses, a dense ring all-reduce of
      the result) or ``"reduce_scatter"`` (fixed-layout messages: each device
      sums one chunk of every worker's message, re-encodes the mean chunk and
      all-gathers the chunks).
    nbytes: bytes each device receives per step (ring algorithms).
    compressor: the compressor the worker applies (for ``reduce_scatter``,
      the original one applied chunk by chunk: :func:`chunked`).
    inner: the original compressor (what a chunk is encoded with).
  """
  collective: str
  nbytes: float
  compressor: Any
  inner: Any = None


def route(comp, shape, dtype, num_workers: int, collective: str = "auto"
          ) -> Route:
  """The collective for one leaf: the one asked for, or the cheapest.

  ``"auto"`` compares the bytes each device receives: all-gather of the
  messages, ``(n - 1) B``; all-reduce of the decompressed tensor,
  ``2 (n - 1) / n * 4 d``; and, for a fixed-layout compressor (dense
  low-precision values), reduce-scatter + all-gather of re-encoded chunks,
  ``2 (n - 1) B_chunk`` with ``B_chunk`` the message of ``ceil(d / n)``
  values (1/4 of fp32's ring all-reduce for 8-bit formats). Ties go to the
  all-gather (exact: nothing is re-encoded).
  """
  n = int(num_workers)
  shape = tuple(shape)
  size = math.prod(shape)
  if n <= 1:
    return Route("all_gather", 0.0, comp, comp)
  options = {"all_gather": wire.all_gather_bytes(comp.wire_bytes(shape, dtype),
                                                  n),
             "all_reduce": wire.ring_all_reduce_bytes(
                 size * np.dtype(jnp.promote_types(dtype, jnp.float32)
                                 ).itemsize, n)}
  if comp.fixed_layout:
    per_chunk = comp.wire_bytes((-(-size // n),), dtype)
    options["reduce_scatter"] = 2.0 * (n - 1) * per_chunk
  if collective == "auto":
    collective = min(options, key=lambda k: (options[k], k != "all_gather"))
  elif collective not in options:
    raise ValueError(f"collective={collective!r} needs a fixed-layout "
                     f"compressor (a dense low-precision format such as "
                     f"fp_quantize), not {comp.name}")
  worker = chunked(comp, n, size) if collective == "reduce_scatter" else comp
  return Route(collective, float(options[collective]), worker, comp)


def chunked(comp, num_workers: int, size: int):
  """``comp`` applied to each of ``n`` equal chunks of a flat tensor of ``size``.

  The message has a leading chunk axis (each chunk with its own scale), so
  chunk ``j`` of every worker can be sent to device ``j``; decoding gives the
  flat (padded) tensor: each row trimmed to the chunk length first (a row of
  packed 4-bit codes of odd length carries one padding code). Dense form:
  ``flat_indices`` is the identity.
  """
  n = int(num_workers)

  def compress(x, key):
    flat = jnp.ravel(x)
    pad = -flat.shape[0] % n
    rows = jnp.pad(flat, (0, pad)).reshape(n, -1)
    c = jax.vmap(comp.compress)(rows, jax.random.split(
        keys.as_key(key, who="exchange"), n))
    return Compressed(c.values, jnp.zeros((0,), jnp.int32), c.scale)

  chunk = -(-int(size) // n)

  def decode(c):
    rows = comp.decode(c)[..., :chunk]       # (..., n, chunk)
    return rows.reshape(rows.shape[:-2] + (-1,))

  return Compressor(compress, comp.flat_indices, f"chunked({comp.name})",
                    decode, True, comp.format_of)


def mean_into(rt: Route, compressed, base, scale, axis_name, num_workers,
              key=None, server_error=None):
  """``(base + scale * mean_i decompress(c_i), server_error)`` over ``axis_name``.

  The one exchange every compressing transform uses. With ``axis_name=None``
  (one worker) it is ``rt.compressor.add_to(base, compressed, scale)``.
  Otherwise by ``rt.collective``. For ``reduce_scatter`` the mean chunk is
  re-encoded on the device that owns it, with its own error feedback (the
  server side of bidirectional compression): ``server_error`` (an array
  shaped like ``base``; this device uses only its own chunk of it) is added
  to the mean chunk before re-encoding, and what the re-encoding drops is
  returned as the new ``server_error``. Other collectives return it as is.
  """
  comp, n = rt.compressor, num_workers
  if axis_name is None:
    return comp.add_to(base, compressed, scale), server_error
  if rt.collective == "all_gather":
    gathered = all_gather(compressed, axis_name)
    return comp.add_to(base, gathered, scale / n), server_error
  if rt.collective == "all_reduce":
    dense = comp.add_to(jnp.zeros(base.shape, jnp.promote_types(
        base.dtype, jnp.float32)), compressed)
    return base + (jax.lax.pmean(dense, axis_name)
                   * jnp.asarray(scale, dense.dtype)).astype(base.dtype), (
                       server_error)
  # reduce_scatter: device j receives chunk j of every worker's message,
  # sums them (exactly, in float32), adds its server error, re-encodes the
  # mean chunk and all-gathers the chunks.
  inner = rt.inner
  size = base.size
  received = compressed._replace(**{
      f: jax.lax.all_to_all(getattr(compressed, f), axis_name, 0, 0)
      for f in ("values", "scale") if getattr(compressed, f) is not None})
  chunk = -(-size // n)
  me = worker_index(axis_name) * chunk
  mean = jnp.sum(inner.decode(received)[..., :chunk], 0) / n
  padded = None
  if server_error is not None:
    padded = jnp.pad(server_error.reshape(-1).astype(jnp.float32),
                     (0, n * chunk - size))
    mean = mean + jax.lax.dynamic_slice(padded, (me,), (chunk,))
  key = jax.random.fold_in(
      keys.as_key(0 if key is None else key, who="exchange"), 1 << 20)
  requant = inner.compress(mean, jax.random.fold_in(key, worker_index(
      axis_name)))
  gathered = all_gather(requant, axis_name)
  flat = comp.values_of(gathered, size)    # the chunks, trimmed, in order
  step = base + (flat.reshape(base.shape) * jnp.asarray(scale, flat.dtype)
                 ).astype(base.dtype)
  if padded is not None:
    dropped = mean - inner.decode(requant)[:chunk]
    server_error = jax.lax.dynamic_update_slice(padded, dropped, (me,))[
        :size].reshape(base.shape).astype(server_error.dtype)
  return step, server_error


def dense_mean(x: jax.Array, axis_name) -> jax.Array:
  """All-reduce mean of a dense tensor (for leaves that are not compressed)."""
  return jax.lax.pmean(x, axis_name)


def worker_index(axis_name) -> jax.Array:
  """This device's index along ``axis_name`` (0 when it is None)."""
  if axis_name is None:
    return jnp.zeros((), jnp.int32)
  return jax.lax.axis_index(axis_name)
