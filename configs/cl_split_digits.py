"""Task-agnostic continual learning on split digits: 5 two-class tasks.

    python experiments/main.py --config=configs/cl_split_digits.py:bgd,domain --workdir=workdirs/cl_split_bgd

Scenarios (variants): ``domain`` (labels 0/1 within each task, shared 2-way head; the
default), ``class`` (10-way head, original labels), ``task`` (10-way head, training
and evaluation restricted to the task's two classes: multi-head). Methods: ``sgd``,
``adam``, ``ewc`` (online EWC oracle), ``bgd`` (FOO-VB diagonal), ``foovb_kron``.
MLP 64-200-200-k, batches of 32, 10 epochs per task, no task-boundary signal.
"""

import os

from sparse_jax.training.config import apply_variants, load_config_module


def get_config(arg=None):
  base = load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                         "cl_permuted_digits.py"))
  c = base.get_config()
  c.name = "cl_split_digits"
  c.stream.kind = "split"
  c.stream.scenario = "domain"
  variants = {name: getattr(base, name)
              for name in ("sgd", "adam", "ewc", "bgd", "foovb_kron", "smoke")}
  for scenario in ("domain", "class", "task"):
    variants[scenario] = lambda c, s=scenario: setattr(c.stream, "scenario", s)
  return apply_variants(c, arg, variants)
