"""The optax chain built from a declarative spec."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_jax.training.optim import (TRANSFORMS, build_optimizer, make_schedule,
                                       register_transform)


def _spec(**kw):
  spec = dict(name="sgd", learning_rate=0.1, schedule="constant", kwargs={}, pre=(),
              post=())
  spec.update(kw)
  return spec


def test_base_optimizer_matches_optax():
  params = {"w": jnp.array([1.0, -2.0])}
  grads = {"w": jnp.array([0.5, 0.25])}
  tx = build_optimizer(_spec(name="adam", learning_rate=0.01), 10)
  ref = optax.adam(0.01)
  u, _ = tx.update(grads, tx.init(params), params)
  r, _ = ref.update(grads, ref.init(params), params)
  np.testing.assert_allclose(u["w"], r["w"])


def test_pre_and_post_order():
  params = {"w": jnp.zeros(2)}
  grads = {"w": jnp.array([3.0, 4.0])}  # norm 5
  tx = build_optimizer(_spec(pre=({"name": "optax.clip_by_global_norm", "max_norm": 1.0},),
                             post=({"name": "optax.scale", "step_size": 2.0},)), 10)
  u, _ = tx.update(grads, tx.init(params), params)
  # clip to norm 1 -> sgd(0.1) -> x2
  np.testing.assert_allclose(u["w"], -0.2 * np.array([0.6, 0.8]), rtol=1e-6)


def test_registered_transform_receives_context():
  seen = {}

  @register_transform("_test_probe")
  def _probe(ctx, factor):
    seen["num_steps"] = ctx.num_steps
    seen["lr0"] = float(ctx.learning_rate(0))
    return optax.scale(factor)

  try:
    build_optimizer(_spec(post=({"name": "_test_probe", "factor": 3.0},)), 77)
    assert seen == {"num_steps": 77, "lr0": pytest.approx(0.1)}
    with pytest.raises(ValueError, match="already registered"):
      register_transform("_test_probe")(_probe)
  finally:
    TRANSFORMS.pop("_test_probe", None)


def test_bad_specs_name_the_field():
  with pytest.raises(ValueError, match=r"config.optimizer.post\[0\]: unknown transform"):
    build_optimizer(_spec(post=({"name": "nope"},)), 10)
  with pytest.raises(ValueError, match="config.optimizer.name='adamm' is neither"):
    build_optimizer(_spec(name="adamm"), 10)
  with pytest.raises(ValueError, match="config.optimizer.schedule"):
    build_optimizer(_spec(schedule="exp"), 10)
  with pytest.raises(ValueError, match="learning_rate"):
    build_optimizer(_spec(learning_rate=0.0), 10)


@pytest.mark.parametrize("kind,at_end", [("constant", 0.1), ("cosine", 0.0),
                                         ("linear", 0.0), ("warmup_cosine", 0.0)])
def test_schedules(kind, at_end):
  sched = make_schedule(_spec(schedule=kind, warmup_steps=10), 100)
  assert float(sched(100)) == pytest.approx(at_end, abs=1e-7)
  if kind == "warmup_cosine":
    assert float(sched(0)) == 0.0 and float(sched(10)) == pytest.approx(0.1)
  step = make_schedule(_spec(schedule="step", decay_steps=10, decay_factor=0.5), 100)
  assert float(step(25)) == pytest.approx(0.025)


def test_forward_transform_is_used_in_train_and_eval():
  import jax
  from sparse_jax.models import build_model
  from sparse_jax.training.optim import FORWARD_TRANSFORMS, build_forward, register_forward
  from sparse_jax.training.steps import (init_train_state, make_eval_step,
                                         make_standard_step, split_model)

  @register_forward("_test_zero_head")
  def _zero_head(scale):
    def forward(params):
      head = dict(params["head"], kernel=params["head"]["kernel"] * scale)
      return dict(params, head=head)
    return forward

  try:
    forward = build_forward([{"name": "_test_zero_head", "scale": 0.0}])
    graphdef, params, ms = split_model(build_model("mlp", (4,), 3, hidden=(5,)))
    params["head"]["bias"] = jnp.array([0.0, 5.0, 0.0])
    x, y = jnp.ones((2, 4)), jnp.array([1, 1])
    out = make_eval_step(graphdef, forward=forward)(params, ms, x, y, jnp.ones(2, bool))
    assert float(out["correct"]) == 2.0  # only the bias speaks: class 1
    tx = optax.sgd(1.0)
    step = make_standard_step(graphdef, tx, forward=forward)
    new, _ = step(init_train_state(params, ms, tx), x, y)
    # The gradient w.r.t. the stored head kernel is scale * (upstream): zero here.
    np.testing.assert_array_equal(new.params["head"]["kernel"], params["head"]["kernel"])
    assert build_forward(()) is None
    with pytest.raises(ValueError, match=r"config.train.forward\[0\]"):
      build_forward([{"name": "nope"}])
  finally:
    FORWARD_TRANSFORMS.pop("_test_zero_head", None)


def test_random_transforms_take_their_key_from_the_seed():
  """Two seeds must not share FOO-VB's (or a random compressor's) noise."""
  from sparse_jax.bayes import find_foovb_state
  spec = dict(name="foovb", learning_rate=1.0, schedule="constant",
              kwargs=dict(covariance="diagonal", num_samples=2), pre=(), post=())
  params = {"dense": {"kernel": jnp.ones((3, 2))}}
  key = lambda spec, seed: np.asarray(find_foovb_state(
      build_optimizer(spec, 10, seed=seed).init(params)).key)
  assert not np.array_equal(key(spec, 0), key(spec, 1))
  pinned = dict(spec, kwargs=dict(spec["kwargs"], key=7))   # an explicit key wins
  np.testing.assert_array_equal(key(pinned, 0), key(pinned, 1))
  ef = dict(name="sgd", learning_rate=0.1, schedule="constant", pre=(dict(
      name="error_feedback", compressor="rand_k",
      compressor_kwargs=dict(fraction=0.5)),), post=())
  states = [build_optimizer(ef, 10, seed=s).init(params)[0] for s in (0, 1)]
  assert not np.array_equal(states[0].key, states[1].key)


def test_runner_seeds_the_noise_and_the_papers_init():
  from sparse_jax.bayes import find_foovb_state
  from sparse_jax.training.config import base_config
  from sparse_jax.training.loop import build_run

  def config(seed, init="default"):
    c = base_config()
    c.seed, c.train.step, c.train.init = seed, "foovb", init
    c.optimizer.name = "foovb"
    c.optimizer.kwargs = dict(covariance="kron", num_samples=2, alpha=0.5)
    return c

  states = [build_run(config(s))[3] for s in (0, 1)]
  keys = [np.asarray(find_foovb_state(s.opt_state).key) for s in states]
  assert not np.array_equal(*keys)
  default = build_run(config(0))[3].params
  paper = build_run(config(0, "alpha_split"))[3].params
  kernel, bias = paper["hidden"][0]["kernel"], paper["hidden"][0]["bias"]
  fan_in = kernel.shape[0]
  assert np.std(kernel) == pytest.approx(np.sqrt(2 * 0.5 / (fan_in + 2)), rel=0.05)
  assert np.std(bias) > 0 and np.all(default["hidden"][0]["bias"] == 0)
