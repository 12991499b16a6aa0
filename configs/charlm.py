"""Flagship: N:M sparsity on a character-level Transformer LM, on real offline text.

One seed of the README table (the dense model, converted one-shot to 2:4 by
magnitude, Wanda and SparseGPT; 2:4 training by SR-STE and S-STE):

    python experiments/sweep.py --config=configs/charlm.py --sweep=flagship --workdir=workdirs/charlm

One run (a pattern and a method, or ``dense``, or ``convert``):

    python experiments/main.py --config=configs/charlm.py:nm24,sste --workdir=workdirs/charlm_nm24_sste

The full table (every variant in ``SWEEP``, 3 seeds):

    python experiments/sweep.py --config=configs/charlm.py --workdir=workdirs/charlm

Task: next-character prediction on the Python standard library's own sources
(``sparse_jax.data.load_python_text``: 24 modules train, 5 other modules are the
held-out test text; nothing is downloaded). Model: a 2-block causal Transformer
(width 64, 4 heads, MLP 256; q/k/v/out and MLP kernels are Dense, so every
method prunes them; embedding, position table and head stay dense). Metric:
held-out bits per character (``test_bpc``; lower is better).

Variants (comma-separated after the ``:``):

- ``dense``: no sparsity.
- a pattern ``nm24`` (2:4), ``nm48`` (4:8), ``nm816`` (8:16), ``nm14`` (1:4),
  ``t24`` / ``t48`` / ``t816`` (transposable) and a method ``proj`` (hard
  projection every step), ``ste``, ``srste`` (STE + masked decay 2e-4 on the
  gradients before AdamW), ``sste`` (S-STE with fixed scales; not transposable).
- ``df``: dense fine-tuning for the last sixth of the steps (Hu et al. 2024;
  STE-type methods); the final model is dense.
- ``convert``: train dense, then convert it one-shot to 2:4, 4:8, 8:16 and T-4:8
  by magnitude, Wanda and SparseGPT (256 calibration sequences), each also
  refitted layer by layer (AdaPrune).
- ``flagship``: marks the README subset (a sweep over ``FLAGSHIP`` variants).
- ``smoke``: a few steps.
"""

import ml_collections

from sparse_jax.training.config import (NM_METHODS, apply_variants, base_config,
                                        nm_sparsify, smoke as _smoke, split_pair)

PATTERNS = {"nm24": (2, 4, False), "nm48": (4, 8, False), "nm816": (8, 16, False),
            "nm14": (1, 4, False), "t24": (2, 4, True), "t48": (4, 8, True),
            "t816": (8, 16, True)}
TABLE_PATTERNS = ("nm24", "nm48", "t48", "nm816")
MD_PATTERNS = ("nm14", "nm24", "nm48", "t24", "t48", "nm816", "t816")
"""The patterns of the mask-diversity plot (trained with SR-STE)."""
CONVERT_PATTERNS = ("2:4", "4:8", "8:16", "T-4:8")
CRITERIA = ("magnitude", "wanda", "sparsegpt")

FLAGSHIP = ["convert,flagship", "nm24,srste", "nm24,sste"]
"""The README's one-seed table (2-3 minutes on 2 CPU cores); the convert run
trains the dense model and reports it (row ``convert,flagship/dense``). Hard
projection and STE are in the full table (``SWEEP``)."""

_TABLE = [f"{p},{m}" for p in TABLE_PATTERNS for m in NM_METHODS
          if not (PATTERNS[p][2] and m == "sste")]
_MD = [f"{p},srste" for p in MD_PATTERNS if f"{p},srste" not in _TABLE]
SWEEP = dict(variants=["convert", *_TABLE, "nm24,srste,df", "nm24,sste,df", *_MD],
             seeds=[0, 1, 2],
             metrics=["test_bpc", "test_accuracy", "wall_s"])
SWEEPS = {"flagship": dict(variants=FLAGSHIP, seeds=[0],
                           metrics=["test_bpc", "test_accuracy", "wall_s"])}


def convert(c):
  c.runner = "convert"
  c.convert = ml_collections.ConfigDict(dict(
      patterns=CONVERT_PATTERNS, exclude=("head",), criteria=CRITERIA,
      stages=("one_shot", "reconstructed"), calibration_examples=256,
      num_steps=300, learning_rate=1e-3, batch_size=32))


def get_config(arg=None):
  c = base_config()
  c.data = dict(name="python_text", seq_len=64)
  c.model = dict(name="char_transformer", dim=64, heads=4, depth=2, mlp_dim=256)
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 3e-3
  c.optimizer.schedule = "warmup_cosine"
  c.optimizer.warmup_steps = 100
  c.train.num_steps = 1000
  c.train.batch_size = 32
  c.train.log_every = 100
  c.train.eval_every = 1000
  c.train.checkpoint_every = 500
  c.train.train_eval_examples = 500
  pattern, method, rest = split_pair(arg, PATTERNS, NM_METHODS,
                                     where="configs/charlm.py",
                                     kinds=("pattern", "method"), alone=("dense",))
  names = [r for r in rest.split(",") if r]
  finetune = "df" in names
  if finetune and method not in ("ste", "srste", "sste"):
    raise ValueError(f"configs/charlm.py:{arg}: df (dense fine-tuning) needs a "
                     "pattern and an STE-type method (ste, srste, sste)")
  c.name = "charlm:" + (arg or "dense")

  def flagship(c):  # the README's subset: one-shot conversion to 2:4 only
    if c.get("convert") is not None:
      c.convert.patterns = ("2:4",)
      c.convert.stages = ("one_shot",)

  def smoke(c):   # a tiny model on short sequences: seconds
    _smoke(c)
    c.data.seq_len = 16
    c.model = dict(name="char_transformer", dim=32, heads=2, depth=1, mlp_dim=64)
    c.train.eval_batch_size = 2000
    c.train.train_eval_examples = 200
    if c.get("convert") is not None:
      c.convert.patterns = ("2:4",)
      c.convert.num_steps = 5
      c.convert.calibration_examples = 16

  apply_variants(c, ",".join(x for x in names if x != "df"),
                 {"convert": convert, "flagship": flagship, "smoke": smoke})
  if pattern:   # after the variants: df counts the final num_steps
    n, m, transposable = PATTERNS[pattern]
    nm_sparsify(c, n, m, method, transposable=transposable,
                dense_finetune_from=(c.train.num_steps * 5 // 6 if finetune else None))
  return c
