"""CIFAR-style ResNet with BatchNorm on scikit-learn's digits.

    python experiments/main.py --config=configs/resnet_digits.py --workdir=workdirs/resnet_digits

Variants: ``resnet20`` (3 blocks per stage); ``smoke``.
"""

from sparse_jax.training.config import apply_variants, base_config


def resnet20(c):
  c.model.blocks_per_stage = 3


def get_config(arg=None):
  c = base_config()
  c.name = "resnet_digits"
  c.model = dict(name="resnet", widths=(16, 32, 64), blocks_per_stage=1)
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.05
  c.optimizer.kwargs = dict(momentum=0.9, nesterov=True)
  c.train.num_steps = 2000
  return apply_variants(c, arg, {"resnet20": resnet20})
