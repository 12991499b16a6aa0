"""A generic data-parallel train step over a ``data`` mesh axis (jax.shard_map).

The batch is split over the devices of the mesh axis; every device computes
the gradient of ITS shard (no implicit all-reduce: the parameters are cast to
device-varying before differentiating), then the optimizer runs on every
device:

* if the optimizer contains :func:`~sparse_jax.compression.error_feedback`
  (built with the same ``axis_name``), it does the exchange: compressed
  buffers all-gathered and scatter-added, per-device residuals;
* otherwise the gradients are averaged with a dense all-reduce first (plain
  data-parallel SGD/Adam, the baseline).

Parameters are replicated (``P()``) and ``check_vma=True`` proves the applied
update is identical on every device. The optimizer state is laid out so that
each device owns the ``local`` part of every compressing state
(:func:`is_compressing_state`: a ``local`` + ``wire`` NamedTuple, e.g.
:class:`~sparse_jax.compression.ErrorFeedbackState`,
:class:`~sparse_jax.compression.PowerSGDState`; a leading axis of size ``n``
sharded over the data axis) while the rest is replicated. Works with one process or several (``jax.distributed``); there
every process passes the same full (global) batch and parameters, and
:func:`make_data_parallel_step`'s ``init``/``shard_batch`` place the
addressable pieces.

On CPU a step waits for the previous one before it is dispatched: XLA:CPU
runs the devices of a process on one thread pool, and with several steps in
flight their collectives were seen to deadlock (8 fake devices, 2 cores).
A training loop that builds its own ``shard_map`` step on CPU should do the
same (``jax.block_until_ready`` on the state every step).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from sparse_jax._core import trees
from sparse_jax.compression import wire

PyTree = Any


class DataParallelStep(NamedTuple):
  """What :func:`make_data_parallel_step` returns.

  Attributes:
    init: ``params -> (params, opt_state)``, both placed on the mesh
      (parameters replicated, per-worker state sharded).
    step: ``(params, opt_state, batch) -> (params, opt_state, metrics)``,
      jitted; ``batch`` is a global batch (e.g. from ``shard_batch``).
      ``metrics``: ``loss`` (mean over workers), ``bytes_sent``,
      ``bytes_received``, ``bytes_dense`` (per device, this step) and, with
      error feedback, ``error_ratio`` (mean over workers) and, for
      low-precision formats, ``exponent_bits/<leaf>`` (the format's
      exponent width, e.g. what ``lognormal_fp`` chose).
    shard_batch: host batch (full, the same on every process) -> global
      batch sharded over the data axis.
    num_workers: the size of the data axis.
    lower: ``(params, opt_state, batch) -> jax.stages.Lowered`` of the jitted
      step (``.compile().as_text()`` gives the HLO with its collectives).
  """
  init: Callable[[PyTree], tuple[PyTree, PyTree]]
  step: Callable[[PyTree, PyTree, PyTree], tuple[PyTree, PyTree, dict]]
  shard_batch: Callable[[PyTree], PyTree]
  num_workers: int
  lower: Callable[[PyTree, PyTree, PyTree], Any]


def is_compressing_state(x) -> bool:
  """The protocol of a compressing transform's state (error feedback, PowerSGD).

  A NamedTuple with a ``local`` field (the per-worker part: each device owns
  its own copy, with an ``error_ratio`` scalar for the metrics) and a
  ``wire`` field (:class:`~sparse_jax.compression.WireBytes` of the last
  step); everything else is the same on every device. Any transform whose
  state follows it is laid out and reported by
  :func:`make_data_parallel_step`.
  """
  fields = getattr(type(x), "_fields", ())
  return ("local" in fields and "wire" in fields
          and isinstance(x.wire, wire.WireBytes))


def state_specs(opt_state: PyTree, axis_name) -> PyTree:
  """PartitionSpecs for an optimizer state: the ``local`` parts on the axis."""
  def spec(node):
    if is_compressing_state(node):
      return jax.tree.map(lambda _: P(), node)._replace(
          local=jax.tree.map(lambda _: P(axis_name), node.local))
    return P()
  return jax.tree.map(spec, opt_state, is_leaf=is_compressing_state)


def _map_local(fn, opt_state):
  """Applies ``fn`` to the leaves of the ``local`` parts only."""
  return jax.tree.map(
      lambda node: node._replace(local=jax.tree.map(fn, node.local))
      if is_compressing_state(node) else node,
      opt_state, is_leaf=is_compressing_state)


def _format_metrics(states, axis_name) -> dict[str, jax.Array]:
  """``exponent_bits/<leaf>``: the format each leaf was sent in (mean over
  workers), for compressors that choose it (``lognormal_fp``)."""
  out = {}
  for state in states:
    bits = getattr(state.local, "exponent_bits", None)
    if bits is None:
      continue
    for path, value in trees.flatten(bits)[0]:
      if not trees.is_masked(value):
        name = "/".join(trees.leaf_names(path))
        out[f"exponent_bits/{name}"] = jax.lax.pmean(value, axis_name)
  return out


def _place(x, sharding):
  """A global array from a host value that every process holds in full."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def make_data_parallel_step(loss_fn: Callable[[PyTree, PyTree], jax.Array],
                            optimizer: optax.GradientTransformation,
                            mesh: jax.sharding.Mesh, *,
                            axis_name: str = "data",
                            donate: bool = False) -> DataParallelStep:
  """Builds a jitted data-parallel train step over ``mesh``'s ``axis_name``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the loss of one device's
      shard of the batch (usually a mean).
    optimizer: any optax transformation; to compress, one that contains
      ``error_feedback(..., axis_name=axis_name)`` (e.g. chained before
      ``optax.sgd``, or with ``learning_rate`` as the whole optimizer).
    mesh: a mesh with an axis named ``axis_name`` (other axes are not used).
    axis_name: the data axis.
    donate: donate params and state buffers to the step.

  Returns:
    A :class:`DataParallelStep`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sparse_jax.compression import (error_feedback, top_k,
    ...                                     make_data_parallel_step)
    >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
    >>> loss = lambda p, b: jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)
    >>> tx = error_feedback(top_k(0.5), learning_rate=0.1, axis_name="data")
    >>> dp = make_data_parallel_step(loss, tx, mesh)
    >>> params, state = dp.init({"w": jnp.zeros((4,))})
    >>> n = dp.num_workers
    >>> batch = dp.shard_batch({"x": jnp.ones((2 * n, 4)),
    ...                         "y": jnp.ones((2 * n,))})
    >>> params, state, metrics = dp.step(params, state, batch)
    >>> sorted(metrics)
    ['bytes_dense', 'bytes_received', 'bytes_sent', 'error_ratio', 'loss']

  References:
    Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS 2018,
    https://arxiv.org/abs/1809.07599
  """
  if axis_name not in mesh.axis_names:
    raise ValueError(f"make_data_parallel_step: the mesh has axes "
                     f"{mesh.axis_names}, not {axis_name!r}")
  n = mesh.shape[axis_name]
  replicated = NamedSharding(mesh, P())
  sharded = NamedSharding(mesh, P(axis_name))

  def shard_batch(batch):
    flat, treedef = jax.tree_util.tree_flatten_with_path(batch)
    out = []
    for path, x in flat:
      shape = np.shape(x)
      if not shape or shape[0] % n:
        raise ValueError(
            f"make_data_parallel_step: batch leaf "
            f"{jax.tree_util.keystr(path)} has shape {shape}; its leading "
            f"(batch) axis must be divisible by the {n} devices of "
            f"{axis_name!r}")
      out.append(_place(x, sharded))
    return jax.tree.unflatten(treedef, out)

  def init(params):
    opt_state = optimizer.init(params)
    specs = state_specs(opt_state, axis_name)
    local = _map_local(
        lambda x: np.broadcast_to(np.asarray(x)[None], (n,) + np.shape(x)),
        opt_state)
    placed = jax.tree.map(lambda x, s: _place(x, NamedSharding(mesh, s)),
                          local, specs)
    return jax.tree.map(lambda x: _place(x, replicated), params), placed

  def body(params, opt_state, batch):
    opt_state = _map_local(lambda x: x[0], opt_state)
    ef_states = [s for s in jax.tree.leaves(
        opt_state, is_leaf=is_compressing_state) if is_compressing_state(s)]
    varying = jax.lax.pcast(params, axis_name, to="varying")
    loss, grads = jax.value_and_grad(loss_fn)(varying, batch)
    if not ef_states:
      grads = jax.lax.pmean(grads, axis_name)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    new_ef = [s for s in jax.tree.leaves(
        opt_state, is_leaf=is_compressing_state) if is_compressing_state(s)]
    if new_ef:
      ratio = sum(s.local.error_ratio for s in new_ef) / len(new_ef)
      loss, ratio = jax.lax.pmean((loss, ratio), axis_name)
      metrics = {
          "loss": loss, "error_ratio": ratio,
          "bytes_sent": sum(s.wire.sent for s in new_ef),
          "bytes_received": sum(s.wire.received for s in new_ef),
          "bytes_dense": sum(s.wire.dense for s in new_ef) / len(new_ef),
      }
      metrics.update(_format_metrics(new_ef, axis_name))
    else:
      dense = float(sum(wire.ring_all_reduce_bytes(
          x.size * x.dtype.itemsize, n) for x in jax.tree.leaves(grads)))
      dense = jnp.asarray(dense, jnp.float32)
      metrics = {"loss": jax.lax.pmean(loss, axis_name), "bytes_sent": dense,
                 "bytes_received": dense, "bytes_dense": dense}
    opt_state = _map_local(lambda x: x[None], opt_state)
    return params, opt_state, metrics

  jitted = {}  # one jitted step per optimizer-state structure

  def get_jitted(opt_state):
    treedef = jax.tree.structure(opt_state)
    if treedef not in jitted:
      specs = state_specs(opt_state, axis_name)
      mapped = jax.shard_map(
          body, mesh=mesh, in_specs=(P(), specs, P(axis_name)),
          out_specs=(P(), specs, P()), check_vma=True)
      jitted[treedef] = jax.jit(mapped,
                                donate_argnums=(0, 1) if donate else ())
    return jitted[treedef]

  # XLA:CPU runs the devices of one process on a shared thread pool; with
  # several steps in flight their collectives can starve each other and
  # deadlock (seen with 8 fake devices on 2 cores). So on CPU a step waits for
  # the previous one (its inputs) before it is dispatched.
  serialize = any(d.platform == "cpu" for d in mesh.devices.flat)

  def step(params, opt_state, batch):
    if serialize:
      jax.block_until_ready((params, opt_state))
    try:
      return get_jitted(opt_state)(params, opt_state, batch)
    except ValueError as e:
      if "replicated across mesh axis" not in str(e):
        raise
      raise ValueError(
          "make_data_parallel_step: the optimizer's update is not the same on "
          f"every device of {axis_name!r} (check_vma). An error_feedback "
          f"inside the optimizer needs axis_name={axis_name!r}.") from e

  def lower(params, opt_state, batch):
    return get_jitted(opt_state).lower(params, opt_state, batch)

  return DataParallelStep(init, step, shard_batch, n, lower)
