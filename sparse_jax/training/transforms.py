"""Registers the library's transforms under the names configs use.

Optimizer chain (``config.optimizer.pre`` / ``post``; see ``optim.build_optimizer``):

- ``nm_projection``: hard N:M projection (put it in ``post``);
- ``sr_ste``: SR-STE decay of pruned weights (``pre``; pair with ``nm_ste`` below).

- ``error_feedback``: gradient compression with error feedback (``pre``, before
  ``sgd``): ``compressor`` ("top_k", "rand_k", "threshold", "lognormal", "nm", or
  a low-precision format: "fp_quantize", "fp4", "lognormal_fp") with its arguments
  in ``compressor_kwargs`` (``values=dict(name="fp_quantize", exponent_bits=4,
  mantissa_bits=3)`` sends a sparsifier's kept values in that format), ``variant``
  ("ef", "ef21", "econtrol", "dgc", "none"),
  ``axis_name`` ("data" under ``config.train.step = "data_parallel"``), plus the
  other options of ``sparse_jax.compression.error_feedback``. The learning rate
  stays OUTSIDE the memory (the base optimizer applies it): for a constant rate this
  is EF14's ``e + lr*g`` scaled by ``1/lr``.

Optimizers by themselves (``config.optimizer.name``):

- ``foovb``: FOO-VB / BGD (``sparse_jax.bayes.foovb``; kwargs are its options);
  train with ``config.train.step = "foovb"``.
- ``ivon``: IVON (``sparse_jax.bayes.ivon``); the same K-sample step
  (``config.train.step = "foovb"``) with mean-loss gradients.

Forward-pass weights (``config.train.forward``):

- ``nm_ste``: N:M-masked weights in the forward pass, straight-through gradient.

Sparsity kwargs are those of the library functions, plus two declarative ones that
become the optax leaf filter: ``exclude`` (regexes of leaf paths kept dense, e.g. the
first and last layers) and ``axis_rules`` (``{regex: axis}``, e.g. ``{"query|key|value":
0}`` for 3-D attention kernels).
"""

from __future__ import annotations

from typing import Any

from sparse_jax import bayes, compression, sparsity
from sparse_jax.training.optim import register_forward, register_transform


def _sparsity_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
  kwargs = dict(kwargs)
  exclude = tuple(kwargs.pop("exclude", ()) or ())
  rules = dict(kwargs.pop("axis_rules", {}) or {})
  axis = sparsity.axis_by_path(rules, default=kwargs.get("axis", -2)) if rules else \
      kwargs.get("axis", -2)
  kwargs["axis"] = axis
  kwargs["mask"] = sparsity.default_filter(kwargs["m"], axis=axis,
                                           transposable=kwargs.get("transposable", False),
                                           exclude=exclude)
  return kwargs


@register_transform("nm_projection")
def _nm_projection(ctx, **kwargs):
  del ctx
  kwargs = _sparsity_kwargs(kwargs)
  return sparsity.nm_projection(kwargs.pop("n"), kwargs.pop("m"), **kwargs)


@register_transform("sr_ste")
def _sr_ste(ctx, **kwargs):
  del ctx
  kwargs = _sparsity_kwargs(kwargs)
  return sparsity.sr_ste(kwargs.pop("n"), kwargs.pop("m"), **kwargs)


@register_forward("nm_ste")
def _nm_ste(**kwargs):
  kwargs = _sparsity_kwargs(kwargs)
  n, m = kwargs.pop("n"), kwargs.pop("m")
  return lambda params: sparsity.nm_ste(params, n, m, **kwargs)


@register_forward("s_ste", needs_init_params=True)
def _s_ste(*, init_params, fixed_scale: bool = True, **kwargs):
  """S-STE; ``fixed_scale`` (default, the paper's): the per-tensor scales are
  computed once from the run's initial params; False: no scaling."""
  kwargs = _sparsity_kwargs(kwargs)
  n, m = kwargs.pop("n"), kwargs.pop("m")
  if kwargs.pop("transposable", False):
    raise ValueError("config.train.forward s_ste: transposable soft-thresholding "
                     "is not defined (S-STE thresholds each group of m); use "
                     "nm_ste with transposable=True")
  scales = (sparsity.s_ste_scales(init_params, n, m, **kwargs)
            if fixed_scale else None)
  return lambda params: sparsity.s_ste(params, n, m, scales=scales, **kwargs)


@register_transform("foovb")
def _foovb(ctx, **kwargs):
  """The noise key follows ``config.seed`` unless the kwargs give ``key``."""
  kwargs.setdefault("key", ctx.seed)
  return bayes.foovb(**kwargs)


@register_transform("ivon")
def _ivon(ctx, **kwargs):
  """IVON; train with ``config.train.step = "foovb"`` (the K-sample step) and
  ``config.train.loss_reduction = "mean"``. The key follows ``config.seed``;
  the learning rate is ``config.optimizer.learning_rate`` with its schedule."""
  kwargs.setdefault("key", ctx.seed)
  kwargs.setdefault("learning_rate", ctx.learning_rate)  # config's schedule
  return bayes.ivon(**kwargs)


_SPARSIFIERS = ("top_k", "rand_k", "threshold", "lognormal", "nm")
_FORMATS = ("fp_quantize", "fp4", "lognormal_fp")


@register_transform("error_feedback")
def _error_feedback(ctx, *, compressor, compressor_kwargs=None, warmup=(),
                    values=None, **kwargs):
  """``warmup``: DGC-style sequence of compressor kwargs used over ``warmup_steps``.

  ``values``: ``dict(name=<a format>, **its kwargs)`` sends the kept values of a
  sparsifier in that low-precision format (``compression.compose``).
  """
  kwargs.setdefault("key", ctx.seed)   # random compressors follow config.seed
  known = _SPARSIFIERS + _FORMATS
  if compressor not in known:
    raise ValueError(f"config.optimizer: error_feedback compressor {compressor!r} is "
                     f"not one of {', '.join(known)}")
  make = getattr(compression, compressor)
  compressor_kwargs = dict(compressor_kwargs or {})
  if compressor == "nm" and "mask" not in kwargs:
    # N:M needs a kernel with its axis divisible by m: the rest is sent dense.
    kwargs["mask"] = sparsity.default_filter(compressor_kwargs["m"],
                                             axis=compressor_kwargs.get("axis", -2))
  build = lambda kw: make(**dict(kw))
  if values is not None:
    values = dict(values)
    name = values.pop("name", None)
    if compressor not in _SPARSIFIERS or name not in _FORMATS:
      raise ValueError(f"config.optimizer: error_feedback values={dict(values, name=name)!r} "
                       f"needs a sparsifier ({', '.join(_SPARSIFIERS)}) and a format "
                       f"name ({', '.join(_FORMATS)})")
    quantizer = getattr(compression, name)(**values)
    build = lambda kw: compression.compose(make(**dict(kw)), quantizer)
  warmup_compressors = tuple(build(w) for w in warmup)
  return compression.error_feedback(build(compressor_kwargs),
                                    warmup_compressors=warmup_compressors, **kwargs)
