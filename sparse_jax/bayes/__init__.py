"""FOO-VB online variational Bayes (diagonal, Kronecker, full) and Bayesian prediction.

A training step (gradients of the SUMMED batch loss at K posterior samples)::

    tx = sj.bayes.foovb(covariance="kron", num_samples=K)
    opt_state = tx.init(params)
    samples = sj.bayes.foovb_sample(opt_state, K)       # leading axis K
    grads = jax.vmap(jax.grad(loss), (0, None))(samples, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)       # the posterior mean

and prediction: ``sj.bayes.evaluate(apply_fn, params, foovb_sample(opt_state,
K), x, y)`` (mean weights, MC average, committee vote, BMA; NLL, ECE, entropy).

IVON (``sj.bayes.ivon(lr, ess=N)``, Shen et al. 2024) is the strong baseline:
a diagonal posterior at Adam's cost, with the same sampling and prediction
API (gradients of the batch-MEAN loss by default).

Modules:
  fixed_point  pure math: the stable diagonal (BGD) step, the closed-form
               solution of ``X X^T + V E X^T - V = 0``, covariance mixing.
  kronecker    pure math of the matrix-variate posterior in the Flax layout.
  layout       which params leaf gets which posterior (static).
  transform    the optax transform foovb, sampling, state helpers.
  ivon         the optax transform ivon (IVON, Algorithm 1).
  step         a training step (K sampled gradients, BatchNorm statistics).
  sparse       the posterior mean projected onto (transposable) N:M masks
               scored by |mean| / std (foovb_nm_projection).
  predict      mean / MC / committee / BMA prediction, entropy, ECE, NLL.
"""

from sparse_jax.bayes.fixed_point import (
    diagonal_std_update,
    fixed_point_factor,
    fixed_point_residual,
    solve_fixed_point,
    solve_fixed_point_factor,
)
from sparse_jax.bayes.transform import (
    FooVBPosterior,
    FooVBState,
    IVONState,
    KronFactors,
    alpha_split_init,
    find_foovb_state,
    foovb,
    foovb_sample,
    foovb_set_mean,
    foovb_std,
)
from sparse_jax.bayes.ivon import ivon
from sparse_jax.bayes.kronecker import kron_covariance
from sparse_jax.bayes.predict import (
    accuracy,
    bma_log_probs,
    bma_probs,
    committee_vote,
    evaluate,
    evaluate_logits,
    expected_calibration_error,
    mc_accuracy,
    mutual_information,
    negative_log_likelihood,
    predictive_entropy,
    sample_logits,
)
from sparse_jax.bayes.step import foovb_step, sample_gradients
from sparse_jax.bayes.sparse import (
    FooVBNMState,
    apply_masks,
    foovb_nm_masks,
    foovb_nm_projection,
    foovb_snr,
)

__all__ = [
    "FooVBNMState",
    "FooVBPosterior",
    "FooVBState",
    "IVONState",
    "KronFactors",
    "accuracy",
    "alpha_split_init",
    "apply_masks",
    "bma_log_probs",
    "bma_probs",
    "committee_vote",
    "diagonal_std_update",
    "evaluate",
    "evaluate_logits",
    "expected_calibration_error",
    "find_foovb_state",
    "fixed_point_factor",
    "fixed_point_residual",
    "foovb",
    "foovb_nm_masks",
    "foovb_nm_projection",
    "foovb_sample",
    "foovb_set_mean",
    "foovb_snr",
    "foovb_std",
    "ivon",
    "foovb_step",
    "kron_covariance",
    "mc_accuracy",
    "mutual_information",
    "negative_log_likelihood",
    "predictive_entropy",
    "sample_gradients",
    "sample_logits",
    "solve_fixed_point",
    "solve_fixed_point_factor",
]
