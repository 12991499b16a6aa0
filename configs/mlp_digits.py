"""Dense MLP (64-200-200-10) on scikit-learn's digits: the foundation baseline.

Launch (from the repo root):

    python experiments/main.py --config=configs/mlp_digits.py --workdir=workdirs/mlp_digits

Smoke variant (seconds): ``--config=configs/mlp_digits.py:smoke``.
"""

from sparse_jax.training.config import apply_variants, base_config


def get_config(arg=None):
  c = base_config()
  c.name = "mlp_digits"
  return apply_variants(c, arg, {})
