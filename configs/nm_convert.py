"""Convert a trained dense model to N:M with little or no training (AdaPrune).

    python experiments/main.py --config=configs/nm_convert.py --workdir=workdirs/nm_convert

Trains a dense CIFAR-style ResNet-8 (with BatchNorm) on digits, then reports the test
accuracy of: the dense model; one-shot magnitude N:M; one-shot + BatchNorm
re-estimation; layer-wise reconstruction on 256 calibration images (Adam 1e-3, 1000
iterations, batch 50 per layer); reconstruction + BatchNorm re-estimation. The stem
(3x3 conv on 1 channel) and the head stay dense.

Patterns (variants): ``nm24`` (default), ``nm14``, ``nm48``, ``t24``, ``t48``;
``teacher`` converts the teacher-student MLP instead; ``smoke``.
"""

import ml_collections

from sparse_jax.training.config import apply_variants, base_config, smoke as _smoke

PATTERNS = {"nm24": (2, 4, False), "nm48": (4, 8, False), "nm14": (1, 4, False),
            "t24": (2, 4, True), "t48": (4, 8, True)}
SWEEP = dict(variants=list(PATTERNS), seeds=[0, 1, 2])


def _pattern(name):
  def apply(c):
    c.convert.n, c.convert.m, c.convert.transposable = PATTERNS[name]
  return apply


def teacher(c):
  c.data = dict(name="teacher", input_dim=64, num_classes=10, teacher_hidden=(128,),
                num_train=50_000, num_test=4_000, temperature=0.0, label_noise=0.0,
                seed=0)
  c.model = dict(name="mlp", hidden=(256, 256))
  c.optimizer = dict(name="adam", learning_rate=1e-3, schedule="cosine",
                     warmup_steps=0, decay_steps=0, decay_factor=0.1, kwargs={},
                     pre=(), post=())
  c.train.batch_size = 128
  c.train.num_steps = 4000


def smoke(c):
  _smoke(c)
  c.convert.num_steps = 20
  c.convert.calibration_examples = 64


def get_config(arg=None):
  c = base_config()
  c.name = "nm_convert"
  c.runner = "convert"
  c.model = dict(name="resnet", widths=(16, 32, 64), blocks_per_stage=1)
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.05
  c.optimizer.kwargs = dict(momentum=0.9, nesterov=True)
  c.train.num_steps = 1500
  c.convert = ml_collections.ConfigDict(dict(
      n=2, m=4, transposable=False, exclude=("stem", "head"), calibration_examples=256,
      num_steps=1000, learning_rate=1e-3, batch_size=50))
  variants = {name: _pattern(name) for name in PATTERNS}
  variants.update(teacher=teacher, smoke=smoke)
  return apply_variants(c, arg, variants)
