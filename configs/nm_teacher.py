"""N:M on an MLP teacher task (the earlier flagship; the current one is configs/charlm.py).

One run (a pattern and a method; the head stays dense):

    python experiments/main.py --config=configs/nm_teacher.py:nm24,srste --workdir=workdirs/nm24_srste

The whole comparison (every variant below, 3 seeds, mean +- std table):

    python experiments/sweep.py --config=configs/nm_teacher.py --workdir=workdirs/nm_teacher

Task: the synthetic teacher-student task (64 inputs, ReLU teacher with 128 hidden
units, 50k examples): an MLP student 64-64-64-10 is capacity-limited there, so
removing weights costs accuracy and the methods separate (digits is too easy at 50%).

Patterns: ``nm24`` (2:4), ``nm48`` (4:8), ``nm14`` (1:4), ``t24`` / ``t48``
(transposable 2:4 / 4:8: rows and columns of every m x m tile keep n; exact masks).
Methods: ``proj`` (hard projection after every step, mask recomputed every step),
``ste`` (masked forward pass, straight-through gradient to dense weights), ``srste``
(STE + decay 2e-4 of the pruned weights, Zhou et al. 2021), ``sste`` (S-STE's
continuous soft-thresholding with fixed scales, Hu et al. 2024; not transposable,
not in the sweep). No pattern: dense.
"""

from sparse_jax.training.config import (apply_variants, base_config, nm_sparsify,
                                        split_pair, teacher_data)

PATTERNS = {"nm24": (2, 4, False), "nm48": (4, 8, False), "nm14": (1, 4, False),
            "t24": (2, 4, True), "t48": (4, 8, True)}
METHODS = ("proj", "ste", "srste", "sste")
SWEEP = dict(variants=["dense"] + [f"{p},{m}" for p in PATTERNS for m in METHODS[:3]],
             seeds=[0, 1, 2])


def sparsify(c, pattern: str, method: str, **kwargs) -> None:
  """Writes the optimizer / forward spec of an N:M ``pattern`` x ``method`` into ``c``."""
  n, m, transposable = PATTERNS[pattern]
  nm_sparsify(c, n, m, method, transposable=transposable, **kwargs)


def get_config(arg=None):
  c = base_config()
  c.name = "nm_teacher"
  c.data = teacher_data()
  c.model = dict(name="mlp", hidden=(64, 64))
  c.train.batch_size = 128
  c.train.num_steps = 4000
  c.train.eval_every = 1000
  pattern, method, rest = split_pair(arg, PATTERNS, METHODS, where="configs/nm_teacher.py",
                                     kinds=("pattern", "method"), alone=("dense",))
  if pattern:
    sparsify(c, pattern, method)
  c.name = "nm_teacher:" + (f"{pattern},{method}" if pattern else "dense")
  return apply_variants(c, rest, {})
