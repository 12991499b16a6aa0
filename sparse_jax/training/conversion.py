"""Convert a trained dense (or unstructured-sparse) NNX model to N:M, little or no training.

Three stages (Hubara et al. 2021, "AdaPrune", arXiv:2102.08124; ALGORITHMS.md A4):

1. one-shot magnitude N:M (plain or transposable) of the selected kernels;
2. layer-wise reconstruction on a small calibration set: for every pruned Dense /
   Conv layer, in forward order, minimise ``||X W - X (S * W')||^2`` over ``W'`` with
   the mask ``S`` fixed, where ``X`` is the layer's input when the calibration data
   runs through the model converted so far (so later layers correct earlier errors);
3. BatchNorm re-estimation: the running statistics are recomputed on the calibration
   set with the converted weights.

``run_conversion(config, workdir)`` trains the dense model first (an ordinary resumable
run in ``workdir/dense``), then reports the test accuracy after each stage.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from sparse_jax import sparsity
from sparse_jax._core import trees
from sparse_jax.training.checkpoint import Checkpointer
from sparse_jax.training.files import is_primary, write_json
from sparse_jax.training.loop import build_run, train_and_evaluate
from sparse_jax.training.report import format_table
from sparse_jax.training.runs import begin
from sparse_jax.training.steps import evaluate, make_eval_step

PyTree = Any
_LAYER_TYPES = (nnx.Linear, nnx.Conv, nnx.LinearGeneral)


@contextlib.contextmanager
def _record_layer_inputs(records: list):
  """While active, every Linear / Conv / LinearGeneral call appends ``(module, x)``."""
  originals = {cls: cls.__call__ for cls in _LAYER_TYPES}

  def wrap(original):
    def call(self, x, *args, **kwargs):
      records.append((self, x))
      return original(self, x, *args, **kwargs)
    return call

  for cls, original in originals.items():
    cls.__call__ = wrap(original)
  try:
    yield records
  finally:
    for cls, original in originals.items():
      cls.__call__ = original


def layer_inputs(graphdef, params: PyTree, model_state: PyTree, x) -> list[tuple]:
  """Inputs of every ``nnx.Linear`` / ``nnx.Conv`` / ``nnx.LinearGeneral`` layer
  (e.g. the query / key / value / out of ``nnx.MultiHeadAttention``), in call
  order, for ``x``.

  The model is called as ``model(x, train=False)`` when its ``__call__``
  takes ``train``, else ``model(x)``. A layer called twice keeps the inputs
  of its last call.

  Returns:
    ``[(path, module, inputs)]`` with ``path`` the layer's key path in ``params``
    (its kernel is ``params[path...]["kernel"]``).
  """
  model = nnx.merge(graphdef, params, model_state)
  paths = {id(node): path for path, node in nnx.iter_graph(model)
           if isinstance(node, _LAYER_TYPES)}
  with _record_layer_inputs([]) as records:
    model(x, **_eval_kwargs(model))
  # A layer called twice keeps its last inputs.
  last = {id(module): (module, inputs) for module, inputs in records}
  return [(paths[key], module, inputs) for key, (module, inputs) in last.items()]


def _eval_kwargs(model) -> dict[str, Any]:
  """``{"train": False}`` when the model's ``__call__`` takes ``train``."""
  try:
    params = inspect.signature(type(model).__call__).parameters
  except (TypeError, ValueError):
    return {}
  takes = "train" in params or any(p.kind is p.VAR_KEYWORD
                                   for p in params.values())
  return {"train": False} if takes else {}


def _flat_inputs(module, x):
  """A LinearGeneral's inputs with its contracted axes flattened into one."""
  if not isinstance(module, nnx.LinearGeneral):
    return x
  k = len(module.in_features)
  axes = tuple(a % x.ndim for a in module.axis)
  if axes != tuple(range(x.ndim - k, x.ndim)) or module.batch_axis:
    raise ValueError(
        f"LinearGeneral with axis={module.axis} and batch_axis="
        f"{dict(module.batch_axis)}: only trailing contracted axes and no batch "
        "axes are supported by the one-shot converters")
  return x.reshape(x.shape[:x.ndim - k] + (-1,))


def _layer_apply(module):
  if isinstance(module, nnx.Conv):
    return sparsity.conv_apply(strides=module.strides, padding=module.padding,
                               feature_group_count=module.feature_group_count,
                               kernel_dilation=module.kernel_dilation)
  return sparsity.dense_apply


def kernel_path(path: tuple) -> str:
  """The name of a layer's kernel leaf in the params (``keystr`` of the path)."""
  return jax.tree_util.keystr(tuple(jax.tree_util.DictKey(k)
                                    for k in (*path, "kernel")))


def layer_calibration(graphdef, model_state: PyTree, x_calib):
  """``params -> {kernel path: (inputs, apply_fn)}`` of every Dense-like / Conv layer.

  Dense, Conv and DenseGeneral layers (a DenseGeneral's contracted input axes
  come flattened: attention's output projection sees ``(..., heads *
  head_dim)``).

  The calibration callable of :func:`sparse_jax.sparsity.nm_convert`: for
  the params it is given (the model pruned so far), each layer's inputs on
  ``x_calib``, in call order, with the function the layer applies to its
  kernel.

  Example:
    >>> import sparse_jax as sj
    >>> model = sj.models.build_model("mlp", (16,), 8, hidden=(32,))
    >>> graphdef, params, model_state = sj.training.split_model(model)
    >>> calib = layer_calibration(graphdef, model_state, jnp.ones((4, 16)))
    >>> list(calib(params))
    ["['hidden'][0]['kernel']", "['head']['kernel']"]
  """
  def inputs(params):
    return {kernel_path(path): (_flat_inputs(module, x), _layer_apply(module))
            for path, module, x in layer_inputs(graphdef, params, model_state,
                                                x_calib)}
  return inputs


def adaprune(graphdef, dense_params: PyTree, model_state: PyTree, x_calib,
             masks: PyTree, *, num_steps: int = 1000, learning_rate: float = 1e-3,
             batch_size: int = 50, seed: int = 0) -> PyTree:
  """Layer-wise reconstruction of the masked kernels (stage 2).

  Args:
    graphdef: the model's graph (``split_model``).
    dense_params: the trained dense params (the reconstruction targets).
    model_state: non-trainable state (BatchNorm statistics).
    x_calib: calibration inputs.
    masks: the N:M masks (``nm_convert``'s second output; ``MaskedNode`` = dense).
    num_steps, learning_rate, batch_size: Adam on each layer (the paper's defaults).
    seed: minibatch sampling seed.

  Returns:
    The converted params: masked kernels refitted, everything else as in
    ``dense_params``.
  """
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  params = jax.tree.map(lambda w, mk: w if is_masked(mk) else w * mk,
                        dense_params, masks, is_leaf=is_masked)
  mask_of = {trees.path_str(path): mk for path, mk in
             jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_masked)[0]}
  dense_of = {trees.path_str(path): w for path, w in
              jax.tree_util.tree_flatten_with_path(dense_params)[0]}
  calibration = layer_calibration(graphdef, model_state, x_calib)
  key = jax.random.key(seed)
  inputs, stale = calibration(params), False
  for i, name in enumerate(list(inputs)):
    mask = mask_of.get(name)
    if mask is None or is_masked(mask):
      continue
    if stale:   # this layer's inputs through the model converted so far
      inputs = calibration(params)
    x, apply_fn = inputs[name]
    stale = True
    w_new = sparsity.reconstruct_layer(
        x, dense_of[name], mask, apply_fn=apply_fn, num_steps=num_steps,
        learning_rate=learning_rate, batch_size=batch_size,
        key=jax.random.fold_in(key, i))
    index = list(dense_of).index(name)
    params = trees.replace(params, [index], [w_new])
  return params


def reestimate_batchnorm(graphdef, params: PyTree, model_state: PyTree, x_calib
                         ) -> PyTree:
  """Recomputes every BatchNorm's running mean/var on ``x_calib`` (stage 3).

  Each BatchNorm's momentum is set to 0 for one train-mode forward pass over the
  whole calibration set, so its statistics become exactly those of that set.
  """
  model = nnx.merge(graphdef, params, model_state)
  norms = [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.BatchNorm)]
  if not norms:
    return model_state
  momenta = [bn.momentum for bn in norms]
  for bn in norms:
    bn.momentum = 0.0
  model(x_calib, train=True)
  for bn, momentum in zip(norms, momenta):
    bn.momentum = momentum
  return nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2])


def parse_pattern(pattern: str) -> tuple[int, int, bool]:
  """``"2:4"`` -> ``(2, 4, False)``; ``"T-4:8"`` (transposable) -> ``(4, 8, True)``."""
  text = pattern.strip()
  transposable = text.upper().startswith("T-")
  try:
    n, m = (int(v) for v in text[2 if transposable else 0:].split(":"))
  except ValueError:
    raise ValueError(f"config.convert.patterns: {pattern!r} is not 'N:M' or 'T-N:M'")
  return n, m, transposable


def convert_params(graphdef, params, model_state, calib, pattern: str, *,
                   exclude=(), num_steps=1000, learning_rate=1e-3, batch_size=50,
                   seed=0, criterion="magnitude", stages=None
                   ) -> dict[str, tuple[PyTree, PyTree]]:
  """Every conversion stage of ``params`` to ``pattern``.

  The one-shot stage uses ``criterion`` (``"magnitude"``, ``"wanda"`` or
  ``"sparsegpt"``, layer by layer on ``calib``; see
  :func:`sparse_jax.sparsity.nm_convert`); the reconstruction refits the
  kept weights of its masks (AdaPrune).

  Returns:
    ``{stage: (params, model_state)}`` for ``stages`` (default all of
    :data:`STAGES`: ``one_shot``, ``one_shot_bn``, ``reconstructed``,
    ``reconstructed_bn``; BatchNorm statistics re-estimated on ``calib`` in the
    ``_bn`` stages).
  """
  stages = STAGES if stages is None else tuple(stages)
  n, m, transposable = parse_pattern(pattern)
  mask_filter = sparsity.default_filter(m, transposable=transposable,
                                        exclude=tuple(exclude))
  calibration = (None if criterion == "magnitude" else
                 layer_calibration(graphdef, model_state, calib))
  one_shot, masks = sparsity.nm_convert(params, n, m, transposable=transposable,
                                        mask=mask_filter, criterion=criterion,
                                        calibration=calibration)
  out = {}
  if "one_shot" in stages:
    out["one_shot"] = (one_shot, model_state)
  if "one_shot_bn" in stages:
    out["one_shot_bn"] = (one_shot, reestimate_batchnorm(graphdef, one_shot,
                                                         model_state, calib))
  if "reconstructed" in stages or "reconstructed_bn" in stages:
    rebuilt = adaprune(graphdef, params, model_state, calib, masks,
                       num_steps=num_steps, learning_rate=learning_rate,
                       batch_size=batch_size, seed=seed)
    if "reconstructed" in stages:
      out["reconstructed"] = (rebuilt, model_state)
    if "reconstructed_bn" in stages:
      out["reconstructed_bn"] = (rebuilt, reestimate_batchnorm(
          graphdef, rebuilt, model_state, calib))
  return out


STAGES = ("one_shot", "one_shot_bn", "reconstructed", "reconstructed_bn")
"""Conversion stages, in order (``config.convert.stages`` picks some)."""


def _print_table(rows: list[dict[str, Any]]) -> None:
  """pattern, criterion, dense, then the stages in the order they ran."""
  stages = [s for s in STAGES if any(s in r for r in rows)]
  head = [k for k in ("pattern", "criterion", "metric", "dense") if any(k in r for r in rows)]
  rest = [k for r in rows for k in r if k not in (*head, *stages)]
  print(format_table(rows, [*head, *stages, *dict.fromkeys(rest)]))


def run_conversion(config, workdir: str) -> dict[str, Any]:
  """Trains the dense model once, converts it to every pattern, evaluates each stage.

  ``config.convert``: ``patterns`` (e.g. ``("2:4", "T-4:8")``), ``exclude`` (regexes of
  layers kept dense), ``criterion`` of the one-shot masks (``"magnitude"``,
  ``"wanda"``, ``"sparsegpt"``) or ``criteria`` (several, each reported),
  ``stages`` (default all of :data:`STAGES`), ``calibration_examples``,
  ``num_steps``, ``learning_rate``, ``batch_size`` (the reconstruction's Adam).

  Returns:
    Results with ``test_accuracy_dense`` and ``test_accuracy_<pattern>_<stage>``
    (``..._<pattern>_<criterion>_<stage>`` with ``criteria``); for a sequence
    task (labels ``(N, T)``, e.g. ``python_text``) also ``test_bpc_...``, the
    held-out bits per character; ``subruns`` ``{"dense" or "<pattern>
    [<criterion>] <stage>": {"test_accuracy": ..., ...}}`` (a sweep tabulates
    each). Also
    ``workdir/results.json``, and a table printed.
  """
  stored = begin(config, workdir)
  if stored is not None:
    _print_table(stored.get("table", []))
    return stored
  conv = config.convert
  criteria = conv.get("criteria", None)
  named = criteria is not None
  criteria = tuple(criteria) if named else (str(conv.get("criterion", "magnitude")),)
  stages_wanted = tuple(conv.get("stages", STAGES))
  unknown = sorted(set(stages_wanted) - set(STAGES))
  if unknown:
    raise ValueError(f"config.convert.stages has {unknown}; choose from {STAGES}")
  dense_dir = os.path.join(workdir, "dense")
  dense_results = train_and_evaluate(config, dense_dir)
  data, graphdef, _, template = build_run(config)
  ckpt = Checkpointer(dense_dir)
  state = ckpt.restore_latest(template)
  ckpt.close()
  eval_step = jax.jit(make_eval_step(graphdef))
  calib = data.x_train[np.random.default_rng(config.seed).permutation(
      len(data.x_train))[:int(conv.calibration_examples)]]
  sequence = data.y_test.ndim == 2
  metrics = ("accuracy", "bpc") if sequence else ("accuracy",)

  def measure(params, model_state):
    out = evaluate(eval_step, params, model_state, data.x_test, data.y_test)
    return {"accuracy": out["accuracy"], "bpc": out["loss"] / np.log(2)}

  dense = measure(state.params, state.model_state)
  results: dict[str, Any] = {"name": config.get("name", ""), "status": "completed",
                             "dense_wall_s": dense_results.get("wall_s")}
  for metric in metrics:
    results[f"test_{metric}_dense"] = dense[metric]
  rows = []
  subruns = {"dense": {f"test_{metric}": dense[metric] for metric in metrics}}
  for pattern in conv.patterns:
    for criterion in criteria:
      stages = convert_params(graphdef, state.params, state.model_state, calib, pattern,
                              exclude=conv.exclude, num_steps=int(conv.num_steps),
                              learning_rate=float(conv.learning_rate),
                              batch_size=int(conv.batch_size), seed=config.seed,
                              criterion=criterion, stages=stages_wanted)
      scores = {stage: measure(*pm) for stage, pm in stages.items()}
      for stage, score in scores.items():
        label = " ".join([pattern, *([criterion] if named else []), stage])
        subruns[label] = {f"test_{metric}": score[metric] for metric in metrics}
      for metric in metrics:
        row = {"pattern": pattern}
        if named:
          row["criterion"] = criterion
        if sequence:
          row["metric"] = metric
        row["dense"] = dense[metric]
        for stage, score in scores.items():
          row[stage] = score[metric]
          key = f"{pattern}_{criterion}_{stage}" if named else f"{pattern}_{stage}"
          results[f"test_{metric}_{key}"] = score[metric]
        rows.append(row)
  results["table"] = rows
  results["subruns"] = subruns   # one row each in a sweep's table
  if is_primary():
    write_json(os.path.join(workdir, "results.json"), results)
    _print_table(rows)
  return results
