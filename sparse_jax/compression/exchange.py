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

import jax
import jax.numpy as jnp


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


def mean_into(comp, compressed, base, scale, axis_name, num_workers):
  """``base + scale * mean_i decompress(c_i)`` over the workers of ``axis_name``.

  The one exchange every compressing transform uses: with ``axis_name=None``
  (one worker) it is ``comp.add_to(base, compressed, scale)``; otherwise the
  workers' buffers are all-gathered (:func:`all_gather`) and scatter-added.
  """
  if axis_name is None:
    return comp.add_to(base, compressed, scale)
  gathered = all_gather(compressed, axis_name)
  return comp.add_to(base, gathered, scale / num_workers)


def dense_mean(x: jax.Array, axis_name) -> jax.Array:
  """All-reduce mean of a dense tensor (for leaves that are not compressed)."""
  return jax.lax.pmean(x, axis_name)


def worker_index(axis_name) -> jax.Array:
  """This device's index along ``axis_name`` (0 when it is None)."""
  if axis_name is None:
    return jnp.zeros((), jnp.int32)
  return jax.lax.axis_index(axis_name)
