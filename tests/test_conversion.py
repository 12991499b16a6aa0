"""Model-level N:M conversion: layer-input capture, BatchNorm re-estimation, AdaPrune."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_jax import sparsity
from sparse_jax.models import build_model
from sparse_jax.training.conversion import adaprune, layer_inputs, reestimate_batchnorm
from sparse_jax.training.steps import make_apply, split_model


def test_layer_inputs_are_the_true_inputs_in_call_order():
  graphdef, params, ms = split_model(build_model("mlp", (8,), 4, hidden=(16, 12)))
  x = jax.random.normal(jax.random.key(0), (5, 8))
  records = layer_inputs(graphdef, params, ms, x)
  assert [tuple(p) for p, _, _ in records] == [("hidden", 0), ("hidden", 1), ("head",)]
  h0 = jax.nn.relu(x @ params["hidden"][0]["kernel"] + params["hidden"][0]["bias"])
  np.testing.assert_allclose(records[1][2], h0, rtol=1e-5, atol=1e-6)
  # the patch is removed afterwards
  from flax import nnx
  assert "record" not in nnx.Linear.__call__.__qualname__


def test_batchnorm_reestimation_gives_the_calibration_statistics():
  graphdef, params, ms = split_model(build_model("resnet", (8, 8, 1), 10))
  x = 2.0 + 3.0 * jax.random.normal(jax.random.key(1), (64, 8, 8, 1))
  new = reestimate_batchnorm(graphdef, params, ms, x)
  # The stem BatchNorm sees stem(x): its stats must be that tensor's mean/var.
  stem = jax.lax.conv_general_dilated(x, params["stem"]["kernel"], (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(new["stem_bn"]["mean"], stem.mean(axis=(0, 1, 2)),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(new["stem_bn"]["var"], stem.var(axis=(0, 1, 2)),
                             rtol=1e-3, atol=1e-5)
  # The model's momentum is restored (a second call changes nothing structurally).
  assert jax.tree.structure(new) == jax.tree.structure(ms)


def test_adaprune_keeps_the_mask_and_beats_one_shot():
  graphdef, params, ms = split_model(build_model("mlp", (16,), 8, hidden=(32,)))
  # Correlated inputs, as real activations are (for whitened inputs X^T X ~ I and the
  # one-shot mask is already the least-squares optimum, nothing to reconstruct).
  mix = jax.random.normal(jax.random.key(3), (16, 16))
  x = jax.random.normal(jax.random.key(2), (256, 16)) @ mix
  one_shot, masks = sparsity.nm_convert(params, 1, 4,
                                        mask=sparsity.default_filter(4, exclude="head"))
  rebuilt = adaprune(graphdef, params, ms, x, masks, num_steps=1000,
                     learning_rate=1e-3, batch_size=64)
  kernel_mask = masks["hidden"][0]["kernel"]
  assert isinstance(masks["head"]["kernel"], optax.MaskedNode)
  w_dense, w = params["hidden"][0]["kernel"], rebuilt["hidden"][0]["kernel"]
  assert bool(jnp.all(jnp.where(kernel_mask, True, w == 0)))  # zero off the mask
  np.testing.assert_array_equal(rebuilt["head"]["kernel"], params["head"]["kernel"])
  # The layer reaches the exact least-squares minimiser of ||XW - X(S*W')||^2 ...
  err_layer = lambda v: float(sparsity.reconstruction_error(x, w_dense, v))
  optimum = err_layer(sparsity.reconstruct_dense_lstsq(x, w_dense, kernel_mask))
  assert err_layer(w) <= 1.02 * optimum < 0.9 * err_layer(w_dense * kernel_mask)
  # ... and the network's outputs move closer to the dense ones.
  apply = make_apply(graphdef)
  dense_out = apply(params, ms, x, False)[0]
  err = lambda p: float(jnp.mean((apply(p, ms, x, False)[0] - dense_out) ** 2))
  assert err(rebuilt) < 0.8 * err(one_shot)


def test_parse_pattern():
  from sparse_jax.training.conversion import parse_pattern
  assert parse_pattern("2:4") == (2, 4, False)
  assert parse_pattern("T-4:8") == (4, 8, True)
  with pytest.raises(ValueError, match="config.convert.patterns"):
    parse_pattern("2-4")
