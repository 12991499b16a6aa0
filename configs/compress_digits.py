"""Data-parallel training with compressed gradients and error feedback, 8 workers.

    python experiments/main.py --config=configs/compress_digits.py:topk01,ef --workdir=workdirs/topk01_ef

The whole comparison over 3 seeds (accuracy and total bytes on the wire per device):

    python experiments/sweep.py --config=configs/compress_digits.py --workdir=workdirs/compress_digits

8 workers (fake CPU devices are made automatically when the machine has fewer), each
with its own residual, inside ``jax.shard_map``; compressed (values, indices) are
all-gathered and scatter-added. MLP 64-200-200-10 on digits, SGD, global batch 128
(16 per worker). Every step is logged, so ``results.json`` has the exact
``total_bytes_received`` per device (and ``total_bytes_dense``, a ring all-reduce
of the same gradients).

Compressors (variants): ``dense`` (all-reduce), ``topk1`` / ``topk01`` (top 1% /
0.1% per tensor), ``randk1`` (random 1%), ``lognormal1`` (lognormal threshold at 99%
sparsity), ``nm14`` (1:4 N:M); low-precision formats, every value sent:
``fp8`` (e4m3), ``fp8e5`` (e5m2), ``lnfp8`` (8-bit, split chosen per tensor from the
lognormal fit), ``fp4`` / ``fp4n`` (radix-4 FP4, stochastic / nearest rounding); and ``topk1fp8`` /
``topk01fp8`` (top-k values sent as e4m3). Feedback: ``ef`` (EF14 memory), ``ef21``,
``econtrol``, ``dgc`` (momentum correction, factor masking, clipping, warm-up 75% ->
the target over the first 400 steps), ``noef`` (drop what is not sent); ``dgc01`` is
``topk01,dgc``. Task: ``teacher`` (the teacher-student task).

Heterogeneous workers: ``alpha1`` / ``alpha01`` give each worker its own label
distribution, Dirichlet(1) / Dirichlet(0.1) over the classes
(``config.train.dirichlet_alpha``; default i.i.d.). Learning rate: ``lr005`` /
``lr02`` (default 0.1). The heterogeneity study (3 seeds, 8 workers):

    python experiments/sweep.py --config=configs/compress_digits.py --variants="$(python configs/compress_digits.py hetero)" --workdir=workdirs/compress_hetero

Low-precision formats, accuracy vs bytes (3 seeds): ``formats`` instead of ``hetero``.
"""

import ml_collections

from sparse_jax.training.config import (apply_variants, base_config, split_pair,
                                        teacher_data)

COMPRESSORS = {
    "topk1": dict(compressor="top_k", compressor_kwargs=dict(fraction=0.01)),
    "topk01": dict(compressor="top_k", compressor_kwargs=dict(fraction=0.001)),
    "randk1": dict(compressor="rand_k", compressor_kwargs=dict(fraction=0.01)),
    "lognormal1": dict(compressor="lognormal", compressor_kwargs=dict(sparsity=0.99)),
    "nm14": dict(compressor="nm", compressor_kwargs=dict(n=1, m=4)),
    "fp8": dict(compressor="fp_quantize",
                compressor_kwargs=dict(exponent_bits=4, mantissa_bits=3)),
    "fp8e5": dict(compressor="fp_quantize",
                  compressor_kwargs=dict(exponent_bits=5, mantissa_bits=2)),
    "lnfp8": dict(compressor="lognormal_fp", compressor_kwargs=dict(bits=8)),
    "fp4": dict(compressor="fp4", compressor_kwargs=dict(rounding="stochastic")),
    "fp4n": dict(compressor="fp4", compressor_kwargs=dict(rounding="nearest")),
    "topk1fp8": dict(compressor="top_k", compressor_kwargs=dict(fraction=0.01),
                     values=dict(name="fp_quantize", exponent_bits=4, mantissa_bits=3)),
    "topk01fp8": dict(compressor="top_k", compressor_kwargs=dict(fraction=0.001),
                      values=dict(name="fp_quantize", exponent_bits=4,
                                  mantissa_bits=3)),
}
FEEDBACK = {"ef": "ef", "ef21": "ef21", "econtrol": "econtrol", "dgc": "dgc",
            "noef": "none"}
HETERO = dict(methods=["noef", "ef", "ef21", "econtrol", "dgc"],
              compressors=["topk01", "topk1"], alphas=["", "alpha1", "alpha01"],
              lrs=["lr005", "lr02"])


FORMATS_STUDY = ["dense", "fp8,ef", "fp8,noef", "fp8e5,ef", "fp8e5,noef", "lnfp8,ef",
                 "lnfp8,noef", "fp4,ef", "fp4,noef", "fp4n,ef", "fp4n,noef", "topk1fp8,ef", "topk1fp8,noef",
                 "topk1,ef", "topk01fp8,ef", "topk01,ef"]
"""Accuracy vs bytes of the low-precision formats, with and without EF."""


def hetero_variants() -> list[str]:
  """The heterogeneity study: every method x compressor x alpha x lr, + dense."""
  out = []
  for alpha in HETERO["alphas"]:
    for lr in HETERO["lrs"]:
      out.append(",".join(filter(None, ["dense", alpha, lr])))
      for comp in HETERO["compressors"]:
        for method in HETERO["methods"]:
          out.append(",".join(filter(None, [comp, method, alpha, lr])))
  return out
SWEEP = dict(
    variants=["dense", "topk1,ef", "topk1,noef", "topk01,ef", "topk01,noef", "topk01,ef21",
              "randk1,ef", "lognormal1,ef", "nm14,ef", "dgc01"],
    seeds=[0, 1, 2],
    metrics=["test_accuracy", "total_bytes_received", "total_bytes_dense"])


def dgc(c, fraction=0.001):
  warm = [dict(fraction=f) for f in (0.25, 0.0625, 0.015625, 0.004) if f > fraction]
  c.optimizer.pre = (dict(name="error_feedback", compressor="top_k",
                          compressor_kwargs=dict(fraction=fraction), variant="dgc",
                          axis_name="data", momentum=0.9, clip_norm=1.0,
                          warmup=tuple(warm), warmup_steps=100),)


def teacher(c):
  c.data = teacher_data(num_train=20_000)


def smoke(c):
  c.train.num_steps = 12
  c.train.eval_every = 6
  c.train.checkpoint_every = 6
  c.train.progress_every_secs = 0.0
  for item in c.optimizer.pre:
    if "warmup_steps" in item:
      item["warmup_steps"] = 2


def get_config(arg=None):
  c = base_config()
  c.name = "compress_digits"
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.1
  c.optimizer.schedule = "constant"
  c.train.step = "data_parallel"
  c.train.num_devices = 8
  c.train.batch_size = 128
  c.train.num_steps = 2000
  c.train.log_every = 1
  c.train.eval_every = 500
  comp, feedback, rest = split_pair(arg, COMPRESSORS, FEEDBACK,
                                    where="configs/compress_digits.py",
                                    kinds=("compressor", "feedback"),
                                    alone=("dense", "dgc01"))
  if "dgc01" in (arg or "").split(","):
    comp, feedback = "topk01", "dgc"
  if feedback == "dgc":
    if COMPRESSORS[comp]["compressor"] != "top_k" or "values" in COMPRESSORS[comp]:
      raise ValueError(f"configs/compress_digits.py:{arg}: dgc is top-k only")
    dgc(c, COMPRESSORS[comp]["compressor_kwargs"]["fraction"])
  elif comp:
    c.optimizer.pre = (dict(name="error_feedback", variant=FEEDBACK[feedback],
                            axis_name="data", **COMPRESSORS[comp]),)
  return apply_variants(c, rest, {
      "teacher": teacher, "smoke": smoke,
      "alpha1": lambda c: setattr(c.train, "dirichlet_alpha", 1.0),
      "alpha01": lambda c: setattr(c.train, "dirichlet_alpha", 0.1),
      "lr005": lambda c: setattr(c.optimizer, "learning_rate", 0.05),
      "lr02": lambda c: setattr(c.optimizer, "learning_rate", 0.2)})


if __name__ == "__main__":   # prints a sweep's --variants list
  import sys
  studies = {"hetero": hetero_variants, "formats": lambda: FORMATS_STUDY}
  if len(sys.argv) != 2 or sys.argv[1] not in studies:
    sys.exit("usage: python configs/compress_digits.py hetero|formats")
  print(";".join(studies[sys.argv[1]]()))
