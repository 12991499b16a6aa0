"""Small CNN on MNIST read from local IDX files (nothing is downloaded).

    python experiments/main.py --config=configs/mnist_cnn.py \
        --config.data.data_dir=/path/to/mnist --workdir=workdirs/mnist_cnn

``data_dir`` holds train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz],
t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz].
Smoke variant: ``--config=configs/mnist_cnn.py:smoke``.
"""

from sparse_jax.training.config import apply_variants, base_config


def get_config(arg=None):
  c = base_config()
  c.name = "mnist_cnn"
  c.data = dict(name="mnist", data_dir="")
  c.model = dict(name="cnn", features=(32, 64), dense=128)
  c.train.batch_size = 128
  c.train.num_steps = 5000
  return apply_variants(c, arg, {})
