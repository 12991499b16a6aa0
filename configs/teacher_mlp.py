"""MLP student on the synthetic teacher-student task (size and difficulty are knobs).

    python experiments/main.py --config=configs/teacher_mlp.py --workdir=workdirs/teacher_mlp

Knobs: ``--config.data.input_dim``, ``--config.data.teacher_hidden``,
``--config.data.num_train``, ``--config.data.temperature``, ``--config.data.label_noise``.
Variants: ``hard`` (deeper teacher, fewer examples, noisy labels); ``smoke``.
"""

from sparse_jax.training.config import apply_variants, base_config, teacher_data


def hard(c):
  c.data.teacher_hidden = (256, 256)
  c.data.num_train = 4000
  c.data.temperature = 0.3


def get_config(arg=None):
  c = base_config()
  c.name = "teacher_mlp"
  c.data = teacher_data(num_train=20_000)
  c.model = dict(name="mlp", hidden=(256, 256))
  c.train.batch_size = 128
  c.train.num_steps = 4000
  return apply_variants(c, arg, {"hard": hard})
