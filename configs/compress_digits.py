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
sparsity), ``nm14`` (1:4 N:M), ``dgc01`` (DGC at 0.1%: momentum correction, factor
masking, clipping, warm-up 75% -> 99.9% over the first 400 steps). Feedback: ``ef`` (EF14 memory), ``ef21``,
``noef`` (drop what is not sent). Task: ``teacher`` (the teacher-student task).
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
}
FEEDBACK = {"ef": "ef", "ef21": "ef21", "noef": "none"}
SWEEP = dict(
    variants=["dense", "topk1,ef", "topk1,noef", "topk01,ef", "topk01,noef", "topk01,ef21",
              "randk1,ef", "lognormal1,ef", "nm14,ef", "dgc01"],
    seeds=[0, 1, 2],
    metrics=["test_accuracy", "total_bytes_received", "total_bytes_dense"])


def dgc(c):
  warm = [dict(fraction=f) for f in (0.25, 0.0625, 0.015625, 0.004)]
  c.optimizer.pre = (dict(name="error_feedback", compressor="top_k",
                          compressor_kwargs=dict(fraction=0.001), variant="dgc",
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
  if comp:
    c.optimizer.pre = (dict(name="error_feedback", variant=FEEDBACK[feedback],
                            axis_name="data", **COMPRESSORS[comp]),)
  if "dgc01" in (arg or "").split(","):
    dgc(c)
  return apply_variants(c, rest, {"teacher": teacher, "smoke": smoke})
