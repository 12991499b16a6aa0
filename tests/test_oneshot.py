"""Wanda and SparseGPT (sparse_jax.sparsity.oneshot) against their math."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_jax.masks import is_nm_sparse, nm_mask
from sparse_jax.sparsity import conv_apply
from sparse_jax.sparsity.oneshot import (input_norms, patch_matrix, sparsegpt,
                                         wanda_scores)


def _correlated(rng, n, d):
  """Inputs with correlated features (where OBS updates matter)."""
  mix = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
  return (rng.normal(size=(n, d)) @ mix).astype(np.float32)


def _brute_force_sparsegpt(w, x, n, m, damp, mask=None):
  """Algorithm 1 with explicit inverses of the remaining rows' Hessians.

  Row i changes to its masked value; the rows R = {i, ...} not yet fixed move
  by the optimal-brain-surgeon update -delta H_R^-1[:, 0] / H_R^-1[0, 0]; a
  group's mask keeps, per output, the n largest w^2 / [H_Rj^-1]_00 at the
  group's first row.
  """
  w = np.array(w, np.float64)
  h = x.astype(np.float64).T @ x.astype(np.float64)
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  w[dead] = 0.0
  h += damp * np.mean(np.diag(h)) * np.eye(len(h))
  rows = w.shape[0]
  keep = np.ones(w.shape, bool) if mask is None else np.array(mask)
  inv = [np.linalg.inv(h[i:, i:]) for i in range(rows)]
  for i in range(rows):
    if mask is None and i % m == 0:
      sal = np.stack([w[i + j] ** 2 / inv[i + j][0, 0] for j in range(m)])
      order = np.argsort(-sal, axis=0, kind="stable")
      keep[i:i + m] = False
      for col in range(w.shape[1]):
        keep[i + order[:n, col], col] = True
    delta = w[i] - np.where(keep[i], w[i], 0.0)
    w[i:] -= np.outer(inv[i][:, 0] / inv[i][0, 0], delta)
    w[i] = np.where(keep[i], w[i], 0.0)
  return np.where(keep, w, 0.0), keep


@pytest.mark.parametrize("rows, n, m, block", [(8, 2, 4, 128), (16, 2, 4, 8),
                                                (24, 1, 4, 8), (16, 4, 8, 8)])
def test_sparsegpt_equals_brute_force_obs(rows, n, m, block):
  rng = np.random.default_rng(rows + n)
  x = _correlated(rng, 200, rows)
  x[:, 3] = 0.0                      # a dead input
  w = rng.normal(size=(rows, 5)).astype(np.float32)
  with jax.enable_x64(True):
    got, mask = sparsegpt(jnp.asarray(w, jnp.float64), jnp.asarray(x, jnp.float64),
                          n, m, block_size=block)
  want, want_mask = _brute_force_sparsegpt(w, x, n, m, 0.01)
  np.testing.assert_array_equal(mask, want_mask)
  np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)
  assert is_nm_sparse(np.asarray(got, np.float32), n, m)


def test_sparsegpt_with_a_fixed_mask_is_the_sequential_least_squares():
  rng = np.random.default_rng(1)
  x = _correlated(rng, 300, 12)
  w = rng.normal(size=(12, 4)).astype(np.float32)
  mask = np.asarray(nm_mask(jnp.asarray(rng.normal(size=(12, 4))), 2, 4))
  with jax.enable_x64(True):
    got, got_mask = sparsegpt(jnp.asarray(w, jnp.float64),
                              jnp.asarray(x, jnp.float64), 2, 4, mask=mask,
                              block_size=4)
  want, _ = _brute_force_sparsegpt(w, x, 2, 4, 0.01, mask=mask)
  np.testing.assert_array_equal(got_mask, mask)
  np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)
  # The last row of each column is fixed last: with only that row kept, the
  # update is the exact least-squares fit of the kept weight.
  one = np.zeros((12, 4), bool)
  one[-1] = True
  with jax.enable_x64(True):
    fit, _ = sparsegpt(jnp.asarray(w, jnp.float64), jnp.asarray(x, jnp.float64),
                       1, 12, mask=one, damp=0.0)
  x64 = x.astype(np.float64)
  target = x64 @ w
  lstsq = np.linalg.lstsq(x64[:, -1:], target, rcond=None)[0]
  np.testing.assert_allclose(np.asarray(fit)[-1], lstsq[0], rtol=1e-6)


def test_sparsegpt_beats_magnitude_and_wanda_on_the_layer_output():
  rng = np.random.default_rng(2)
  x = _correlated(rng, 512, 32) * rng.uniform(0.2, 3.0, size=32).astype(np.float32)
  w = jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)
  x = jnp.asarray(x)
  err = lambda v: float(jnp.mean((x @ w - x @ v) ** 2))
  magnitude = jnp.where(nm_mask(w, 2, 4), w, 0.0)
  wanda = jnp.where(nm_mask(wanda_scores(w, x), 2, 4), w, 0.0)
  sgpt, _ = sparsegpt(w, x, 2, 4)
  assert err(sgpt) < err(wanda) < err(magnitude)


def test_wanda_is_its_closed_form():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(50, 8)).astype(np.float32)
  w = rng.normal(size=(8, 6)).astype(np.float32)
  want = np.abs(w) * np.sqrt((x ** 2).sum(0))[:, None]
  np.testing.assert_allclose(wanda_scores(w, x), want, rtol=1e-6)
  # Conv: the norm of an input channel over batch and positions.
  xc = rng.normal(size=(4, 5, 5, 8)).astype(np.float32)
  wc = rng.normal(size=(3, 3, 8, 6)).astype(np.float32)
  np.testing.assert_allclose(input_norms(xc), np.sqrt((xc ** 2).sum((0, 1, 2))),
                             rtol=1e-6)
  np.testing.assert_allclose(wanda_scores(wc, xc),
                             np.abs(wc) * input_norms(xc)[:, None], rtol=1e-6)
  with pytest.raises(ValueError, match="features"):
    wanda_scores(w, x[:, :4])


@pytest.mark.parametrize("padding, strides", [("SAME", 1), ("VALID", 2)])
def test_conv_patches_reproduce_the_layer(padding, strides):
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.float32)
  apply = conv_apply(padding=padding, strides=strides)
  p = patch_matrix(x, w.shape, apply_fn=apply)
  np.testing.assert_allclose(p @ w.reshape(-1, 8),
                             apply(w, x).reshape(-1, 8), rtol=1e-4, atol=1e-4)
  w2, mask = sparsegpt(w, x, 2, 4, apply_fn=apply)
  assert w2.shape == w.shape and is_nm_sparse(w2, 2, 4)
  err = lambda v: float(jnp.mean((apply(w, x) - apply(v, x)) ** 2))
  assert err(w2) < err(jnp.where(nm_mask(w, 2, 4), w, 0.0))


def test_keeping_everything_changes_nothing():
  rng = np.random.default_rng(5)
  w = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(40, 8)), jnp.float32)
  got, mask = sparsegpt(w, x, 4, 4)
  np.testing.assert_array_equal(got, w)
  assert bool(mask.all())


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match="divisible by m=4"):
    sparsegpt(jnp.ones((6, 2)), jnp.ones((3, 6)), 2, 4)
  with pytest.raises(ValueError, match="block_size"):
    sparsegpt(jnp.ones((8, 2)), jnp.ones((3, 8)), 2, 4, block_size=2)


# ------------------------------------------------- nm_convert(criterion=) --


def _mlp():
  import sparse_jax as sj
  model = sj.models.build_model("mlp", (16,), 8, hidden=(32, 32))
  graphdef, params, model_state = sj.training.split_model(model)
  rng = np.random.default_rng(6)
  x = jnp.asarray(_correlated(rng, 256, 16))
  return graphdef, params, model_state, x


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt", "adaprune"])
def test_nm_convert_criteria_prune_layer_by_layer(criterion):
  import sparse_jax as sj
  from sparse_jax.training import layer_calibration
  graphdef, params, model_state, x = _mlp()
  filt = sj.sparsity.default_filter(4, exclude="head")
  calib = layer_calibration(graphdef, model_state, x)
  options = {"num_steps": 200, "learning_rate": 1e-2} if criterion == "adaprune" else None
  sparse, masks = sj.nm_convert(params, 2, 4, criterion=criterion, mask=filt,
                                calibration=calib, options=options)
  dense_out = lambda p: nnx_apply(graphdef, p, model_state, x)
  magnitude, _ = sj.nm_convert(params, 2, 4, mask=filt)
  for layer in (0, 1):
    k = sparse["hidden"][layer]["kernel"]
    assert is_nm_sparse(k, 2, 4)
    np.testing.assert_array_equal(k != 0, masks["hidden"][layer]["kernel"] & (k != 0))
  np.testing.assert_array_equal(sparse["head"]["kernel"], params["head"]["kernel"])
  err = lambda p: float(jnp.mean((dense_out(p) - dense_out(params)) ** 2))
  assert err(sparse) < err(magnitude)
  if criterion == "wanda":
    # Layer 0's mask is Wanda's closed form on the raw inputs; layer 1 sees
    # the inputs through the pruned layer 0.
    w0 = params["hidden"][0]["kernel"]
    np.testing.assert_array_equal(masks["hidden"][0]["kernel"],
                                  nm_mask(wanda_scores(w0, x), 2, 4))
    x1 = calib(sparse)["['hidden'][1]['kernel']"][0]
    np.testing.assert_array_equal(
        masks["hidden"][1]["kernel"],
        nm_mask(wanda_scores(params["hidden"][1]["kernel"], x1), 2, 4))


def nnx_apply(graphdef, params, model_state, x):
  from flax import nnx
  return nnx.merge(graphdef, params, model_state)(x, train=False)


def test_nm_convert_criterion_errors_name_the_problem():
  import sparse_jax as sj
  graphdef, params, model_state, x = _mlp()
  with pytest.raises(ValueError, match="criterion"):
    sj.nm_convert(params, 2, 4, criterion="obs")
  with pytest.raises(ValueError, match="needs calibration="):
    sj.nm_convert(params, 2, 4, criterion="wanda")
  with pytest.raises(ValueError, match="uses no calibration"):
    sj.nm_convert(params, 2, 4, calibration={})
  with pytest.raises(ValueError, match=r"no calibration inputs for \['hidden'\]\[1\]"):
    sj.nm_convert(params, 2, 4, criterion="wanda",
                  mask=sj.sparsity.default_filter(4, exclude="head"),
                  calibration={"['hidden'][0]['kernel']": x})
  with pytest.raises(ValueError, match="axis"):
    sj.nm_convert(params, 2, 4, criterion="sparsegpt", axis=-1,
                  calibration={"['hidden'][0]['kernel']": x})


def test_calibration_the_kernel_cannot_read_is_rejected_naming_the_layer():
  # Each of these used to be read silently as some other matrix.
  import sparse_jax as sj
  w = jnp.ones((3, 3, 4, 8))
  x = jnp.ones((2, 6, 6, 4))
  with pytest.raises(ValueError, match=r"\['c'\]\['kernel'\]: a Conv kernel .* conv_apply"):
    sj.nm_convert({"c": {"kernel": w}}, 2, 4, criterion="sparsegpt",
                  calibration={"['c']['kernel']": x})
  with pytest.raises(ValueError, match="8 input features .* grouped"):
    sj.nm_convert({"kernel": jnp.ones((8, 2))}, 2, 4, criterion="sparsegpt",
                  calibration={"['kernel']": jnp.ones((3, 16))})
  grouped = conv_apply(feature_group_count=2)
  with pytest.raises(ValueError, match="grouped"):
    sparsegpt(w, jnp.ones((2, 6, 6, 8)), 2, 4, apply_fn=grouped)
  with pytest.raises(ValueError, match="takes no options"):
    sj.nm_convert({"kernel": jnp.ones((8, 2))}, 2, 4, criterion="wanda",
                  calibration={"['kernel']": jnp.ones((3, 8))},
                  options={"damp": 0.5})


def test_layer_calibration_with_a_users_own_module():
  # A plain nnx.Module whose __call__ takes no `train`; one layer used twice.
  from flax import nnx
  import sparse_jax as sj

  class Net(nnx.Module):
    def __init__(self):
      self.a = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
      self.b = nnx.Linear(8, 4, rngs=nnx.Rngs(1))

    def __call__(self, x):
      return self.b(jax.nn.relu(self.a(jax.nn.relu(self.a(x)))))

  graphdef, params, rest = nnx.split(Net(), nnx.Param, ...)
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
  x = jnp.asarray(np.random.default_rng(7).normal(size=(16, 8)), jnp.float32)
  calib = sj.training.layer_calibration(graphdef, rest, x)
  got = calib(params)
  assert list(got) == ["['a']['kernel']", "['b']['kernel']"]
  first = jax.nn.relu(x @ params["a"]["kernel"] + params["a"]["bias"])
  np.testing.assert_allclose(got["['a']['kernel']"][0], first, rtol=1e-5)  # last call
  sparse, _ = sj.nm_convert(params, 2, 4, criterion="wanda", calibration=calib,
                            mask=sj.sparsity.default_filter(4, exclude="b"))
  assert is_nm_sparse(sparse["a"]["kernel"], 2, 4)


def test_attention_kernels_of_multi_head_attention_convert():
  """nnx.MultiHeadAttention's 3-D query/key/value (in, heads, head_dim) and
  out (heads, head_dim, out) kernels are converted as the matrices their
  flattened inputs multiply: the same result as on the 2-D matrix."""
  import sparse_jax as sj
  from sparse_jax.training import conversion
  from sparse_jax.training.steps import split_model
  model = sj.models.build_model("vit", (8, 8, 1), 10, patch=2, dim=32, heads=4,
                                depth=1, mlp_dim=64)
  graphdef, params, state = split_model(model)
  x = jax.random.normal(jax.random.key(0), (48, 8, 8, 1))
  calib = conversion.layer_calibration(graphdef, state, x)
  inputs = calib(params)
  attn = "['blocks'][0]['attn']"
  assert inputs[f"{attn}['out']['kernel']"][0].shape[-1] == 32  # heads*head_dim
  axis = sj.sparsity.axis_by_path({r"query|key|value": 0}, default=-2)
  mask = sj.sparsity.default_filter(4, axis=axis, exclude=("head",))
  new, masks = sj.nm_convert(params, 2, 4, axis=axis, mask=mask,
                             criterion="sparsegpt", calibration=calib)
  q = params["blocks"][0]["attn"]["query"]["kernel"]
  want, want_mask = sparsegpt(q.reshape(32, 32), inputs[f"{attn}['query']['kernel']"][0],
                              2, 4)
  got = new["blocks"][0]["attn"]["query"]["kernel"]
  np.testing.assert_allclose(got, want.reshape(q.shape), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(masks["blocks"][0]["attn"]["query"]["kernel"],
                                want_mask.reshape(q.shape))
  out = np.asarray(new["blocks"][0]["attn"]["out"]["kernel"])      # (4, 8, 32)
  assert bool(sj.masks.is_nm_sparse(out, 2, 4, axis=-2))
  # the runner's AdaPrune stage refits the 3-D kernels under their masks
  rebuilt = conversion.adaprune(graphdef, params, state, x, masks, num_steps=3)
  k = np.asarray(rebuilt["blocks"][0]["attn"]["key"]["kernel"])
  assert bool(sj.masks.is_nm_sparse(k, 2, 4, axis=0))
  with pytest.raises(ValueError, match="transposable masks tile the last two"):
    only_query = jax.tree_util.tree_map_with_path(
        lambda path, _: jax.tree_util.keystr(path).endswith("['query']['kernel']"),
        params)
    sj.nm_convert(params, 2, 4, axis=axis, transposable=True, mask=only_query,
                  criterion="wanda", calibration=calib)
  only_out = jax.tree_util.tree_map_with_path(   # its 4x4 tiles stay in a head
      lambda path, _: jax.tree_util.keystr(path).endswith("['out']['kernel']"),
      params)
  new, _ = sj.nm_convert(params, 2, 4, transposable=True, mask=only_out,
                         criterion="wanda", calibration=calib)
  out = np.asarray(new["blocks"][0]["attn"]["out"]["kernel"])
  assert bool(sj.masks.is_transposable_nm_sparse(out, 2, 4))
