"""Bayesian prediction and uncertainty metrics against brute-force numpy."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_jax.bayes import predict as pr
from sparse_jax.bayes.transform import foovb, foovb_sample


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _ece_loop(probs, labels, num_bins):
  n = len(labels)
  total = 0.0
  for b in range(num_bins):
    lo, hi = b / num_bins, (b + 1) / num_bins
    idx = [i for i in range(n) if lo < probs[i].max() <= hi or (b == 0 and probs[i].max() == 0)]
    if not idx:
      continue
    acc = np.mean([probs[i].argmax() == labels[i] for i in idx])
    conf = np.mean([probs[i].max() for i in idx])
    total += len(idx) / n * abs(acc - conf)
  return total


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(seed=st.integers(0, 10_000), n=st.sampled_from([1, 7, 40]),
                  c=st.sampled_from([2, 5]), bins=st.integers(1, 20))
def test_ece_matches_brute_force(seed, n, c, bins):
  rng = np.random.default_rng(seed)
  probs = _softmax(rng.normal(size=(n, c)) * 3).astype(np.float32)
  labels = rng.integers(0, c, size=n)
  got = float(pr.expected_calibration_error(probs, labels, num_bins=bins))
  assert got == pytest.approx(_ece_loop(probs, labels, bins), abs=1e-5)


def test_ece_perfectly_calibrated_is_zero_and_bad_bins_raise():
  probs = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
  assert float(pr.expected_calibration_error(probs, np.array([0, 1]))) == 0.0
  assert float(pr.expected_calibration_error(probs, np.array([1, 0]))) == 1.0
  with pytest.raises(ValueError, match="num_bins"):
    pr.expected_calibration_error(probs, np.array([0, 1]), num_bins=0)


def test_bma_vote_mc_against_numpy():
  rng = np.random.default_rng(0)
  k, n, c = 7, 50, 4
  logits = rng.normal(size=(k, n, c)).astype(np.float32) * 2
  labels = rng.integers(0, c, size=n)
  p = _softmax(logits)
  np.testing.assert_allclose(pr.bma_probs(logits), p.mean(0), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(pr.bma_log_probs(logits), np.log(p.mean(0)), rtol=1e-5, atol=1e-6)
  votes = np.stack([np.bincount(logits[:, i].argmax(-1), minlength=c) for i in range(n)])
  np.testing.assert_array_equal(pr.committee_vote(logits), votes.argmax(-1))
  assert float(pr.mc_accuracy(logits, labels)) == pytest.approx(
      np.mean(logits.argmax(-1) == labels[None]))
  assert float(pr.accuracy(p.mean(0), labels)) == pytest.approx(
      np.mean(p.mean(0).argmax(-1) == labels))
  nll = -np.mean(np.log(p.mean(0)[np.arange(n), labels]))
  assert float(pr.negative_log_likelihood(pr.bma_log_probs(logits), labels)) == \
      pytest.approx(nll, rel=1e-5)


def test_vote_ties_go_to_lowest_class():
  logits = np.array([[[0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]]], np.float32)
  np.testing.assert_array_equal(pr.committee_vote(logits), [1])


def test_bma_stable_for_huge_logits():
  logits = jnp.array([[[1e4, -1e4]], [[-1e4, 1e4]]], jnp.float32)
  logp = pr.bma_log_probs(logits)
  assert bool(jnp.all(jnp.isfinite(logp)))
  np.testing.assert_allclose(jnp.exp(logp), [[0.5, 0.5]], rtol=1e-6)


def test_entropy_and_mutual_information():
  c = 5
  np.testing.assert_allclose(pr.predictive_entropy(np.full((3, c), 1 / c)), np.log(c), rtol=1e-6)
  np.testing.assert_array_equal(pr.predictive_entropy(np.eye(c)), 0.0)
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(6, 10, c)).astype(np.float32)
  p = _softmax(logits)
  ent = lambda q: -(q * np.log(q)).sum(-1)
  np.testing.assert_allclose(pr.predictive_entropy(p.mean(0)), ent(p.mean(0)), rtol=1e-5)
  mi = ent(p.mean(0)) - ent(p).mean(0)
  np.testing.assert_allclose(pr.mutual_information(logits), mi, rtol=1e-4, atol=1e-6)
  assert np.all(mi >= 0)
  same = np.broadcast_to(logits[:1], logits.shape)
  np.testing.assert_allclose(pr.mutual_information(same), 0.0, atol=1e-6)


def test_evaluate_on_a_foovb_posterior():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(64, 5)), jnp.float32)
  w_true = rng.normal(size=(5, 3))
  labels = jnp.asarray((np.asarray(x) @ w_true).argmax(-1))
  apply_fn = lambda p, x: x @ p["w"] + p["b"]
  params = {"w": jnp.asarray(w_true, jnp.float32), "b": jnp.zeros(3)}
  state = foovb(init_std=0.3).init(params)
  samples = foovb_sample(state, 16)
  out = jax.jit(lambda m, s: pr.evaluate(apply_fn, m, s, x, labels))(params, samples)
  assert set(out) == {"accuracy_mean", "accuracy_mc", "accuracy_vote", "accuracy_bma",
                      "nll_mean", "nll_bma", "ece_mean", "ece_bma", "entropy_mean",
                      "entropy_bma", "mutual_information"}
  assert float(out["accuracy_mean"]) == 1.0  # the true weights
  logits = pr.sample_logits(apply_fn, samples, x)
  assert logits.shape == (16, 64, 3)
  assert float(out["accuracy_mc"]) == pytest.approx(float(pr.mc_accuracy(logits, labels)))
  assert float(out["mutual_information"]) > 0
  # With zero posterior spread every predictor agrees and MI vanishes.
  same = jax.tree.map(lambda p: jnp.broadcast_to(p, (4,) + p.shape), params)
  out0 = pr.evaluate(apply_fn, params, same, x, labels)
  for key in ("accuracy_mc", "accuracy_vote", "accuracy_bma"):
    assert float(out0[key]) == float(out0["accuracy_mean"])
  assert float(out0["nll_bma"]) == pytest.approx(float(out0["nll_mean"]), rel=1e-5)
  assert float(out0["mutual_information"]) == pytest.approx(0.0, abs=1e-6)
