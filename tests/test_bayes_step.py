"""The FOO-VB training step: BatchNorm statistics and fixed-point iterations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sparse_jax.bayes.transform import foovb, foovb_sample
from sparse_jax.bayes.step import foovb_step, sample_gradients

K = 3


class _BNNet(nnx.Module):
  """Dense -> BatchNorm -> ReLU -> Dense: the smallest model with batch statistics."""

  def __init__(self, rngs):
    self.dense1 = nnx.Linear(5, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
    self.dense2 = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x, *, train):
    return self.dense2(jax.nn.relu(self.bn(self.dense1(x),
                                           use_running_average=not train)))


def _model():
  graphdef, params, rest = nnx.split(_BNNet(nnx.Rngs(0)), nnx.Param, ...)
  # Plain dicts: NNX Variables created inside the traced loss, as in training.
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def _loss_fn(graphdef):
  def loss_fn(params, model_state, x, y):
    model = nnx.merge(graphdef, params, model_state)
    logits = model(x, train=True)
    new_state = nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()
    return loss, new_state
  return loss_fn


def _max_abs_diff(a, b):
  return max(jax.tree.leaves(jax.tree.map(lambda u, v: float(jnp.abs(u - v).max()),
                                          a, b)))


def test_batch_stats_follow_the_mean_network_only():
  graphdef, params, model_state = _model()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(6, 5)) + 2.0, jnp.float32)
  y = jnp.asarray(rng.integers(0, 4, size=6))
  loss_fn = _loss_fn(graphdef)
  tx = foovb(num_samples=K, init_std=0.05)
  opt_state = tx.init(params)

  @jax.jit
  def run(params, opt_state, model_state):
    new_params, _, new_state, loss = foovb_step(
        tx, loss_fn, params, opt_state, x, y, num_samples=K,
        model_state=model_state)
    # one train-mode pass of the NEW MEAN network from the old statistics
    _, want = loss_fn(new_params, model_state, x, y)
    samples = foovb_sample(opt_state, K)
    per_sample = [loss_fn(jax.tree.map(lambda s: s[k], samples), model_state, x, y)[1]
                  for k in range(K)]
    (_, _), grads = sample_gradients(loss_fn, samples, model_state, x, y,
                                     has_aux=True)
    updates, _ = tx.update(grads, opt_state, params)
    return (new_params, new_state, loss, want, per_sample,
            optax.apply_updates(params, updates))

  new_params, new_state, loss, want, per_sample, manual = run(
      params, opt_state, model_state)
  assert np.isfinite(float(loss))
  # The statistics are those of ONE train-mode pass of the new mean network ...
  assert _max_abs_diff(new_state, want) < 1e-6
  # ... they did change (so the check above is not vacuous) ...
  assert _max_abs_diff(new_state, model_state) > 1e-3
  # ... and no sampled network leaked into them.
  for leaked in per_sample:
    assert _max_abs_diff(leaked, new_state) > 1e-6
  # The update itself is the plain FOO-VB update on the sampled gradients.
  assert _max_abs_diff(manual, new_params) < 1e-5


def test_step_iterations_equal_manual_loop():
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
  target = jnp.asarray(rng.normal(size=(4,)), jnp.float32)
  loss_fn = lambda p, t: 2.0 * jnp.sum((p["w"] - t) ** 2)
  tx = foovb(num_samples=K, fixed_point_iterations=3, damping=0.5, init_std=0.2)
  opt_state = tx.init(params)
  p1, s1, none, _ = jax.jit(lambda p, s: foovb_step(
      tx, loss_fn, p, s, target, num_samples=K, iterations=3))(params, opt_state)
  assert none is None
  p2, s2 = params, opt_state
  for _ in range(3):
    _, grads = sample_gradients(loss_fn, foovb_sample(s2, K), target)
    updates, s2 = tx.update(grads, s2, p2)
    p2 = optax.apply_updates(p2, updates)
  np.testing.assert_allclose(p1["w"], p2["w"], rtol=1e-5)
  np.testing.assert_allclose(s1.std["w"], s2.std["w"], rtol=1e-5)
  assert int(s1.count) == 3
  # after a full cycle the anchor (the batch prior) is the new posterior
  np.testing.assert_array_equal(s1.anchor.std["w"], s1.std["w"])
