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
  ``sparse_jax.data.WorkerSkewedSchedule``; ``forward``: forward-pass weight
  transforms such as ``nm_ste`` / ``s_ste``; ``forward_until``: the step from
  which they stop, for dense fine-tuning, None: never).
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
      step="standard", loss_reduction="mean", forward=(), forward_until=None,
      num_steps=3000, batch_size=64,
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


NM_METHODS = ("proj", "ste", "srste", "sste")
"""N:M training methods of :func:`nm_sparsify`."""


def nm_sparsify(c: ml_collections.ConfigDict, n: int, m: int, method: str, *,
                transposable: bool = False, exclude=("head",), decay: float = 2e-4,
                dense_finetune_from: int | None = None, **options) -> None:
  """Writes the optimizer / forward spec of N:M training by ``method`` into ``c``.

  ``proj``: hard projection after every step (mask recomputed every step);
  ``ste``: masked forward pass, straight-through gradient to the dense weights;
  ``srste``: STE + SR-STE's decay ``decay`` of the pruned weights on the
  gradients (Zhou et al. 2021; before Adam it is Hu et al.'s masked decay);
  ``sste``: S-STE's soft-thresholded forward pass with fixed per-tensor scales
  (Hu, Zhu, Chen 2024; plain N:M only). ``dense_finetune_from``: from this step
  the forward pass and the decay stop (dense fine-tuning, Hu et al. 2024;
  STE-type methods only). ``options`` go to every N:M transform (e.g. ``axis_rules``).
  """
  spec = dict(n=n, m=m, exclude=tuple(exclude), **options)
  if transposable:
    spec["transposable"] = True
  if method == "proj":
    if dense_finetune_from is not None:
      spec["end_step"] = dense_finetune_from
    c.optimizer.post = (dict(name="nm_projection", update_every=1, **spec),)
    return
  if method not in NM_METHODS:
    raise ValueError(f"unknown N:M method {method!r}; choose one of {NM_METHODS}")
  if method == "sste":
    if transposable:
      raise ValueError("the sste method has no transposable form (S-STE "
                       "thresholds each group of m); use ste or srste")
    c.train.forward = (dict(name="s_ste", **spec),)
  else:
    c.train.forward = (dict(name="nm_ste", **spec),)
  if method == "srste":
    c.optimizer.pre = (dict(name="sr_ste", decay=decay, end_step=dense_finetune_from,
                            **spec),)
  c.train.forward_until = dense_finetune_from

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
  ``sr_ste`` in ``optimizer.pre``/``post`` needs ``nm_ste`` (or ``s_ste``) in
  ``train.forward`` (SR-STE's decay assumes the masked forward pass, without it
  the run trains dense) and its ``end_step`` equal to ``train.forward_until``
  (dense fine-tuning from that step); ``train.forward`` is only honoured by the supervised
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
  until = train.get("forward_until", None)
  for where in ("pre", "post"):
    for i, item in enumerate(config.optimizer.get(where, ()) or ()):
      item = dict(item)
      if item.get("name") != "sr_ste":
        continue
      if not {"nm_ste", "s_ste"} & set(forward):
        raise ValueError(
            f"config.optimizer.{where} has sr_ste but config.train.forward has no "
            "nm_ste: SR-STE's decay is for a masked forward pass and without it "
            "the run trains dense; add dict(name='nm_ste', n=..., m=...) to "
            "config.train.forward")
      if item.get("end_step", None) != until:
        raise ValueError(
            f"config.optimizer.{where}[{i}] sr_ste has end_step="
            f"{item.get('end_step', None)!r} but config.train.forward_until="
            f"{until!r}: the decay and the sparse forward pass must stop at the "
            "same step (dense fine-tuning); set both to the same value")
  step = train.get("step", "standard")
  if until is not None:
    if isinstance(until, bool) or not isinstance(until, int) or until < 1:
      raise ValueError("config.train.forward_until must be None or an int >= 1, "
                       f"got {until!r}")
    if not forward or step != "standard":
      raise ValueError(
          f"config.train.forward_until={until} needs config.train.forward "
          f"(got {tuple(forward)}) and config.train.step='standard' (got "
          f"{step!r}): it ends the sparse forward pass for dense fine-tuning")
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
