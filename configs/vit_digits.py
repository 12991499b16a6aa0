"""Small Vision Transformer (2x2 patches, 2 blocks, width 64) on scikit-learn's digits.

    python experiments/main.py --config=configs/vit_digits.py --workdir=workdirs/vit_digits

Smoke variant: ``--config=configs/vit_digits.py:smoke``.
"""

from sparse_jax.training.config import apply_variants, base_config


def get_config(arg=None):
  c = base_config()
  c.name = "vit_digits"
  c.model = dict(name="vit", patch=2, dim=64, heads=4, depth=2, mlp_dim=128)
  c.optimizer.name = "adamw"
  c.optimizer.schedule = "warmup_cosine"
  c.optimizer.warmup_steps = 200
  c.train.num_steps = 3000
  return apply_variants(c, arg, {})
