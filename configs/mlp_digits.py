"""Dense MLP (64-200-200-10) on scikit-learn's digits: the foundation baseline.

Launch (from the repo root):

    python experiments/main.py --config=configs/mlp_digits.py --workdir=workdirs/mlp_digits

Smoke variant (seconds): ``--config=configs/mlp_digits.py:smoke``.

Bayesian variants (the results also report the test NLL and ECE of the final
weights, and for these the Bayesian model average of 16 posterior samples:
``accuracy_bma``, ``nll_bma``, ``ece_bma``): ``bgd`` (FOO-VB diagonal),
``foovb_kron`` (FOO-VB Kronecker), ``ivon`` (IVON, Shen et al. 2024). The
calibration table (3 seeds, docs/results/mlp_digits_calibration.json):

    python experiments/sweep.py --config=configs/mlp_digits.py \\
        --variants=";bgd;foovb_kron;ivon" --metrics=test_accuracy,nll,ece,accuracy_bma,nll_bma,ece_bma \\
        --workdir=workdirs/mlp_digits_calibration
"""

from sparse_jax.training.config import apply_variants, base_config


def bgd(c):
  """FOO-VB diagonal (BGD): K = 10 samples, summed-loss gradients."""
  c.train.step = "foovb"
  c.train.loss_reduction = "sum"
  c.optimizer.name = "foovb"
  c.optimizer.kwargs = dict(covariance="diagonal", init_std=0.05, eta=1.0,
                            num_samples=10)


def foovb_kron(c):
  """FOO-VB Kronecker: K = 10 samples, the papers' initialisation."""
  bgd(c)
  c.train.init = "alpha_split"
  c.optimizer.kwargs = dict(covariance="kron", eta=1.0, num_samples=10)


def ivon(c):
  """IVON: one sample per step, mean-loss gradients, ess = the training set."""
  c.train.step = "foovb"              # the K-sample step
  c.train.loss_reduction = "mean"
  c.optimizer.name = "ivon"
  c.optimizer.learning_rate = 0.1
  c.optimizer.kwargs = dict(ess=1400.0, hess_init=0.1, weight_decay=1e-4,
                            num_samples=1)


def get_config(arg=None):
  c = base_config()
  c.name = "mlp_digits"
  return apply_variants(c, arg, {"bgd": bgd, "foovb_kron": foovb_kron,
                                 "ivon": ivon})
