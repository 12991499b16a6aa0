"""Models: every model on every input shape, Flax kernel layouts, BatchNorm modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_jax.models import MODELS, build_model
from sparse_jax.training.steps import make_apply, split_model

SHAPES = [(8, 8, 1), (28, 28, 1), (32, 32, 3)]


def _kwargs(name, shape):
  return {"patch": 2 if shape[0] == 8 else 4} if name == "vit" else {}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_shapes(name, shape):
  model = build_model(name, shape, 10, **_kwargs(name, shape))
  x = jax.random.normal(jax.random.key(0), (3,) + shape)
  for train in (True, False):
    logits = model(x, train=train)
    assert logits.shape == (3, 10)
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_kernel_layouts():
  mlp = nnx.to_pure_dict(nnx.state(build_model("mlp", (8, 8, 1), 10, hidden=(32,)),
                                   nnx.Param))
  assert mlp["hidden"][0]["kernel"].shape == (64, 32)  # Dense (in, out)
  assert mlp["head"]["kernel"].shape == (32, 10)
  cnn = nnx.to_pure_dict(nnx.state(build_model("cnn", (8, 8, 3), 10, features=(5,)),
                                   nnx.Param))
  assert cnn["convs"][0]["kernel"].shape == (3, 3, 3, 5)  # Conv HWIO
  vit = nnx.to_pure_dict(nnx.state(build_model("vit", (8, 8, 1), 10, dim=16, heads=2),
                                   nnx.Param))
  assert vit["blocks"][0]["attn"]["query"]["kernel"].shape == (16, 2, 8)


def test_batchnorm_stats_update_only_in_train_mode():
  model = build_model("resnet", (8, 8, 1), 10)
  graphdef, params, state = split_model(model)
  apply = make_apply(graphdef)
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1)) + 3.0
  _, after_eval = apply(params, state, x, False)
  _, after_train = apply(params, state, x, True)
  same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), state, after_eval)
  assert all(jax.tree.leaves(same))
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state, after_train)
  assert all(jax.tree.leaves(changed))


def test_same_seed_same_init_and_unknown_model():
  a = split_model(build_model("mlp", (8, 8, 1), 10, seed=3))[1]
  b = split_model(build_model("mlp", (8, 8, 1), 10, seed=3))[1]
  c = split_model(build_model("mlp", (8, 8, 1), 10, seed=4))[1]
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, a, c)))
  with pytest.raises(ValueError, match="config.model.name='mpl'"):
    build_model("mpl", (8, 8, 1), 10)
