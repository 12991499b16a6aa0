"""Tests for one-shot N:M conversion and layer-wise reconstruction."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sparse_jax.masks import nm_mask, transposable_nm_mask
from sparse_jax.sparsity import (conv_apply, default_filter, nm_convert,
                                 reconstruct_dense_lstsq, reconstruct_layer,
                                 reconstruction_error)


def test_nm_convert_plain_and_transposable():
  rng = np.random.default_rng(0)
  params = {"stem": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 3, 8)))},
            "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 8, 8)))},
            "head": {"kernel": jnp.asarray(rng.normal(size=(8, 4))),
                     "bias": jnp.ones(4)}}
  sparse, masks = nm_convert(params, 2, 4)
  for name in ("conv", "head"):
    w = params[name]["kernel"]
    np.testing.assert_array_equal(np.asarray(masks[name]["kernel"]),
                                  np.asarray(nm_mask(w, 2, 4)))
    np.testing.assert_array_equal(np.asarray(sparse[name]["kernel"]),
                                  np.asarray(jnp.where(nm_mask(w, 2, 4), w, 0)))
  # the stem (3 input channels) and the bias stay dense and unmasked
  assert isinstance(masks["stem"]["kernel"], optax.MaskedNode)
  assert isinstance(masks["head"]["bias"], optax.MaskedNode)
  np.testing.assert_array_equal(np.asarray(sparse["stem"]["kernel"]),
                                np.asarray(params["stem"]["kernel"]))
  # transposable, with the head kept dense by an exclude rule
  sparse, masks = nm_convert(params, 2, 4, transposable=True,
                             mask=default_filter(4, transposable=True,
                                                 exclude="head"))
  np.testing.assert_array_equal(
      np.asarray(masks["conv"]["kernel"]),
      np.asarray(transposable_nm_mask(params["conv"]["kernel"], 2, 4)))
  assert isinstance(masks["head"]["kernel"], optax.MaskedNode)
  np.testing.assert_array_equal(np.asarray(sparse["head"]["kernel"]),
                                np.asarray(params["head"]["kernel"]))


def problem(seed=0, n_samples=400, d_in=16, d_out=8):
  rng = np.random.default_rng(seed)
  # correlated inputs: reconstruction has something to exploit.
  mix = rng.normal(size=(d_in, d_in)) / np.sqrt(d_in) + np.eye(d_in)
  x = jnp.asarray(rng.normal(size=(n_samples, d_in)) @ mix, jnp.float32)
  w = jnp.asarray(rng.normal(size=(d_in, d_out)), jnp.float32)
  return x, w, nm_mask(w, 2, 4)


def test_lstsq_matches_per_column_least_squares():
  x, w, mask = problem(1)
  got = np.asarray(reconstruct_dense_lstsq(x, w, mask, ridge=0.0))
  xn, wn, mk = np.asarray(x, np.float64), np.asarray(w, np.float64), np.asarray(
      mask)
  for j in range(w.shape[1]):
    keep = mk[:, j]
    sol, *_ = np.linalg.lstsq(xn[:, keep], xn @ wn[:, j], rcond=None)
    np.testing.assert_allclose(got[keep, j], sol, rtol=2e-3, atol=2e-3)
    assert np.all(got[~keep, j] == 0)


def test_adaprune_reaches_the_least_squares_optimum():
  x, w, mask = problem(2)
  one_shot = jnp.where(mask, w, 0)
  refit = jax.jit(lambda x, w, s: reconstruct_layer(
      x, w, s, num_steps=600, learning_rate=1e-2, batch_size=64))(x, w, mask)
  assert np.all(np.asarray(refit)[~np.asarray(mask)] == 0)
  e_one = float(reconstruction_error(x, w, one_shot))
  e_ada = float(reconstruction_error(x, w, refit))
  e_opt = float(reconstruction_error(x, w, reconstruct_dense_lstsq(x, w, mask)))
  assert e_opt < 0.7 * e_one
  assert e_opt - 1e-4 <= e_ada <= 1.02 * e_opt  # Adam reaches the optimum
  # a different optimizer can be passed
  refit2 = reconstruct_layer(x, w, mask, num_steps=50,
                             optimizer=optax.sgd(1e-2), key=jax.random.key(3))
  assert float(reconstruction_error(x, w, refit2)) < e_one


def test_adaprune_on_a_conv_layer():
  rng = np.random.default_rng(4)
  conv = nnx.Conv(8, 8, (3, 3), strides=2, use_bias=False, rngs=nnx.Rngs(0))
  mix = rng.normal(size=(8, 8)) / np.sqrt(8) + np.eye(8)  # correlated channels
  x = jnp.asarray(rng.normal(size=(24, 6, 6, 8)) @ mix, jnp.float32)
  apply = conv_apply(strides=2)
  # conv_apply reproduces the Flax Conv (HWIO kernel, NHWC, SAME)
  np.testing.assert_allclose(np.asarray(apply(conv.kernel[...], x)),
                             np.asarray(conv(x)), rtol=1e-5, atol=1e-5)
  w = conv.kernel[...]
  mask = nm_mask(w, 2, 4)
  refit = reconstruct_layer(x, w, mask, apply_fn=apply, num_steps=300,
                            learning_rate=1e-2, batch_size=8)
  e_one = float(reconstruction_error(x, w, jnp.where(mask, w, 0),
                                     apply_fn=apply))
  e_ada = float(reconstruction_error(x, w, refit, apply_fn=apply))
  assert e_ada < 0.6 * e_one
  assert np.all(np.asarray(refit)[~np.asarray(mask)] == 0)


def test_bad_arguments():
  x, w, mask = problem(5)
  with pytest.raises(ValueError, match="mask shape"):
    reconstruct_layer(x, w, mask[:4])
  with pytest.raises(ValueError, match="num_steps must be a positive int"):
    reconstruct_layer(x, w, mask, num_steps=0)
  with pytest.raises(ValueError, match=r"need x \(N, in\)"):
    reconstruct_dense_lstsq(x[:, :4], w, mask)
  with pytest.raises(ValueError, match=r"\['k'\].*\(6, 4\)"):
    nm_convert({"k": jnp.ones((6, 4))}, 2, 4, mask={"k": True})


def test_conv_apply_paddings_match_flax():
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(2, 7, 7, 4)), jnp.float32)
  for padding in ("VALID", 1, ((1, 2), (0, 1)), [2, 1]):
    conv = nnx.Conv(4, 8, (3, 3), padding=padding, use_bias=False,
                    rngs=nnx.Rngs(1))
    got = conv_apply(padding=padding)(conv.kernel[...], x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(conv(x)),
                               rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="not supported"):
    conv_apply(padding="CIRCULAR")(conv.kernel[...], x)
