"""Small CNN (two 3x3 conv blocks + Dense) on scikit-learn's digits.

    python experiments/main.py --config=configs/cnn_digits.py --workdir=workdirs/cnn_digits

Smoke variant: ``--config=configs/cnn_digits.py:smoke``.
"""

from sparse_jax.training.config import apply_variants, base_config


def get_config(arg=None):
  c = base_config()
  c.name = "cnn_digits"
  c.model = dict(name="cnn", features=(32, 64), dense=128)
  c.train.num_steps = 2000
  return apply_variants(c, arg, {})
