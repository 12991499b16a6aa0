"""Task-agnostic continual learning on split digits: 5 two-class tasks.

    python experiments/main.py --config=configs/cl_split_digits.py:bgd,domain --workdir=workdirs/cl_split_bgd

Scenarios (variants): ``domain`` (labels 0/1 within each task, shared 2-way head; the
default), ``class`` (10-way head, original labels), ``task`` (10-way head, training
and evaluation restricted to the task's two classes: multi-head). Methods: ``sgd``,
``adam``, ``ewc`` (online EWC oracle), ``bgd`` (FOO-VB diagonal), ``foovb_kron``.
MLP 64-200-200-k, batches of 32, 10 epochs per task, no task-boundary signal.
Here SGD uses lr 0.01 and BGD std_init 0.017, eta 1 (best on seed 0 of the domain
scenario among SGD lr {0.01, 0.1} and BGD std_init {0.017, 0.05, 0.1}); the rest as in
cl_permuted_digits. The 3-seed table (docs/results/cl_split_digits.json):

    python experiments/sweep.py --config=configs/cl_split_digits.py --workdir=workdirs/cl_split
"""

import os

from sparse_jax.training.config import apply_variants, load_config_module


SWEEP = dict(variants=["sgd", "adam", "ewc", "bgd", "ivon", "foovb_kron_paper", "foovb_kron"],
             seeds=[0, 1, 2],
             metrics=["average_accuracy", "forgetting", "backward_transfer"])


def _base():
  return load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                         "cl_permuted_digits.py"))


def _bgd(c):
  _base().bgd(c)
  c.optimizer.kwargs.init_std = 0.017  # the BGD paper's split-MNIST value
  c.optimizer.kwargs.eta = 1.0


def get_config(arg=None):
  base = _base()
  c = base.get_config()
  c.name = "cl_split_digits"
  c.stream.kind = "split"
  c.stream.scenario = "domain"
  c.optimizer.learning_rate = 0.01  # the default method is SGD
  variants = {name: getattr(base, name)
              for name in ("adam", "ewc", "foovb_kron", "foovb_kron_paper", "ivon",
                             "smoke")}
  variants["sgd"] = lambda c: base.sgd(c, learning_rate=0.01)
  variants["bgd"] = _bgd
  for scenario in ("domain", "class", "task"):
    variants[scenario] = lambda c, s=scenario: setattr(c.stream, "scenario", s)
  return apply_variants(c, arg, variants)
