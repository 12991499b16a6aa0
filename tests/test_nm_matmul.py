"""nm_matmul (custom_vjp N:M product) and the NMDense layer, on the CPU fallback."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sparse_jax.masks import is_nm_sparse, nm_mask, transposable_nm_mask
from sparse_jax.models import NMDense, NMMask
from sparse_jax.sparsity import matmul as matmul_lib
from sparse_jax.sparsity import nm_matmul


def _case(shape=(3, 5, 8), out=12, seed=0):
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, shape)
  w = jax.random.normal(kw, (shape[-1], out))
  return x, w, transposable_nm_mask(w, 2, 4)


def _loss(fn):  # a nonlinear loss so the cotangent dy is not constant
  return lambda x, w: jnp.sum(jnp.sin(fn(x, w)) * jnp.arange(1.0, 13.0))


def test_forward_equals_masked_product_for_batched_inputs():
  x, w, mask = _case()
  np.testing.assert_allclose(nm_matmul(x, w, mask), x @ (w * mask), rtol=1e-6)


def test_masked_gradients_equal_autodiff_of_the_masked_product():
  x, w, mask = _case()
  ours = jax.grad(_loss(lambda x, w: nm_matmul(x, w, mask,
                                               weight_grad="masked")),
                  (0, 1))(x, w)
  ref = jax.grad(_loss(lambda x, w: x @ (w * mask)), (0, 1))(x, w)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_ste_weight_gradient_is_the_dense_gradient():
  x, w, mask = _case()
  dx, dw = jax.grad(_loss(lambda x, w: nm_matmul(x, w, mask)), (0, 1))(x, w)
  # the dense weights get d/d(w * mask) unmasked (straight through), the
  # inputs get the gradient of the masked product
  sparse = w * mask
  ref_dx, ref_dw = jax.grad(_loss(lambda x, v: x @ v), (0, 1))(x, sparse)
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-6)
  assert bool(jnp.any(dw[~mask] != 0))


def test_both_products_go_through_the_backend_and_are_nm_sparse():
  """The forward multiplies by (W, M), the data gradient by (W^T, M^T); with a
  transposable mask both masks are 2:4 along the contracted axis."""
  x, w, mask = _case()
  seen = []

  def backend(a, b, mk):
    seen.append((b.shape, mk))
    return matmul_lib.masked_dense(a, b, mk)

  jax.grad(_loss(lambda x, w: nm_matmul(x, w, mask, backend=backend)))(x, w)
  assert [s for s, _ in seen] == [(8, 12), (12, 8)]
  for _, mk in seen:
    assert bool(is_nm_sparse(mk, 2, 4, axis=0))  # groups along the contraction
  np.testing.assert_array_equal(seen[1][1], mask.T)


def test_plain_nm_mask_makes_only_the_forward_product_nm_sparse():
  _, w, _ = _case()
  mask = nm_mask(w, 2, 4, axis=0)
  assert bool(is_nm_sparse(mask, 2, 4, axis=0))
  assert not bool(is_nm_sparse(mask.T, 2, 4, axis=0))


def test_auto_backend_is_the_masked_dense_fallback():
  assert matmul_lib._resolve_backend("auto") is matmul_lib.masked_dense
  assert matmul_lib._resolve_backend("masked_dense") is matmul_lib.masked_dense


def test_jit_vmap_and_dtypes():
  x, w, mask = _case()
  f = jax.jit(jax.grad(_loss(lambda x, w: nm_matmul(x, w, mask)), (0, 1)))
  dx, dw = f(x, w)
  assert dx.shape == x.shape and dw.shape == w.shape
  per_row = jax.vmap(lambda r: nm_matmul(r, w, mask))(x)
  np.testing.assert_allclose(per_row, nm_matmul(x, w, mask), rtol=1e-6)
  xb = x.astype(jnp.bfloat16)
  dxb, dwb = jax.grad(_loss(lambda x, w: nm_matmul(x, w, mask)), (0, 1))(xb, w)
  assert dxb.dtype == jnp.bfloat16 and dwb.dtype == jnp.float32


@pytest.mark.parametrize("kwargs, match", [
    (dict(weight_grad="exact"), "weight_grad"),
    (dict(backend="cusparselt"), "backend"),
])
def test_bad_options_name_the_option(kwargs, match):
  x, w, mask = _case()
  with pytest.raises(ValueError, match=match):
    nm_matmul(x, w, mask, **kwargs)


def test_bad_shapes_say_what_was_expected():
  x, w, mask = _case()
  with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 8\)"):
    nm_matmul(x[..., :4], w, mask)
  with pytest.raises(ValueError, match="mask must be a bool array"):
    nm_matmul(x, w, mask.astype(jnp.float32))
  with pytest.raises(ValueError, match="2-D"):
    nm_matmul(x, w[None], mask[None])


def test_nmdense_mask_is_transposable_and_forward_matches():
  layer = NMDense(8, 16, n=2, m=4, rngs=nnx.Rngs(0))
  mask = layer.mask[...]
  assert isinstance(layer.mask, NMMask) and mask.dtype == jnp.bool_
  np.testing.assert_array_equal(mask, transposable_nm_mask(layer.kernel[...],
                                                          2, 4))
  x = jnp.linspace(-1, 1, 24).reshape(3, 8)
  np.testing.assert_allclose(layer(x), x @ (layer.kernel[...] * mask)
                             + layer.bias[...], rtol=1e-6)
  plain = NMDense(8, 6, n=1, m=4, transposable=False, use_bias=False,
                  rngs=nnx.Rngs(1))
  assert plain.bias is None
  assert bool(is_nm_sparse(plain.mask[...], 1, 4, axis=0))


@pytest.mark.parametrize("weight_grad", ["ste", "masked"])
def test_nmdense_trains_with_nnx_optimizer(weight_grad):
  """nnx.Optimizer(wrt=nnx.Param) + nnx.jit: the loss falls, the mask is state
  (untouched by the optimizer) and update_mask recomputes it under jit."""
  model = NMDense(8, 8, weight_grad=weight_grad, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (64, 8))
  target = x @ jax.random.normal(jax.random.key(2), (8, 8))
  mask0, kernel0 = model.mask[...], model.kernel[...]

  @nnx.jit
  def step(model, opt):
    loss, grads = nnx.value_and_grad(
        lambda m: jnp.mean((m(x) - target) ** 2))(model)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt)) for _ in range(20)]
  assert losses[-1] < 0.7 * losses[0]
  np.testing.assert_array_equal(model.mask[...], mask0)
  pruned_moved = bool(jnp.any(model.kernel[...][~mask0] != kernel0[~mask0]))
  assert pruned_moved == (weight_grad == "ste")
  nnx.jit(lambda m: m.update_mask())(model)
  np.testing.assert_array_equal(
      model.mask[...], transposable_nm_mask(model.kernel[...], 2, 4))


def test_nmdense_rejects_sizes_not_divisible_by_m():
  with pytest.raises(ValueError, match="in_features and out_features must be "
                     "divisible by m=4"):
    NMDense(8, 6, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="weight_grad"):
    NMDense(8, 8, weight_grad="dense", rngs=nnx.Rngs(0))
