"""CIFAR-style ResNet-20 on CIFAR-10 read from local pickle batches (nothing is downloaded).

    python experiments/main.py --config=configs/cifar_resnet.py \
        --config.data.data_dir=/path/to/cifar-10-batches-py --workdir=workdirs/cifar_resnet

Smoke variant: ``--config=configs/cifar_resnet.py:smoke`` (ResNet-8, a few steps).
"""

from sparse_jax.training.config import apply_variants, base_config, smoke as _smoke


def smoke(c):
  _smoke(c)
  c.model.blocks_per_stage = 1


def get_config(arg=None):
  c = base_config()
  c.name = "cifar_resnet"
  c.data = dict(name="cifar10", data_dir="")
  c.model = dict(name="resnet", widths=(16, 32, 64), blocks_per_stage=3)
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.1
  c.optimizer.kwargs = dict(momentum=0.9, nesterov=True)
  c.optimizer.pre = ({"name": "optax.add_decayed_weights", "weight_decay": 5e-4},)
  c.train.batch_size = 128
  c.train.num_steps = 30_000
  return apply_variants(c, arg, {"smoke": smoke})
