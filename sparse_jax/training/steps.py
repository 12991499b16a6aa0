"""Pure, jittable train and eval steps over ``nnx.split`` model state.

The model is split once into a static ``graphdef``, the trainable ``params`` and the
rest (``model_state``: BatchNorm statistics ...), both as plain nested dicts. A step is
a pure function of a :class:`TrainState` and a batch, so it jits, checkpoints and
resumes exactly.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

PyTree = Any


class TrainState(NamedTuple):
  """Everything a run needs to continue: saved and restored as one pytree."""
  step: jax.Array
  params: PyTree
  model_state: PyTree
  opt_state: PyTree


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, PyTree, PyTree]:
  """Splits an NNX model into ``(graphdef, params, model_state)`` plain dicts."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def make_apply(graphdef: nnx.GraphDef) -> Callable[..., tuple[jax.Array, PyTree]]:
  """``apply(params, model_state, x, train) -> (logits, new_model_state)``, pure."""

  def apply(params, model_state, x, train):
    model = nnx.merge(graphdef, params, model_state)
    logits = model(x, train=train)
    _, _, rest = nnx.split(model, nnx.Param, ...)
    return logits, nnx.to_pure_dict(rest)

  return apply


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def init_train_state(params: PyTree, model_state: PyTree,
                     tx: optax.GradientTransformation) -> TrainState:
  """A step-0 :class:`TrainState`."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    model_state=model_state, opt_state=tx.init(params))


def make_standard_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                       *, loss_reduction: str = "mean"):
  """Builds the supervised train step ``step(state, x, y) -> (state, metrics)``.

  Args:
    graphdef: the model's static graph from :func:`split_model`.
    tx: the optax transformation; it receives ``params`` as extra argument, so
      projections and masks that need the current weights work.
    loss_reduction: "mean" (the usual) or "sum" (the summed batch loss of online
      Bayesian methods) of the per-example cross-entropy.

  Returns:
    A pure function; jit it (the loop does, donating the state).
  """
  apply = make_apply(graphdef)
  if loss_reduction not in ("mean", "sum"):
    raise ValueError(f"loss_reduction={loss_reduction!r} must be 'mean' or 'sum'")

  def loss_fn(params, model_state, x, y):
    logits, new_model_state = apply(params, model_state, x, True)
    losses = cross_entropy(logits, y)
    loss = losses.mean() if loss_reduction == "mean" else losses.sum()
    accuracy = (logits.argmax(-1) == y).mean()
    return loss, (new_model_state, losses.mean(), accuracy)

  def step(state: TrainState, x: jax.Array, y: jax.Array):
    grads, (model_state, loss, accuracy) = jax.grad(loss_fn, has_aux=True)(
        state.params, state.model_state, x, y)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = TrainState(step=state.step + 1, params=params,
                           model_state=model_state, opt_state=opt_state)
    return new_state, {"loss": loss, "accuracy": accuracy}

  return step


def make_eval_step(graphdef: nnx.GraphDef):
  """``eval_step(params, model_state, x, y, valid) -> {loss_sum, correct, count}``.

  ``valid`` masks padding rows, so every eval batch can have the same shape.
  """
  apply = make_apply(graphdef)

  def eval_step(params, model_state, x, y, valid):
    logits, _ = apply(params, model_state, x, False)
    valid = valid.astype(jnp.float32)
    return {"loss_sum": (cross_entropy(logits, y) * valid).sum(),
            "correct": ((logits.argmax(-1) == y) * valid).sum(),
            "count": valid.sum()}

  return eval_step


def evaluate(eval_step, params: PyTree, model_state: PyTree, x, y, *,
             batch_size: int = 1000) -> dict[str, float]:
  """Loss and accuracy over a whole split, in padded fixed-size batches.

  Args:
    eval_step: a jitted function from :func:`make_eval_step`.
    params: model parameters.
    model_state: non-trainable model state.
    x: inputs (host numpy array).
    y: labels.
    batch_size: evaluation batch size (the split is padded to a multiple).

  Returns:
    ``{"loss": mean loss, "accuracy": fraction correct}``.
  """
  import numpy as np

  n = len(x)
  batch_size = min(batch_size, n)
  totals = None
  for start in range(0, n, batch_size):
    xb, yb = x[start:start + batch_size], y[start:start + batch_size]
    valid = np.ones(batch_size, bool)
    if len(xb) < batch_size:
      pad = batch_size - len(xb)
      valid[len(xb):] = False
      xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
      yb = np.concatenate([yb, np.zeros((pad,), yb.dtype)])
    out = eval_step(params, model_state, xb, yb, valid)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  return {"loss": float(totals["loss_sum"] / totals["count"]),
          "accuracy": float(totals["correct"] / totals["count"])}
