"""The base experiment config every ``configs/*.py`` file starts from."""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType
from typing import Callable, Collection, Mapping

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """All sections and defaults a config may set (dense MLP on digits).

  Sections: ``data`` (see ``sparse_jax.data.load_dataset``), ``model`` (``name`` + the
  model's keyword arguments), ``optimizer`` (see
  ``sparse_jax.training.optim.build_optimizer``), ``train`` (loop knobs;
  ``max_nonfinite_steps``: stop after that many consecutive non-finite losses,
  0 never stops; ``init``: "default" or "alpha_split", the FOO-VB papers'
  initialisation, see ``sparse_jax.training.steps.initial_params``;
  ``dirichlet_alpha``: ``None`` for i.i.d. data-parallel workers, or the
  concentration of each worker's label distribution, see
  ``sparse_jax.data.WorkerSkewedSchedule``).
  :func:`validate` checks them before a run.
  """
  c = ml_collections.ConfigDict()
  c.name = "mlp_digits"
  c.seed = 0
  c.data = ml_collections.ConfigDict(dict(name="digits", num_train=1400, split_seed=0))
  c.model = ml_collections.ConfigDict(dict(name="mlp", hidden=(200, 200)))
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adam", learning_rate=1e-3, schedule="cosine", warmup_steps=0,
      decay_steps=0, decay_factor=0.1, kwargs={}, pre=(), post=()))
  c.train = ml_collections.ConfigDict(dict(
      step="standard", loss_reduction="mean", forward=(), num_steps=3000, batch_size=64,
      log_every=100, eval_every=500, checkpoint_every=1000, eval_batch_size=1000,
      train_eval_examples=10_000, progress_every_secs=10.0,
      max_nonfinite_steps=20, init="default", dirichlet_alpha=None))
  return c


def smoke(c: ml_collections.ConfigDict) -> None:
  """Shrinks a config so it runs end-to-end in seconds (what the tests launch)."""
  c.train.num_steps = 20
  c.train.log_every = 5
  c.train.eval_every = 10
  c.train.checkpoint_every = 10
  c.train.progress_every_secs = 0.0
  c.train.batch_size = min(c.train.batch_size, 32)


def apply_variants(c: ml_collections.ConfigDict, arg: str | None,
                   variants: Mapping[str, Callable[[ml_collections.ConfigDict], None]]
                   ) -> ml_collections.ConfigDict:
  """Applies the comma-separated variants named in ``arg`` (``configs/x.py:arg``).

  ``smoke`` is always available. Unknown names raise a ValueError listing the known.
  """
  table = {"smoke": smoke, **variants}
  for name in filter(None, (arg or "").split(",")):
    if name not in table:
      raise ValueError(f"unknown config variant {name!r}; known: {sorted(table)}")
    table[name](c)
  return c


def split_pair(arg: str | None, first: Collection[str], second: Collection[str], *,
               where: str, kinds: tuple[str, str] = ("variant", "variant"),
               alone: Collection[str] = ()) -> tuple[str | None, str | None, str]:
  """Splits a config arg ``"A,B,rest..."`` with one name from each of two axes.

  E.g. ``configs/nm_teacher.py:nm24,srste,smoke`` -> ``("nm24", "srste",
  "smoke")``. Give one of each axis or neither (both None); the rest (without
  ``alone`` names, such as "dense", which the caller handles) is returned for
  :func:`apply_variants`.

  Raises:
    ValueError: naming ``where``, the ``kinds`` of the two axes and their
      choices, for two of one axis or one axis without the other (which would
      otherwise silently run dense).
  """
  names = [a for a in (arg or "").split(",") if a]
  a = [x for x in names if x in first]
  b = [x for x in names if x in second]
  if len(a) > 1 or len(b) > 1 or bool(a) != bool(b):
    choices = f"one {kinds[0]} {sorted(first)} and one {kinds[1]} {sorted(second)}"
    also = f", or {sorted(alone)}" if alone else ""
    raise ValueError(f"{where}:{arg}: give {choices}{also}, or neither")
  rest = ",".join(x for x in names if x not in first and x not in second
                  and x not in alone)
  return (a[0] if a else None), (b[0] if b else None), rest


def load_config_module(path: str) -> ModuleType:
  """Imports a config file (``configs/x.py``) by path; it has ``get_config(arg)``."""
  name = "_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"config file not found: {path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def teacher_data(**overrides) -> dict:
  """``config.data`` of the teacher-student task used by the experiments.

  64 Gaussian inputs, a ReLU teacher with 128 hidden units, 10 classes,
  noiseless labels; ``overrides`` change any ``make_teacher_task`` argument.
  """
  return dict(dict(name="teacher", input_dim=64, num_classes=10, teacher_hidden=(128,),
                   num_train=50_000, num_test=4_000, temperature=0.0, label_noise=0.0,
                   seed=0), **overrides)


INITS = ("default", "alpha_split")
"""``config.train.init`` choices: the model's own initialisation, or FOO-VB's
papers' (see ``sparse_jax.training.steps.initial_params``)."""

_POSITIVE = ("num_steps", "batch_size", "log_every", "eval_every", "checkpoint_every",
             "eval_batch_size")


def _names(specs) -> list[str]:
  return [dict(s).get("name") for s in (specs or ())]


def validate(config: ml_collections.ConfigDict) -> None:
  """Rejects configs the runners cannot honour, naming the keys involved.

  Checked before anything is built: the loop knobs are positive ints;
  ``sr_ste`` in ``optimizer.pre``/``post`` needs ``nm_ste`` in
  ``train.forward`` (SR-STE's decay assumes the masked forward pass, without it
  the run trains dense); ``train.forward`` is only honoured by the supervised
  runner's ``standard`` and ``data_parallel`` steps; a data-parallel batch must
  split evenly over ``train.num_devices``.

  Raises:
    ValueError: one line naming both keys of a bad combination.
  """
  train = config.train
  runner = config.get("runner", "supervised")
  for key in _POSITIVE:
    value = train.get(key, 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"config.train.{key} must be an int >= 1, got {value!r}")
  limit = train.get("max_nonfinite_steps", 0)
  if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
    raise ValueError("config.train.max_nonfinite_steps must be an int >= 0 "
                     f"(0 disables the check), got {limit!r}")
  init = train.get("init", "default")
  if init not in INITS:
    raise ValueError(f"config.train.init must be one of {INITS}, got {init!r}")
  forward = _names(train.get("forward", ()))
  for where in ("pre", "post"):
    if "sr_ste" in _names(config.optimizer.get(where, ())) and "nm_ste" not in forward:
      raise ValueError(
          f"config.optimizer.{where} has sr_ste but config.train.forward has no "
          "nm_ste: SR-STE's decay is for a masked forward pass and without it "
          "the run trains dense; add dict(name='nm_ste', n=..., m=...) to "
          "config.train.forward")
  step = train.get("step", "standard")
  if forward and (runner != "supervised" or step == "foovb"):
    raise ValueError(
        f"config.train.forward={tuple(forward)} is not applied by "
        f"config.runner={runner!r} with config.train.step={step!r} (only the "
        "supervised standard and data_parallel steps apply it); for FOO-VB with "
        "N:M use foovb_nm_projection in config.optimizer.post")
  if runner == "supervised" and step == "data_parallel":
    n = train.get("num_devices", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
      raise ValueError(f"config.train.num_devices must be an int >= 1, got {n!r}")
    if train.batch_size % n:
      raise ValueError(f"config.train.batch_size={train.batch_size} is not "
                       f"divisible by config.train.num_devices={n}")
  alpha = train.get("dirichlet_alpha", None)
  if alpha is not None:
    if not (runner == "supervised" and step == "data_parallel"):
      raise ValueError(f"config.train.dirichlet_alpha={alpha!r} splits data "
                       "over data-parallel workers: it needs "
                       "config.train.step='data_parallel'")
    if (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
        or not alpha > 0):
      raise ValueError(f"config.train.dirichlet_alpha must be None (i.i.d.) or "
                       f"a number > 0, got {alpha!r}")
