"""Sparse FOO-VB: posterior mean projected onto transposable N:M masks by |mean|/std."""

import doctest
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_jax.bayes import sparse as bs
from sparse_jax.bayes.sparse import (apply_masks, foovb_nm_masks,
                                     foovb_nm_projection, foovb_snr)
from sparse_jax.bayes.transform import (find_foovb_state, foovb, foovb_sample,
                                        foovb_std)
from sparse_jax.masks import (is_nm_sparse, is_transposable_nm_sparse, nm_mask,
                              transposable_nm_mask)

K = 3


def _with_std(state, std_tree):
  """A FOO-VB state with the diagonal std replaced (leaves like params)."""
  return state._replace(std=jax.tree.map(jnp.asarray, std_tree))


def _patterns_2_4():
  """All 4x4 0/1 matrices with every row and column sum 2 (brute force)."""
  rows = [r for r in itertools.product([0, 1], repeat=4) if sum(r) == 2]
  out = [np.array(t) for t in itertools.product(rows, repeat=4)
         if all(c == 2 for c in np.array(t).sum(0))]
  return np.stack(out).astype(bool)


def test_brute_force_pattern_count():
  assert len(_patterns_2_4()) == 90  # R(4, 2) (ALGORITHMS.md A3)


def test_snr_is_abs_mean_over_marginal_std():
  params = {"d": {"kernel": jnp.array([[1.0, -2.0], [0.5, 0.0]]),
                  "bias": jnp.array([3.0, -1.0])}}
  bayes_kernel = {"d": {"kernel": True, "bias": False}}
  state = foovb(init_std=0.5, mask=bayes_kernel).init(params)
  state = _with_std(state, {"d": {"kernel": jnp.array([[0.5, 4.0], [0.1, 1.0]]),
                                  "bias": None}})
  snr = foovb_snr(state)
  np.testing.assert_allclose(snr["d"]["kernel"], [[2.0, 0.5], [5.0, 0.0]],
                             rtol=1e-6)
  np.testing.assert_array_equal(snr["d"]["bias"], [3.0, 1.0])  # point estimate
  # Kronecker posterior: the marginal std sqrt(diag(AA^T)_i diag(BB^T)_j).
  kparams = {"d": {"kernel": jax.random.normal(jax.random.key(0), (4, 4)),
                   "bias": jnp.zeros(4)}}
  kstate = foovb(covariance="kron").init(kparams)
  np.testing.assert_allclose(
      foovb_snr(kstate)["d"]["kernel"],
      jnp.abs(kparams["d"]["kernel"]) / foovb_std(kstate)["d"]["kernel"],
      rtol=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_exact_mask_maximises_tile_snr(seed):
  rng = np.random.default_rng(seed)
  mean = rng.normal(size=(4, 4)).astype(np.float32)
  std = rng.uniform(0.01, 1.0, size=(4, 4)).astype(np.float32)
  state = _with_std(foovb().init({"kernel": jnp.asarray(mean)}), {"kernel": std})
  mask = np.asarray(foovb_nm_masks(state, 2, 4, transposable=True)["kernel"])
  snr = np.abs(mean) / std
  pats = _patterns_2_4()
  sums = (pats * snr).sum((1, 2))
  assert any((mask == p).all() for p in pats)       # a transposable 2:4 mask
  np.testing.assert_allclose((mask * snr).sum(), sums.max(), rtol=1e-6)
  assert bool(is_transposable_nm_sparse(mask, 2, 4))


def test_snr_mask_differs_from_magnitude_mask():
  # Large but uncertain weights on the diagonal band, small certain ones off it.
  mean = np.array([[3, 3, .5, .5], [3, 3, .5, .5],
                   [.5, .5, 3, 3], [.5, .5, 3, 3]], np.float32)
  std = np.where(mean > 1, 10.0, 0.1).astype(np.float32)
  state = _with_std(foovb().init({"kernel": jnp.asarray(mean)}), {"kernel": std})
  mask = np.asarray(foovb_nm_masks(state, 2, 4, transposable=True)["kernel"])
  np.testing.assert_array_equal(mask, mean < 1)     # the certain ones win
  np.testing.assert_array_equal(transposable_nm_mask(mean, 2, 4), mean > 1)


def test_plain_nm_option_uses_snr_along_input_axis():
  rng = np.random.default_rng(0)
  mean = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  std = jnp.asarray(rng.uniform(0.01, 1.0, size=(8, 4)), jnp.float32)
  state = _with_std(foovb().init({"kernel": mean}), {"kernel": std})
  mask = foovb_nm_masks(state, 2, 4, transposable=False)["kernel"]
  np.testing.assert_array_equal(mask, nm_mask(jnp.abs(mean) / std, 2, 4))
  assert bool(is_nm_sparse(mask, 2, 4, axis=-2))


def _params(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {"l1": {"kernel": f(8, 8), "bias": f(8)},
          "head": {"kernel": f(8, 3), "bias": f(3)}}


def _loss(target):
  def loss(p):
    return sum(0.5 * 2.0 * jnp.sum((a - b) ** 2)
               for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target)))
  return loss


@pytest.mark.parametrize("covariance", ["diagonal", "kron"])
def test_update_is_the_projected_foovb_update(covariance):
  params, target = _params(0), _params(1)
  loss = _loss(target)
  plain = foovb(covariance=covariance, num_samples=K, init_std=0.1, key=3)
  wrapped = foovb_nm_projection(
      foovb(covariance=covariance, num_samples=K, init_std=0.1, key=3), 2, 4,
      transposable=True)
  ps, ws = plain.init(params), wrapped.init(params)
  assert find_foovb_state(ws).count == 0
  grads = jax.vmap(jax.grad(loss))(foovb_sample(ps, K))
  jax.tree.map(np.testing.assert_array_equal, foovb_sample(ws, K),
               foovb_sample(ps, K))
  pu, ps = plain.update(grads, ps, params)
  wu, ws = wrapped.update(grads, ws, params)
  dense = optax.apply_updates(params, pu)
  new = optax.apply_updates(params, wu)
  mask = ws.masks["l1"]["kernel"]
  # The mask is the SNR mask of the unprojected new posterior.
  np.testing.assert_array_equal(mask, foovb_nm_masks(ps, 2, 4, transposable=True)["l1"]["kernel"])
  assert isinstance(ws.masks["head"]["kernel"], optax.MaskedNode)  # 3 outputs
  # Params: exactly transposable 2:4, exact zeros outside the mask.
  k = new["l1"]["kernel"]
  assert bool(is_transposable_nm_sparse(k, 2, 4))
  assert int(mask.sum()) == 32
  np.testing.assert_array_equal(np.asarray(k)[~np.asarray(mask)], 0.0)
  np.testing.assert_allclose(k, jnp.where(mask, dense["l1"]["kernel"], 0),
                             rtol=1e-6, atol=1e-6)
  for name in ("head",):
    for leaf in ("kernel", "bias"):
      np.testing.assert_array_equal(new[name][leaf], dense[name][leaf])
  # The state's mean is the projected one (= the params), covariance untouched.
  fs = find_foovb_state(ws)
  np.testing.assert_array_equal(fs.mean["l1"]["kernel"],
                                jnp.where(mask, dense["l1"]["kernel"], 0))
  np.testing.assert_allclose(fs.mean["l1"]["kernel"], k, rtol=1e-6, atol=1e-7)
  jax.tree.map(np.testing.assert_array_equal, foovb_std(ws), foovb_std(ps))
  # Next samples: drawn around the projected mean with the same noise.
  sw, sp = foovb_sample(ws, K), foovb_sample(ps, K)
  np.testing.assert_allclose(sw["l1"]["kernel"] - fs.mean["l1"]["kernel"],
                             sp["l1"]["kernel"] - dense["l1"]["kernel"],
                             rtol=1e-5, atol=1e-6)
  # Sparse samples for prediction.
  masked = apply_masks(sw, ws.masks)
  assert bool(jax.vmap(lambda x: is_transposable_nm_sparse(x, 2, 4))(
      masked["l1"]["kernel"]).all())
  np.testing.assert_array_equal(masked["head"]["kernel"], sw["head"]["kernel"])


def _train(tx, params, loss, steps, *, jit=True):
  def step(params, state):
    grads = jax.vmap(jax.grad(loss))(foovb_sample(state, K))
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  step = jax.jit(step) if jit else step
  state = tx.init(params)
  history = []
  for _ in range(steps):
    params, state = step(params, state)
    history.append((params, state))
  return history


def test_jit_and_chain_match_eager():
  params, target = _params(0), _params(1)
  inner = optax.chain(foovb(num_samples=K, init_std=0.1), optax.identity())
  tx = optax.chain(foovb_nm_projection(inner, 2, 4, transposable=True), optax.identity())
  jitted = _train(tx, params, _loss(target), 4)
  eager = _train(tx, params, _loss(target), 4, jit=False)
  for (pj, sj_), (pe, _) in zip(jitted, eager):
    assert bool(is_transposable_nm_sparse(pj["l1"]["kernel"], 2, 4))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                         atol=1e-6), pj, pe)
  assert int(find_foovb_state(jitted[-1][1]).count) == 4


def test_pruned_weights_regrow_only_when_masks_are_rescored():
  # The first mask keeps the initial diagonal band; the target lives off it.
  band = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], bool)
  params = {"kernel": jnp.asarray(np.where(band, 1.0, 0.1), jnp.float32)}
  target = {"kernel": jnp.asarray(np.where(band, 0.0, 2.0), jnp.float32)}
  loss = _loss(target)

  def run(update_every):
    tx = foovb_nm_projection(foovb(num_samples=K, init_std=0.3), 2, 4,
                             update_every=update_every, transposable=True)
    return _train(tx, params, loss, 12)

  fixed, rescored = run(None), run(1)
  np.testing.assert_array_equal(fixed[0][1].masks["kernel"], band)
  for _, state in fixed:
    np.testing.assert_array_equal(state.masks["kernel"], band)
  np.testing.assert_array_equal(rescored[-1][1].masks["kernel"], ~band)
  np.testing.assert_array_equal(np.asarray(rescored[-1][0]["kernel"])[band], 0)


def test_start_step_keeps_dense_warmup():
  params, target = _params(0), _params(1)
  tx = foovb_nm_projection(foovb(num_samples=K), 2, 4, start_step=2,
                           transposable=True)
  hist = _train(tx, params, _loss(target), 3)
  for p, _ in hist[:2]:
    assert int((p["l1"]["kernel"] == 0).sum()) == 0
    assert bool(hist[0][1].masks["l1"]["kernel"].all())
  assert bool(is_transposable_nm_sparse(hist[2][0]["l1"]["kernel"], 2, 4))
  assert int((hist[2][0]["l1"]["kernel"] == 0).sum()) == 32


def test_errors():
  params = _params(0)
  with pytest.raises(ValueError, match="FOO-VB"):
    foovb_nm_projection(optax.sgd(0.1), 2, 4).init(params)
  with pytest.raises(ValueError, match="fixed_point_iterations"):
    foovb_nm_projection(foovb(fixed_point_iterations=2), 2, 4).init(params)
  with pytest.raises(ValueError):
    foovb_nm_projection(foovb(), 5, 4)
  select_head = {"l1": {"kernel": False, "bias": False},
                 "head": {"kernel": True, "bias": False}}
  with pytest.raises(ValueError, match=r"\['head'\]\['kernel'\].*\(8, 3\)"):
    foovb_nm_projection(foovb(), 2, 4, mask=select_head, transposable=True).init(params)


def test_docstring_examples():
  globs = dict(vars(bs), jax=jax, jnp=jnp, optax=optax)
  result = doctest.testmod(bs, extraglobs=globs,
                           optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0
