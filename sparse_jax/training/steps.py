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

from sparse_jax.training.config import INITS

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


def initial_params(params: PyTree, config) -> PyTree:
  """The step-0 params for ``config.train.init``.

  ``"default"``: the model's own initialisation (Flax lecun-normal kernels,
  zero biases). ``"alpha_split"``: the FOO-VB papers' initialisation
  (:func:`sparse_jax.bayes.alpha_split_init`: kernel and bias means of each
  Kronecker group drawn N(0, 2 alpha / (fan_in + 2)), ``alpha`` from
  ``config.optimizer.kwargs``, default 0.5), drawn from ``config.seed``.
  """
  init = config.train.get("init", "default")
  if init == "default":
    return params
  if init != "alpha_split":
    raise ValueError(f"config.train.init must be one of {INITS}, got {init!r}")
  from sparse_jax.bayes import alpha_split_init
  kwargs = dict(config.optimizer.get("kwargs", None) or {})
  # Its own stream: FOO-VB's noise key also comes from config.seed.
  key = jax.random.fold_in(jax.random.key(int(config.seed)), 0x5EED)
  return alpha_split_init(params, key, alpha=float(kwargs.get("alpha", 0.5)))


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


def make_loss_fn(graphdef: nnx.GraphDef, *, reduction: str = "mean",
                 forward: Callable[[PyTree], PyTree] | None = None):
  """``loss_fn(params, model_state, x, y, logit_mask=None) -> (loss, aux)``.

  ``forward`` maps the stored params to the weights the forward pass uses (e.g. the
  N:M-masked weights of STE, whose gradient passes straight through).

  Softmax cross-entropy, reduced by ``reduction`` ("mean", or "sum": the summed batch
  loss of online Bayesian methods). ``logit_mask`` (num_classes bools) restricts the
  softmax to some classes (multi-head / task-incremental training).
  ``aux = (new_model_state, mean loss, accuracy)``.
  """
  if reduction not in ("mean", "sum"):
    raise ValueError(f"loss reduction {reduction!r} must be 'mean' or 'sum'")
  apply = make_apply(graphdef)

  def loss_fn(params, model_state, x, y, logit_mask=None):
    weights = params if forward is None else forward(params)
    logits, new_model_state = apply(weights, model_state, x, True)
    if logit_mask is not None:
      logits = jnp.where(logit_mask, logits, -1e9)
    losses = cross_entropy(logits, y)
    loss = losses.mean() if reduction == "mean" else losses.sum()
    accuracy = (logits.argmax(-1) == y).mean()
    return loss, (new_model_state, losses.mean(), accuracy)

  return loss_fn


def make_standard_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                       *, loss_reduction: str = "mean",
                       penalty: Callable[[PyTree], jax.Array] | None = None,
                       forward: Callable[[PyTree], PyTree] | None = None,
                       forward_until: int | None = None):
  """Builds the supervised train step ``step(state, x, y) -> (state, metrics)``.

  Args:
    graphdef: the model's static graph from :func:`split_model`.
    tx: the optax transformation; it receives ``params`` as extra argument, so
      projections and masks that need the current weights work.
    loss_reduction: "mean" (the usual) or "sum" of the per-example cross-entropy.
    penalty: optional ``penalty(params) -> scalar`` added to the loss (e.g. EWC);
      the step then takes its pytree argument as ``step(state, x, y, penalty_args)``
      and calls ``penalty(params, penalty_args)``.
    forward: optional map from the stored params to the forward-pass weights
      (see :func:`make_loss_fn`).
    forward_until: apply ``forward`` only while ``state.step`` is below this
      (dense fine-tuning after it); None: always.

  Returns:
    A pure function; jit it (the loop does, donating the state).
  """

  def step(state: TrainState, x: jax.Array, y: jax.Array, penalty_args=None,
           logit_mask=None):
    fwd = forward
    if forward is not None and forward_until is not None:
      sparse_phase = state.step < forward_until
      fwd = lambda p: jax.lax.cond(sparse_phase, forward, lambda q: q, p)  # noqa: E731
    loss_fn = make_loss_fn(graphdef, reduction=loss_reduction, forward=fwd)

    def total_loss(params, model_state, x, y, logit_mask, penalty_args):
      loss, aux = loss_fn(params, model_state, x, y, logit_mask)
      if penalty is not None:
        loss = loss + penalty(params, penalty_args)
      return loss, aux

    grads, (model_state, loss, accuracy) = jax.grad(total_loss, has_aux=True)(
        state.params, state.model_state, x, y, logit_mask, penalty_args)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = TrainState(step=state.step + 1, params=params,
                           model_state=model_state, opt_state=opt_state)
    return new_state, {"loss": loss, "accuracy": accuracy}

  return step


def make_eval_step(graphdef: nnx.GraphDef, *,
                   forward: Callable[[PyTree], PyTree] | None = None):
  """``eval_step(params, model_state, x, y, valid, logit_mask=None) -> sums``.

  Returns ``{loss_sum, correct, count}``. ``valid`` masks padding rows, so every eval
  batch can have the same shape; ``logit_mask`` restricts the prediction to some
  classes (task-incremental evaluation). ``forward`` as in :func:`make_loss_fn`: the
  model is evaluated with the weights it trains with.
  """
  apply = make_apply(graphdef)

  def eval_step(params, model_state, x, y, valid, logit_mask=None):
    weights = params if forward is None else forward(params)
    logits, _ = apply(weights, model_state, x, False)
    if logit_mask is not None:
      logits = jnp.where(logit_mask, logits, -1e9)
    # one weight per label: per example, or per position of a sequence task
    valid = jnp.broadcast_to(valid.reshape(valid.shape + (1,) * (y.ndim - 1)),
                             y.shape).astype(jnp.float32)
    return {"loss_sum": (cross_entropy(logits, y) * valid).sum(),
            "correct": ((logits.argmax(-1) == y) * valid).sum(),
            "count": valid.sum()}

  return eval_step


def evaluate(eval_step, params: PyTree, model_state: PyTree, x, y, *,
             batch_size: int = 1000, logit_mask=None) -> dict[str, float]:
  """Loss and accuracy over a whole split, in padded fixed-size batches.

  Args:
    eval_step: a jitted function from :func:`make_eval_step`.
    params: model parameters.
    model_state: non-trainable model state.
    x: inputs (host numpy array).
    y: labels.
    batch_size: evaluation batch size (the split is padded to a multiple).
    logit_mask: optional class mask passed to ``eval_step``.

  Returns:
    ``{"loss": mean loss, "accuracy": fraction correct}`` (per label: per
    position for sequence labels ``(N, T)``).
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
      yb = np.concatenate([yb, np.zeros((pad,) + yb.shape[1:], yb.dtype)])
    out = eval_step(params, model_state, xb, yb, valid, logit_mask)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  return {"loss": float(totals["loss_sum"] / totals["count"]),
          "accuracy": float(totals["correct"] / totals["count"])}
