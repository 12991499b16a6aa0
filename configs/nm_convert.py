"""Convert a trained dense model to N:M with little or no training (AdaPrune).

    python experiments/main.py --config=configs/nm_convert.py --workdir=workdirs/nm_convert

Trains a dense CIFAR-style ResNet-8 (with BatchNorm) on digits, then reports the test
accuracy of: the dense model; one-shot magnitude N:M; one-shot + BatchNorm
re-estimation; layer-wise reconstruction on 256 calibration images (Adam 1e-3, 1000
iterations, batch 50 per layer); reconstruction + BatchNorm re-estimation. The stem
(3x3 conv on 1 channel) and the head stay dense.

The dense model is trained once per seed and converted to every pattern of
``config.convert.patterns`` (2:4, 4:8, 1:4, T-2:4, T-4:8). Over 3 seeds:

    python experiments/sweep.py --config=configs/nm_convert.py --workdir=workdirs/nm_convert

Variants: ``teacher`` converts the teacher-student MLP (no BatchNorm) instead;
``wanda`` / ``sparsegpt`` choose the one-shot masks from calibration activations
(Wanda: ``|w| ||x_j||``; SparseGPT: masks and optimal-brain-surgeon weight
updates, layer by layer with the earlier layers pruned) instead of magnitude;
``smoke``.
"""

import ml_collections

from sparse_jax.training.config import (apply_variants, base_config, smoke as _smoke,
                                        teacher_data)

PATTERNS = ("2:4", "4:8", "1:4", "T-2:4", "T-4:8")
STAGES = ("one_shot", "one_shot_bn", "reconstructed", "reconstructed_bn")
SWEEP = dict(variants=[""], seeds=[0, 1, 2],
             metrics=["test_accuracy_dense"] + [f"test_accuracy_{p}_{s}"
                                                for p in PATTERNS for s in STAGES])


def teacher(c):
  c.data = teacher_data()
  c.model = dict(name="mlp", hidden=(256, 256))
  c.optimizer = dict(name="adam", learning_rate=1e-3, schedule="cosine",
                     warmup_steps=0, decay_steps=0, decay_factor=0.1, kwargs={},
                     pre=(), post=())
  c.train.batch_size = 128
  c.train.num_steps = 4000


def wanda(c):
  c.convert.criterion = "wanda"


def sparsegpt(c):
  c.convert.criterion = "sparsegpt"


def smoke(c):
  _smoke(c)
  if c.model.name == "resnet":   # two stages: still a strided shortcut conv
    c.model.widths = (8, 16)
  c.convert.patterns = ("T-2:4",)
  c.convert.num_steps = 10
  c.convert.calibration_examples = 32


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
      patterns=PATTERNS, exclude=("stem", "head"), criterion="magnitude",
      calibration_examples=256,
      num_steps=1000, learning_rate=1e-3, batch_size=50))
  return apply_variants(c, arg, {"teacher": teacher, "wanda": wanda,
                                 "sparsegpt": sparsegpt, "smoke": smoke})
