"""A FOO-VB training step: K sampled gradients, the update, BatchNorm statistics.

BatchNorm recipe (what :func:`foovb_step` does when given ``model_state``):
the K sampled forward passes run in train mode (each normalises with its own
batch statistics) but their updates of the running statistics are DISCARDED;
after the update, ONE forward pass with the new posterior mean updates the
running statistics. So the statistics track the mean network, exactly as if it
had been trained deterministically, and the K perturbed networks never leak
into them. With an NNX model split into plain dicts (so that the Variables are
created inside the traced loss)::

    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    model_state = nnx.to_pure_dict(model_state)

    def loss_fn(params, model_state, x, y):
      model = nnx.merge(graphdef, params, model_state)
      logits = model(x, train=True)
      new_model_state = nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()
      return loss, new_model_state

    params, opt_state, model_state, loss = foovb_step(
        tx, loss_fn, params, opt_state, x, y, num_samples=K,
        model_state=model_state)

References:
  Zeno et al., https://arxiv.org/abs/2010.00373 (training procedure)
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from sparse_jax.bayes.transform import foovb_sample

PyTree = Any


def sample_gradients(loss_fn: Callable[..., Any], samples: PyTree, *args: Any,
                     has_aux: bool = False) -> Any:
  """Gradients of ``loss_fn`` at each of K samples: ``vmap(grad(loss_fn))``.

  Args:
    loss_fn: ``(params, *args) -> scalar`` (or ``(scalar, aux)`` with
      ``has_aux``).
    samples: params tree with a leading axis K (from :func:`foovb_sample`).
    *args: batch data etc., shared by all samples (not mapped).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    ``(losses, grads)`` or ``((losses, aux), grads)``: each leaf with a leading
    axis K.

  Example:
    >>> loss_fn = lambda p, x: jnp.sum(p["w"] * x)
    >>> _, g = sample_gradients(loss_fn, {"w": jnp.zeros((4, 3))}, jnp.ones(3))
    >>> g["w"].shape
    (4, 3)
  """
  in_axes = (0,) + (None,) * len(args)
  fn = jax.value_and_grad(loss_fn, has_aux=has_aux)
  return jax.vmap(fn, in_axes=in_axes)(samples, *args)


def foovb_step(tx: optax.GradientTransformation, loss_fn: Callable[..., Any],
               params: PyTree, opt_state: PyTree, *args: Any, num_samples: int,
               iterations: int = 1, model_state: PyTree = None,
               ) -> tuple[PyTree, PyTree, PyTree, jax.Array]:
  """One training step on one batch (``iterations`` FOO-VB updates on it).

  Each iteration draws K samples from the current posterior, takes the
  gradients there and applies ``tx``; use ``iterations = n`` with
  ``foovb(fixed_point_iterations=n)`` (the prior of the n updates is the
  posterior at the start of the batch).

  Args:
    tx: a transformation containing :func:`sparse_jax.bayes.foovb`.
    loss_fn: ``(params, *args) -> summed loss``; with ``model_state``:
      ``(params, model_state, *args) -> (summed loss, new model_state)``.
    params: the posterior mean you hold.
    opt_state: ``tx``'s state.
    *args: the batch (passed unchanged to ``loss_fn``).
    num_samples: K (the transform's ``num_samples``).
    iterations: updates on this batch (a Python int >= 1).
    model_state: non-trainable model state (BatchNorm statistics) or None; see
      the module docstring for what happens to it.

  Returns:
    ``(params, opt_state, model_state, loss)``, ``loss`` being the mean over
    the K samples of the last iteration.

  Example:
    >>> from sparse_jax.bayes.transform import foovb
    >>> tx = foovb(num_samples=2)
    >>> params = {"w": jnp.zeros(3)}
    >>> loss_fn = lambda p, y: jnp.sum((p["w"] - y) ** 2)
    >>> params, state, _, loss = foovb_step(tx, loss_fn, params, tx.init(params),
    ...                                     jnp.ones(3), num_samples=2)
    >>> params["w"].shape
    (3,)
  """
  if not isinstance(iterations, int) or iterations < 1:
    raise ValueError(f"foovb_step: iterations must be a Python int >= 1, got "
                     f"{iterations!r}.")
  with_state = model_state is not None

  def one(carry, _):
    params, opt_state = carry
    samples = foovb_sample(opt_state, num_samples)
    if with_state:
      (losses, _), grads = sample_gradients(loss_fn, samples, model_state,
                                            *args, has_aux=True)
    else:
      losses, grads = sample_gradients(loss_fn, samples, *args)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), losses.mean()

  if iterations == 1:
    (params, opt_state), loss = one((params, opt_state), None)
  else:
    (params, opt_state), losses = jax.lax.scan(
        one, (params, opt_state), None, length=iterations)
    loss = losses[-1]
  if with_state:
    _, model_state = loss_fn(params, model_state, *args)
  return params, opt_state, model_state, loss
