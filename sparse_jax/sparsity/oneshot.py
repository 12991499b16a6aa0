"""One-shot N:M pruning from calibration activations: Wanda and SparseGPT.

Both look at what a layer computes on a few calibration inputs ``X``, not
only at its weights. For a kernel ``W`` (Flax layout: inputs on axis -2,
outputs last) the layer's output is ``X W``:

* Wanda (Sun et al. 2024) scores weight ``(j, o)`` by ``|W_jo| ||X_j||_2``,
  the size of its contribution, and keeps the ``n`` best of every ``m``
  consecutive inputs: a mask, no weight update.
* SparseGPT (Frantar & Alistarh 2023) walks the inputs in order, fixes each
  row's weights to the mask and moves the weights of the rows not yet visited
  to absorb the error (optimal brain surgeon with ``H = X^T X``), choosing
  each group's mask on the updated weights by ``w_j^2 / [H_R^-1]_jj``, ``R``
  the rows not yet fixed. The inverse
  Hessians of the shrinking problems come from one Cholesky factor of
  ``H^-1``; rows are processed in blocks with a lazy update of the rest.

Conv kernels ``(..., in, out)`` are read as the matrix ``(prod(...) * in,
out)`` over their input patches (the inputs on axis -2 stay consecutive
within a spatial tap, so the N:M groups are the same).

References:
  Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large
  Language Models" (Wanda), ICLR 2024, https://arxiv.org/abs/2306.11695;
  Frantar, Alistarh, "SparseGPT: Massive Language Models Can Be Accurately
  Pruned in One-Shot", ICML 2023, https://arxiv.org/abs/2301.00774.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Union

import jax
import jax.numpy as jnp
from jax import lax

from sparse_jax._core import checks
from sparse_jax._core import nm_schedule
from sparse_jax._core import trees
from sparse_jax._core.nm_schedule import AxisSpec, MaskSpec
from sparse_jax.masks import nm_mask
from sparse_jax.sparsity.convert import ApplyFn, dense_apply, reconstruct_layer

PyTree = Any
CRITERIA = ("magnitude", "wanda", "sparsegpt", "adaprune")
"""``nm_convert``'s criteria; all but magnitude read calibration inputs."""

Calibration = Union[Mapping[str, Any], Callable[[PyTree], Mapping[str, Any]]]


def input_norms(x: jax.typing.ArrayLike) -> jax.Array:
  """``||X_j||_2`` per input feature (the last axis), over everything else.

  Example:
    >>> input_norms(jnp.array([[3.0, 0.0], [4.0, 1.0]])).tolist()
    [5.0, 1.0]
  """
  x = jnp.asarray(x, jnp.float32)
  return jnp.sqrt(jnp.sum(jnp.square(x.reshape(-1, x.shape[-1])), axis=0))


def wanda_scores(w: jax.typing.ArrayLike, x: jax.typing.ArrayLike) -> jax.Array:
  """Wanda's scores ``|W_jo| ||X_j||_2`` of a kernel ``(..., in, out)``.

  Args:
    w: the kernel, inputs on axis -2.
    x: the layer's calibration inputs, features last (``(N, in)`` for a
      Dense layer, ``(N, H, W, in)`` for a Conv).

  Returns:
    Scores of ``w``'s shape (float32); ``nm_mask(scores, n, m)`` is Wanda's
    N:M mask.

  Example:
    >>> w = jnp.array([[1.0, 1.0], [2.0, -2.0]])      # (in=2, out=2)
    >>> x = jnp.array([[3.0, 0.0], [4.0, 1.0]])       # norms 5 and 1
    >>> wanda_scores(w, x).tolist()
    [[5.0, 5.0], [2.0, 2.0]]

  References:
    Sun et al., ICLR 2024, https://arxiv.org/abs/2306.11695
  """
  w = jnp.asarray(w)
  norms = input_norms(x)
  if norms.shape[0] != w.shape[-2]:
    raise ValueError(f"wanda_scores: the inputs have {norms.shape[0]} features "
                     f"but the kernel {w.shape} has {w.shape[-2]} inputs on "
                     "axis -2.")
  return jnp.abs(w.astype(jnp.float32)) * norms[:, None]


def patch_matrix(x: jax.typing.ArrayLike, kernel_shape: tuple[int, ...], *,
                 apply_fn: ApplyFn = dense_apply) -> jax.Array:
  """The layer's inputs as rows of the matrix its kernel multiplies.

  ``apply_fn(w, x) == patch_matrix(x, w.shape) @ w.reshape(-1, out)`` (up to
  the output's leading axes): for a Dense layer ``x`` itself; for a Conv
  (:func:`~sparse_jax.sparsity.conv_apply`) its input patches, built by
  applying the layer to a one-hot kernel, so padding, strides and dilation
  are the layer's own.

  Example:
    >>> from sparse_jax.sparsity import conv_apply
    >>> patch_matrix(jnp.ones((2, 4, 4, 3)), (3, 3, 3, 8),
    ...              apply_fn=conv_apply(padding="VALID")).shape
    (8, 27)
  """
  x = jnp.asarray(x)
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  kernel_shape = tuple(kernel_shape)
  check_calibration(x, kernel_shape, apply_fn, who="patch_matrix")
  rows = 1
  for s in kernel_shape[:-1]:
    rows *= s
  if len(kernel_shape) == 2:
    return x.reshape(-1, rows)
  eye = jnp.eye(rows, dtype=x.dtype).reshape(tuple(kernel_shape[:-1]) + (rows,))
  return apply_fn(eye, x).reshape(-1, rows)


def check_calibration(x: Any, kernel_shape: tuple[int, ...], apply_fn: ApplyFn,
                      *, who: str) -> None:
  """Raises a ValueError (prefixed ``who``) for inputs the kernel cannot read."""
  shape = tuple(jnp.shape(x))
  if not shape or shape[-1] != kernel_shape[-2]:
    raise ValueError(
        f"{who}: the calibration inputs {shape} must have the kernel's "
        f"{kernel_shape[-2]} input features (axis -2 of {kernel_shape}) last; "
        "grouped convolutions (feature_group_count > 1) are not supported.")
  if len(kernel_shape) > 2 and apply_fn is dense_apply:
    raise ValueError(
        f"{who}: a Conv kernel {kernel_shape} needs the layer's function: pass "
        "(inputs, conv_apply(strides=..., padding=...)) as its calibration.")


def sparsegpt(w: jax.typing.ArrayLike, x: jax.typing.ArrayLike, n: int, m: int, *,
              mask: jax.typing.ArrayLike | None = None,
              apply_fn: ApplyFn = dense_apply, block_size: int = 128,
              damp: float = 0.01) -> tuple[jax.Array, jax.Array]:
  """SparseGPT: N:M pruning of one layer with optimal-brain-surgeon updates.

  Minimises ``||X W - X W'||^2`` greedily: inputs (rows of ``W``) are visited
  in order; at the first row of each group of ``m`` the group's mask keeps,
  per output, the ``n`` rows with the largest ``w^2 / [H^-1]_jj`` (on the
  weights as updated so far), then each row is set to its masked value and
  the error is spread over the rows not yet visited, optimally for ``H = X^T
  X + damp mean(diag H) I``. With ``mask`` given, only the updates run.

  As in the paper's code, an input that is zero on every calibration example
  has its weights set to zero (nothing can be learnt about it), even where
  the mask keeps them: use enough calibration data.

  Args:
    w: the dense kernel ``(..., in, out)`` (Dense or Conv).
    x: the layer's calibration inputs (``(N, in)``; Conv: ``(N, H, W, in)``).
    n: entries KEPT per group of ``m`` consecutive inputs.
    m: group size.
    mask: optional fixed boolean mask of ``w``'s shape (e.g. a transposable
      one): then only the weights are updated.
    apply_fn: the layer, ``(kernel, inputs) -> outputs`` (``conv_apply(...)``
      for a Conv).
    block_size: rows per block of the lazy update (rounded down to a
      multiple of ``m``).
    damp: Hessian damping, relative to its mean diagonal (the paper: 0.01).

  Returns:
    ``(w_new, mask)``: the pruned, updated kernel in ``w``'s dtype (exactly
    zero outside the mask) and the mask.

  Example:
    >>> x = jax.random.normal(jax.random.key(0), (64, 8))
    >>> w = jax.random.normal(jax.random.key(1), (8, 3))
    >>> w2, mk = sparsegpt(w, x, 2, 4)
    >>> bool(jnp.all(mk.reshape(2, 4, 3).sum(1) == 2)), bool(jnp.all(w2[~mk] == 0))
    (True, True)

  References:
    Frantar & Alistarh, ICML 2023, https://arxiv.org/abs/2301.00774
    (Algorithm 1)
  """
  w = jnp.asarray(w)
  n, m = checks.check_nm(n, m, who="sparsegpt")
  shape = w.shape
  if w.ndim < 2 or shape[-2] % m:
    raise ValueError(f"sparsegpt: the kernel {shape} needs its input axis (-2) "
                     f"divisible by m={m}.")
  block_size = checks.check_int(block_size, "block_size", who="sparsegpt",
                                minimum=m)
  damp = checks.check_float(damp, "damp", who="sparsegpt", minimum=0.0)
  dtype = jnp.promote_types(w.dtype, jnp.float32)   # float64 stays float64
  mat = w.reshape(-1, shape[-1]).astype(dtype)
  rows = mat.shape[0]
  xs = patch_matrix(x, shape, apply_fn=apply_fn).astype(dtype)
  h = xs.T @ xs
  fixed = None if mask is None else jnp.asarray(mask, bool).reshape(rows, -1)
  new, keep = _sparsegpt_matrix(mat, h, n, m, fixed,
                                block_size - block_size % m, float(damp))
  return (new.reshape(shape).astype(w.dtype), keep.reshape(shape))


def _sparsegpt_matrix(w: jax.Array, h: jax.Array, n: int, m: int,
                      fixed: jax.Array | None, block: int, damp: float
                      ) -> tuple[jax.Array, jax.Array]:
  rows, cols = w.shape
  dead = jnp.diag(h) == 0          # inputs that are always 0: prune freely
  h = h + jnp.diag(dead.astype(h.dtype))
  w = jnp.where(dead[:, None], 0.0, w)
  h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(rows, dtype=h.dtype)
  # U upper triangular with H^-1 = U^T U: row i of U / U_ii is the optimal
  # update of rows >= i when row i changes, and U_ii^2 = [H_R^-1]_ii for the
  # remaining rows R = {i, ...}.
  chol = jnp.linalg.cholesky(h)
  hinv = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(rows, dtype=h.dtype))
  u = jnp.linalg.cholesky(0.5 * (hinv + hinv.T)).T
  keep = jnp.ones((rows, cols), bool) if fixed is None else fixed
  for i1 in range(0, rows, block):
    i2 = min(i1 + block, rows)
    count = i2 - i1
    w1, u1, k1 = w[i1:i2], u[i1:i2, i1:i2], keep[i1:i2]
    d = jnp.diag(u1)

    def body(i, carry, d=d, u1=u1):
      w1, k1, err1 = carry
      if fixed is None:
        def choose(k1):
          start = (i // m) * m
          group = lax.dynamic_slice_in_dim(w1, start, m, 0)
          dg = lax.dynamic_slice_in_dim(d, start, m, 0)
          sel = nm_mask(jnp.square(group) / jnp.square(dg)[:, None], n, m,
                        axis=0)
          return lax.dynamic_update_slice_in_dim(k1, sel, start, 0)
        k1 = lax.cond(i % m == 0, choose, lambda k: k, k1)
      row = w1[i]
      q = jnp.where(k1[i], row, 0.0)
      err = (row - q) / d[i]
      w1 = w1 - jnp.outer(u1[i], err)      # u1[i, :i] = 0: rows >= i move
      w1 = w1.at[i].set(q)
      return w1, k1, err1.at[i].set(err)

    w1, k1, err1 = lax.fori_loop(0, count, body,
                                 (w1, k1, jnp.zeros((count, cols), w.dtype)))
    w = w.at[i1:i2].set(w1)
    keep = keep.at[i1:i2].set(k1)
    if i2 < rows:   # the lazy update of the rows after the block
      w = w.at[i2:].add(-u[i1:i2, i2:].T @ err1)
  return jnp.where(keep, w, 0.0), keep


def nm_convert(params: PyTree, n: int, m: int, *, criterion: str = "magnitude",
               calibration: Calibration | None = None,
               options: Mapping[str, Any] | None = None,
               transposable: bool = False, axis: AxisSpec = -2,
               method: str = "exact", objective: str = "l1",
               mask: MaskSpec = None) -> tuple[PyTree, PyTree]:
  """One-shot conversion of a params pytree to (transposable) N:M.

  Criteria:

  * ``"magnitude"``: keep the largest ``|w|`` (no data);
  * ``"wanda"``: keep the largest ``|w| ||x_j||`` (:func:`wanda_scores`);
  * ``"sparsegpt"``: :func:`sparsegpt` (mask and weight updates; with
    ``transposable`` the mask is the transposable one of Wanda's scores and
    SparseGPT updates the kept weights);
  * ``"adaprune"``: magnitude masks, then the kept weights refitted by
    :func:`~sparse_jax.sparsity.reconstruct_layer` (Adam).

  The data-driven criteria prune layer by layer in the order of
  ``calibration``: a callable ``params -> {kernel path: inputs}`` is called
  again before each layer, with the layers before it already pruned (what a
  model whose earlier layers are sparse feeds it); a plain mapping gives
  fixed inputs. Each value is the layer's calibration inputs (``(N, in)``) or
  ``(inputs, apply_fn)`` for a Conv (``conv_apply(...)``). Paths are the
  leaves' names (``jax.tree_util.keystr``, e.g. ``"['dense1']['kernel']"``).
  For a Flax NNX model, ``sparse_jax.training.layer_calibration(graphdef,
  model_state, x)`` builds the callable (it records ``nnx.Linear``,
  ``nnx.Conv`` and ``nnx.LinearGeneral`` layers, e.g. the query / key /
  value / out of ``nnx.MultiHeadAttention``). A layer's inputs must have its
  input features last; grouped convolutions are not supported. A
  DenseGeneral kernel with more than two axes (query ``(in, heads,
  head_dim)`` pruned along axis 0, out ``(heads, head_dim, out)`` along axis
  -2) is converted as the matrix ``(inputs up to its N:M axis, the rest)``
  that its flattened inputs multiply.

  Args:
    params: dense (or unstructured-sparse) params.
    n: entries KEPT per group of ``m``.
    m: group size.
    criterion: one of :data:`CRITERIA`.
    calibration: the layers' inputs (see above); needed by all but magnitude.
    options: extra keyword options of the criterion's function
      (``sparsegpt``: ``block_size``, ``damp``; ``adaprune``: those of
      ``reconstruct_layer``, e.g. ``num_steps``).
    transposable: transposable N:M masks on the last two axes.
    axis: N:M axis (int, pytree or callable; see :func:`axis_by_path`); the
      data-driven criteria need the kernels' (last) input axis: -2, or 0 for
      attention's query / key / value kernels.
    method: transposable solver (``"exact"``, ``"greedy"``,
      ``"greedy_repair"``).
    objective: transposable objective, ``"l1"`` or ``"l2"``.
    mask: which leaves to convert (None: :func:`default_filter`; e.g. exclude
      the first and last layers with ``default_filter(m, exclude=...)``).

  Returns:
    ``(sparse_params, masks)``: the params with the pruned leaves converted
    (zero outside their mask), and the masks (params structure,
    ``optax.MaskedNode()`` on leaves left dense).

  Raises:
    ValueError: an unknown criterion, a data-driven one without
      ``calibration`` or with a pruned leaf it has no inputs for (named), or
      groups not on the input axis.

  Example:
    >>> import jax.numpy as jnp
    >>> from sparse_jax.sparsity import nm_convert
    >>> params = {"kernel": jnp.array([[1.], [-3.], [2.], [0.5]]),
    ...           "bias": jnp.ones(1)}
    >>> sparse, masks = nm_convert(params, 2, 4)
    >>> sparse["kernel"].ravel().tolist(), sparse["bias"].tolist()
    ([0.0, -3.0, 2.0, 0.0], [1.0])
    >>> x = jnp.array([[0.1, 0.1, 0.1, 10.0]] * 3)       # input 3 matters
    >>> sparse, _ = nm_convert(params, 2, 4, criterion="wanda",
    ...                        calibration={"['kernel']": x})
    >>> sparse["kernel"].ravel().tolist()
    [0.0, -3.0, 0.0, 0.5]

  References:
    Hubara et al., "Accelerated Sparse Neural Training", NeurIPS 2021,
    https://arxiv.org/abs/2102.08124 (magnitude, AdaPrune); Sun et al.,
    ICLR 2024, https://arxiv.org/abs/2306.11695 (Wanda); Frantar & Alistarh,
    ICML 2023, https://arxiv.org/abs/2301.00774 (SparseGPT).
  """
  who = "nm_convert"
  if callable(n):
    raise ValueError(f"{who}: n must be an int.")
  checks.check_choice(criterion, "criterion", CRITERIA, who=who)
  schedule = nm_schedule.make_schedule(
      n, m, who=who, transposable=transposable, axis=axis,
      method=method, objective=objective, mask=mask)
  options = dict(options or {})
  if criterion == "wanda" and options:
    raise ValueError(f"{who}: criterion='wanda' takes no options, got "
                     f"{sorted(options)}.")
  if criterion == "magnitude":
    if calibration is not None or options:
      raise ValueError(f"{who}: criterion='magnitude' uses no calibration or "
                       "options; pass criterion='wanda', 'sparsegpt' or "
                       "'adaprune' to use them.")
    pruned, arrays, masks = schedule.oneshot(params)
    sparse = [jnp.where(mk, w, jnp.zeros((), w.dtype))
              for w, mk in zip(arrays, masks)]
    idx = [p.index for p in pruned]
    return trees.replace(params, idx, sparse), trees.scatter(params, idx, masks)
  if calibration is None:
    raise ValueError(
        f"{who}: criterion={criterion!r} needs calibration=: a mapping "
        "{kernel path: layer inputs} or a callable params -> that mapping "
        "(sparse_jax.training.layer_calibration(graphdef, model_state, x) "
        "builds one for a Flax NNX model).")
  m = schedule.group_size()
  pruned = schedule.select(params, m)
  leaves = trees.leaves(params)

  def check_axis(p, axis, ndim):   # axis: p's N:M axis in the ndim-D view
    if axis % ndim != ndim - 2:
      raise ValueError(
          f"{who}: criterion={criterion!r} groups the inputs of a kernel "
          f"(axis -2), but {p.path} is pruned along axis {p.axis}.")

  for p in pruned:   # (a DenseGeneral kernel is checked with its inputs)
    if leaves[p.index].ndim == 2:
      check_axis(p, p.axis, 2)
  inputs = calibration(params) if callable(calibration) else calibration
  order = {path: i for i, path in enumerate(inputs)}
  missing = [p.path for p in pruned if p.path not in order]
  if missing:
    raise ValueError(
        f"{who}: no calibration inputs for {', '.join(missing)} (have: "
        f"{', '.join(list(order)[:6])}); criterion={criterion!r} needs the "
        "inputs of every pruned kernel, or leave the others out with mask=.")
  count = jnp.zeros([], jnp.int32)
  current, masks = params, {}
  for p in sorted(pruned, key=lambda p: order[p.path]):
    if callable(calibration) and masks:   # the layers before are pruned now
      inputs = calibration(current)
    entry = inputs[p.path]
    x, apply_fn = entry if isinstance(entry, tuple) else (entry, dense_apply)
    w = trees.leaves(current)[p.index]
    shape, p_leaf = w.shape, p
    if w.ndim > 2 and apply_fn is dense_apply:
      # A DenseGeneral kernel, e.g. attention's query (in, heads, head_dim)
      # pruned along axis 0, or its output (heads, head_dim, out) along axis
      # 1: the axes up to the N:M axis are its inputs, the rest its outputs,
      # and the inputs ``x`` come flattened (what layer_calibration gives).
      axis = p.axis % w.ndim
      rows = math.prod(shape[:axis + 1])
      # (transposable: only the output kernel can be, along its axis -2;
      # its m x m tiles stay within one head, as in the 2-D view.)
      if jnp.shape(x)[-1:] == (rows,) and axis < w.ndim - 1:
        w, p_leaf = w.reshape(rows, -1), p._replace(axis=0)
    check_axis(p, p_leaf.axis, w.ndim)
    check_calibration(x, w.shape, apply_fn, who=f"{who}: {p.path}")
    new, mk = _convert_one(criterion, schedule, transposable, w, x, apply_fn,
                           p_leaf, count, m, options)
    current = trees.replace(current, [p.index], [new.reshape(shape)])
    masks[p.index] = mk.reshape(shape)
  idx = sorted(masks)
  return current, trees.scatter(params, idx, [masks[i] for i in idx])


def _convert_one(criterion, schedule, transposable, w, x, apply_fn, p, count,
                 m, options):
  """``(new kernel, mask)`` of one layer by a data-driven criterion."""
  if criterion == "adaprune":
    mk = schedule.compute([jnp.abs(w)], [p], count, m)[0]
    return reconstruct_layer(x, w, mk, apply_fn=apply_fn, **options), mk
  if criterion == "sparsegpt" and not transposable:
    return sparsegpt(w, x, schedule.n, m, apply_fn=apply_fn, **options)
  # wanda, or sparsegpt on a transposable mask of Wanda's scores
  mk = schedule.compute([wanda_scores(w, x)], [p], count, m)[0]
  if criterion == "sparsegpt":
    return sparsegpt(w, x, schedule.n, m, mask=mk, apply_fn=apply_fn, **options)
  new = jnp.where(mk, w, jnp.zeros((), w.dtype))
  return new, mk

