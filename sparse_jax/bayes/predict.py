"""Bayesian prediction and predictive-uncertainty metrics, generic over ``apply_fn``.

``apply_fn(params, x) -> logits`` is any pure function (e.g. a closure over an
NNX ``graphdef`` and the model state in eval mode). With the posterior mean
``mean`` and K samples ``samples`` (leading axis K, e.g. from
:func:`sparse_jax.bayes.foovb_sample`) the predictors of the papers are

* mean weights ("map"): ``argmax apply_fn(mean, x)``;
* MC-averaged accuracy: the accuracy of each sampled network, averaged;
* committee vote: each sample votes its argmax, the most voted class wins;
* Bayesian model averaging (BMA): ``argmax mean_k softmax(apply_fn(theta_k, x))``.

The metric functions take logits (``(..., B, C)``) or probabilities
(``(B, C)``) and integer labels ``(B,)``; all are jittable.

References:
  Zeno et al., "Task Agnostic Continual Learning Using Online Variational Bayes
  with Fixed-Point Updates", https://arxiv.org/abs/2010.00373 (inference
  methods); Guo et al., "On Calibration of Modern Neural Networks",
  https://arxiv.org/abs/1706.04599 (expected calibration error).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]


def sample_logits(apply_fn: ApplyFn, samples: PyTree, x: ArrayLike) -> jax.Array:
  """Logits of every sampled network: ``vmap(apply_fn)`` over the sample axis.

  Args:
    apply_fn: ``(params, x) -> logits (B, C)``.
    samples: params tree with a leading axis K on every leaf.
    x: inputs ``(B, ...)``.

  Returns:
    ``(K, B, C)`` logits.

  Example:
    >>> apply_fn = lambda p, x: x @ p["w"]
    >>> sample_logits(apply_fn, {"w": jnp.ones((5, 3, 2))}, jnp.ones((4, 3))).shape
    (5, 4, 2)
  """
  return jax.vmap(apply_fn, in_axes=(0, None))(samples, jnp.asarray(x))


def bma_log_probs(logits: ArrayLike) -> jax.Array:
  """``log mean_k softmax(logits_k)``, computed stably (logsumexp over samples).

  Args:
    logits: ``(K, B, C)``.

  Returns:
    ``(B, C)`` log predictive probabilities.

  Example:
    >>> bma_log_probs(jnp.zeros((3, 1, 2)))
    Array([[-0.6931472, -0.6931472]], dtype=float32)
  """
  logits = jnp.asarray(logits)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jax.nn.logsumexp(logp, axis=0) - jnp.log(logits.shape[0])


def bma_probs(logits: ArrayLike) -> jax.Array:
  """Bayesian model averaging: ``mean_k softmax(logits_k)``.

  Args:
    logits: ``(K, B, C)``.

  Returns:
    ``(B, C)`` predictive probabilities.

  Example:
    >>> bma_probs(jnp.array([[[0.0, 100.0]], [[100.0, 0.0]]]))
    Array([[0.5, 0.5]], dtype=float32)
  """
  return jnp.exp(bma_log_probs(logits))


def committee_vote(logits: ArrayLike) -> jax.Array:
  """Majority vote of the samples' argmax; ties go to the lowest class index.

  Args:
    logits: ``(K, B, C)``.

  Returns:
    ``(B,)`` int32 predicted classes.

  Example:
    >>> votes = jnp.array([[[1.0, 0.0]], [[0.0, 1.0]], [[0.0, 1.0]]])
    >>> committee_vote(votes)
    Array([1], dtype=int32)
  """
  logits = jnp.asarray(logits)
  c = logits.shape[-1]
  counts = jax.nn.one_hot(jnp.argmax(logits, axis=-1), c, dtype=jnp.int32).sum(0)
  return jnp.argmax(counts, axis=-1).astype(jnp.int32)


def _labels(labels: ArrayLike, scores: jax.Array, who: str) -> jax.Array:
  """``labels`` checked against ``scores (..., B, C)``: integer ``(B,)``."""
  labels = jnp.asarray(labels)
  batch = scores.shape[-2:-1]
  if labels.shape != batch or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(
        f"{who}: labels must be integer class indices of shape {batch} for "
        f"scores of shape {scores.shape}, got {labels.dtype} {labels.shape}"
        + (" (squeeze the trailing axis)" if labels.shape == batch + (1,) else ""))
  return labels


def accuracy(scores: ArrayLike, labels: ArrayLike) -> jax.Array:
  """Fraction of ``argmax(scores) == labels`` (scores: logits or probabilities).

  Args:
    scores: ``(B, C)``.
    labels: ``(B,)`` integers.

  Returns:
    Scalar accuracy in [0, 1].

  Raises:
    ValueError: labels not integer of shape ``(B,)`` (e.g. ``(B, 1)``, which
      would otherwise broadcast to a wrong number).

  Example:
    >>> accuracy(jnp.array([[0.2, 0.8], [0.9, 0.1]]), jnp.array([1, 1]))
    Array(0.5, dtype=float32)
  """
  scores = jnp.asarray(scores)
  labels = _labels(labels, scores, "accuracy")
  return jnp.mean(jnp.argmax(scores, axis=-1) == labels)


def mc_accuracy(logits: ArrayLike, labels: ArrayLike) -> jax.Array:
  """Accuracy of each sampled network, averaged over the K samples.

  Args:
    logits: ``(K, B, C)``.
    labels: ``(B,)``.

  Returns:
    Scalar accuracy in [0, 1].

  Example:
    >>> mc_accuracy(jnp.array([[[0.0, 1.0]], [[1.0, 0.0]]]), jnp.array([1]))
    Array(0.5, dtype=float32)
  """
  logits = jnp.asarray(logits)
  labels = _labels(labels, logits, "mc_accuracy")
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels[None])


def negative_log_likelihood(log_probs: ArrayLike, labels: ArrayLike) -> jax.Array:
  """Mean NLL ``-log p(y | x)`` of normalised log-probabilities.

  Args:
    log_probs: ``(B, C)`` log predictive probabilities (e.g.
      :func:`bma_log_probs`, or ``jax.nn.log_softmax`` of logits).
    labels: ``(B,)``.

  Returns:
    Scalar mean negative log-likelihood (nats).

  Example:
    >>> negative_log_likelihood(jnp.log(jnp.array([[0.5, 0.5]])), jnp.array([0]))
    Array(0.6931472, dtype=float32)
  """
  log_probs = jnp.asarray(log_probs)
  labels = _labels(labels, log_probs, "negative_log_likelihood")
  picked = jnp.take_along_axis(log_probs, labels[:, None], axis=-1)
  return -jnp.mean(picked)


def predictive_entropy(probs: ArrayLike) -> jax.Array:
  """Entropy ``-sum_c p_c log p_c`` of each predictive distribution (nats).

  Args:
    probs: ``(..., C)`` probabilities.

  Returns:
    ``(...)`` entropies (0 for one-hot, ``log C`` for uniform).

  Example:
    >>> predictive_entropy(jnp.array([[0.5, 0.5], [1.0, 0.0]]))
    Array([0.6931472, 0.       ], dtype=float32)
  """
  # entr(p) = -p log p with entr(0) = 0; "+ 0.0" turns -0.0 into 0.0.
  return jnp.sum(jax.scipy.special.entr(jnp.asarray(probs)), axis=-1) + 0.0


def mutual_information(logits: ArrayLike) -> jax.Array:
  """Epistemic uncertainty: ``H(mean_k p_k) - mean_k H(p_k)`` per example.

  Args:
    logits: ``(K, B, C)``.

  Returns:
    ``(B,)`` mutual information between prediction and weights (nats, >= 0).

  Example:
    >>> mutual_information(jnp.array([[[0.0, 100.0]], [[100.0, 0.0]]]))
    Array([0.6931472], dtype=float32)
  """
  logits = jnp.asarray(logits)
  total = predictive_entropy(bma_probs(logits))
  each = predictive_entropy(jax.nn.softmax(logits, axis=-1)).mean(axis=0)
  return jnp.maximum(total - each, 0.0)


def expected_calibration_error(probs: ArrayLike, labels: ArrayLike, *,
                               num_bins: int = 15) -> jax.Array:
  """ECE: ``sum_b |B_b|/n * |accuracy(B_b) - confidence(B_b)|``.

  Equal-width bins over the confidence ``max_c p_c`` in (0, 1]; bin b holds the
  examples with confidence in ``((b - 1)/num_bins, b/num_bins]``.

  Args:
    probs: ``(B, C)`` predictive probabilities.
    labels: ``(B,)``.
    num_bins: number of bins (a Python int >= 1).

  Returns:
    Scalar ECE in [0, 1].

  Example:
    >>> ece = expected_calibration_error(jnp.array([[0.9, 0.1], [0.9, 0.1]]),
    ...                                  jnp.array([0, 1]))
    >>> round(float(ece), 6)  # confidence 0.9, accuracy 0.5
    0.4

  References:
    Guo et al. 2017, https://arxiv.org/abs/1706.04599 (eq. 3)
  """
  if not isinstance(num_bins, int) or num_bins < 1:
    raise ValueError(f"num_bins must be a Python int >= 1, got {num_bins!r}.")
  probs = jnp.asarray(probs)
  labels = _labels(labels, probs, "expected_calibration_error")
  conf = probs.max(axis=-1)
  correct = (jnp.argmax(probs, axis=-1) == labels).astype(probs.dtype)
  bins = jnp.clip(jnp.ceil(conf * num_bins).astype(jnp.int32) - 1, 0,
                  num_bins - 1)
  count = jnp.zeros(num_bins, probs.dtype).at[bins].add(1.0)
  conf_sum = jnp.zeros(num_bins, probs.dtype).at[bins].add(conf)
  correct_sum = jnp.zeros(num_bins, probs.dtype).at[bins].add(correct)
  return jnp.sum(jnp.abs(correct_sum - conf_sum)) / conf.shape[0]


def evaluate(apply_fn: ApplyFn, mean: PyTree, samples: PyTree, x: ArrayLike,
             labels: ArrayLike, *, num_bins: int = 15) -> dict[str, jax.Array]:
  """All predictors and uncertainty metrics of a posterior on one batch.

  Args:
    apply_fn: ``(params, x) -> logits (B, C)``.
    mean: the posterior mean (the params you hold).
    samples: K posterior samples (leading axis K), e.g.
      ``foovb_sample(opt_state, K)``.
    x: inputs ``(B, ...)``.
    labels: ``(B,)`` integer labels.
    num_bins: ECE bins.

  Returns:
    A dict of scalars: ``accuracy_mean`` (mean weights), ``accuracy_mc``
    (averaged over samples), ``accuracy_vote`` (committee), ``accuracy_bma``;
    ``nll_mean``, ``nll_bma``; ``ece_mean``, ``ece_bma``; ``entropy_mean``,
    ``entropy_bma`` (average predictive entropy) and ``mutual_information``
    (average).

  Example:
    >>> apply_fn = lambda p, x: x @ p["w"]
    >>> m = {"w": jnp.eye(2)}
    >>> s = {"w": jnp.stack([jnp.eye(2)] * 3)}
    >>> float(evaluate(apply_fn, m, s, jnp.eye(2), jnp.array([0, 1]))["accuracy_bma"])
    1.0
  """
  return evaluate_logits(apply_fn(mean, jnp.asarray(x)),
                         sample_logits(apply_fn, samples, x), labels,
                         num_bins=num_bins)


@functools.partial(jax.jit, static_argnames=("num_bins",))
def evaluate_logits(mean_logits: ArrayLike, logits: ArrayLike,
                    labels: ArrayLike, *, num_bins: int = 15
                    ) -> dict[str, jax.Array]:
  """:func:`evaluate` from logits already computed (e.g. batch by batch).

  Args:
    mean_logits: ``(B, C)`` logits of the mean weights.
    logits: ``(K, B, C)`` logits of the K samples.
    labels: ``(B,)`` integer labels.
    num_bins: ECE bins.

  Returns:
    The dict of :func:`evaluate`.

  Example:
    >>> m = jnp.array([[2.0, 0.0], [0.0, 2.0]])
    >>> float(evaluate_logits(m, m[None], jnp.array([0, 1]))["accuracy_bma"])
    1.0
  """
  labels = jnp.asarray(labels)
  mean_logits, logits = jnp.asarray(mean_logits), jnp.asarray(logits)
  mean_logp = jax.nn.log_softmax(mean_logits, axis=-1)
  bma_logp = bma_log_probs(logits)
  mean_p, bma_p = jnp.exp(mean_logp), jnp.exp(bma_logp)
  return {
      "accuracy_mean": accuracy(mean_logits, labels),
      "accuracy_mc": mc_accuracy(logits, labels),
      "accuracy_vote": jnp.mean(committee_vote(logits) == labels),
      "accuracy_bma": accuracy(bma_logp, labels),
      "nll_mean": negative_log_likelihood(mean_logp, labels),
      "nll_bma": negative_log_likelihood(bma_logp, labels),
      "ece_mean": expected_calibration_error(mean_p, labels, num_bins=num_bins),
      "ece_bma": expected_calibration_error(bma_p, labels, num_bins=num_bins),
      "entropy_mean": predictive_entropy(mean_p).mean(),
      "entropy_bma": predictive_entropy(bma_p).mean(),
      "mutual_information": mutual_information(logits).mean(),
  }
