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


IMAGE_MODELS = sorted(set(MODELS) - {"char_transformer"})


@pytest.mark.parametrize("name", IMAGE_MODELS)
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


def test_char_transformer_is_causal_and_checks_its_shape():
  model = build_model("char_transformer", (12,), 128, dim=32, heads=4, depth=2,
                      mlp_dim=64, seed=1)
  x = jax.random.randint(jax.random.key(0), (2, 12), 0, 128).astype(jnp.float32)
  logits = model(x)
  assert logits.shape == (2, 12, 128)
  changed = x.at[:, 7:].set((x[:, 7:] + 1) % 128)   # change the future only
  later = model(changed)
  np.testing.assert_allclose(later[:, :7], logits[:, :7], atol=1e-5)
  assert not np.allclose(later[:, 7:], logits[:, 7:])
  assert model(x[:, :5]).shape == (2, 5, 128)         # shorter sequences work
  with pytest.raises(ValueError, match="seq_len"):
    build_model("char_transformer", (8, 8, 1), 10)
  with pytest.raises(ValueError, match="not divisible by heads"):
    build_model("char_transformer", (8,), 10, dim=30, heads=4)
