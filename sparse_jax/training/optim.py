"""Builds an optax chain from a declarative spec (``config.optimizer``).

The spec names a base optimizer, its learning-rate schedule, and two lists of
transforms with their keyword arguments: ``pre`` (applied to the gradients before
the base optimizer: SR-STE decay, error-feedback compression, clipping ...) and
``post`` (applied to the optimizer's updates: N:M projection ...). Transforms are
looked up by name in :data:`TRANSFORMS`, so new ones plug in without touching the
training loop; any optax transform is also available as ``"optax.<name>"``.

Example::

    spec = dict(name="adam", learning_rate=1e-3, schedule="cosine",
                pre=({"name": "optax.clip_by_global_norm", "max_norm": 1.0},),
                post=())
    tx = build_optimizer(spec, num_steps=1000)
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import optax


class BuildContext(NamedTuple):
  """What a transform builder may need besides its own kwargs.

  Attributes:
    num_steps: total training steps of the run.
    learning_rate: the base optimizer's schedule (a callable step -> lr).
    seed: the run's ``config.seed``; transforms that draw random numbers
      (FOO-VB's noise, random compressors) take their ``key`` from it unless
      the config gives one, so two seeds never share their noise.
  """
  num_steps: int
  learning_rate: optax.Schedule
  seed: int = 0


Builder = Callable[..., optax.GradientTransformation]
TRANSFORMS: dict[str, Builder] = {}
"""Transform builders by the name a config's ``optimizer.pre`` / ``post`` uses."""


def register_transform(name: str) -> Callable[[Builder], Builder]:
  """Registers ``builder(ctx: BuildContext, **kwargs) -> GradientTransformation``.

  Args:
    name: the name used in ``config.optimizer.pre`` / ``post``.

  Returns:
    A decorator that registers and returns the builder unchanged.
  """
  def decorator(builder: Builder) -> Builder:
    if name in TRANSFORMS:
      raise ValueError(f"transform {name!r} is already registered")
    TRANSFORMS[name] = builder
    return builder
  return decorator


def make_schedule(spec: Mapping[str, Any], num_steps: int) -> optax.Schedule:
  """The learning-rate schedule of an optimizer spec.

  Args:
    spec: ``learning_rate``, ``schedule`` ("constant" | "cosine" | "warmup_cosine" |
      "linear" | "step"), ``warmup_steps`` (for warmup_cosine), ``decay_steps`` and
      ``decay_factor`` (for step: multiply by ``decay_factor`` every ``decay_steps``).
    num_steps: total training steps.

  Returns:
    An optax schedule.
  """
  lr = float(spec["learning_rate"])
  kind = spec.get("schedule", "constant")
  if lr <= 0:
    raise ValueError(f"config.optimizer.learning_rate={lr} must be > 0")
  if kind == "constant":
    return optax.constant_schedule(lr)
  if kind == "cosine":
    return optax.cosine_decay_schedule(lr, max(num_steps, 1))
  if kind == "warmup_cosine":
    warmup = int(spec.get("warmup_steps", 0))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(num_steps, warmup + 1))
  if kind == "linear":
    return optax.linear_schedule(lr, 0.0, max(num_steps, 1))
  if kind == "step":
    every = int(spec.get("decay_steps", max(num_steps // 3, 1)))
    return optax.exponential_decay(lr, every, float(spec.get("decay_factor", 0.1)),
                                   staircase=True)
  raise ValueError(f"config.optimizer.schedule={kind!r} is not one of constant, "
                   "cosine, warmup_cosine, linear, step")


def _build_one(item: Mapping[str, Any], ctx: BuildContext,
               where: str) -> optax.GradientTransformation:
  kwargs = dict(item)
  name = kwargs.pop("name", None)
  if name in TRANSFORMS:
    return TRANSFORMS[name](ctx, **kwargs)
  if isinstance(name, str) and name.startswith("optax."):
    fn = getattr(optax, name[len("optax."):], None)
    if callable(fn):
      return fn(**kwargs)
  raise ValueError(f"config.optimizer.{where}: unknown transform {name!r}; registered: "
                   f"{sorted(TRANSFORMS)} or any 'optax.<name>'")


def build_optimizer(spec: Mapping[str, Any], num_steps: int, *, seed: int = 0
                    ) -> optax.GradientTransformationExtraArgs:
  """Builds ``chain(*pre, base(schedule, **kwargs), *post)`` from a spec.

  Args:
    spec: ``name`` (any optax optimizer taking ``learning_rate``: "sgd", "adam",
      "adamw", ...; or a registered transform that is an optimizer by itself, such
      as "foovb", built from ``kwargs`` and the context), ``learning_rate``, ``schedule`` (see :func:`make_schedule`),
      ``kwargs`` (extra arguments of the base optimizer), ``pre`` and ``post``
      (sequences of ``{"name": ..., **kwargs}``).
    num_steps: total training steps (for schedules).
    seed: the run's seed (see :class:`BuildContext`).

  Returns:
    The optax transformation.
  """
  schedule = make_schedule(spec, num_steps)
  ctx = BuildContext(num_steps=num_steps, learning_rate=schedule, seed=int(seed))
  name = str(spec["name"])
  base_kwargs = dict(spec.get("kwargs", None) or {})
  if name in TRANSFORMS:  # e.g. "foovb": a registered transform is the optimizer
    base = TRANSFORMS[name](ctx, **base_kwargs)
  else:
    base_fn = getattr(optax, name, None)
    if not callable(base_fn):
      raise ValueError(f"config.optimizer.name={name!r} is neither an optax optimizer "
                       f"nor a registered transform {sorted(TRANSFORMS)}")
    base = base_fn(learning_rate=schedule, **base_kwargs)
  pre = [_build_one(item, ctx, f"pre[{i}]") for i, item in enumerate(spec.get("pre", ()))]
  post = [_build_one(item, ctx, f"post[{i}]")
          for i, item in enumerate(spec.get("post", ()))]
  return optax.chain(*pre, base, *post)


FORWARD_TRANSFORMS: dict[str, Callable[..., Callable[[Any], Any]]] = {}
"""``config.train.forward`` names: ``builder(**kwargs) -> (params -> weights)``."""


def register_forward(name: str, *, needs_init_params: bool = False):
  """Registers a forward-pass weight transform builder (e.g. "nm_ste").

  With ``needs_init_params`` the builder also receives ``init_params=`` (the
  run's step-0 params, e.g. for S-STE's fixed scales).
  """
  def decorator(builder):
    if name in FORWARD_TRANSFORMS:
      raise ValueError(f"forward transform {name!r} is already registered")
    builder.needs_init_params = needs_init_params
    FORWARD_TRANSFORMS[name] = builder
    return builder
  return decorator


def build_forward(specs, *, init_params=None) -> Callable[[Any], Any] | None:
  """Composes ``config.train.forward`` (a sequence of ``{"name", **kwargs}``), or None.

  ``init_params``: the run's step-0 params, for transforms that need them
  (a ValueError names the transform when they are missing).
  """
  fns = []
  for i, item in enumerate(specs or ()):
    kwargs = dict(item)
    name = kwargs.pop("name", None)
    if name not in FORWARD_TRANSFORMS:
      raise ValueError(f"config.train.forward[{i}]: unknown forward transform {name!r};"
                       f" registered: {sorted(FORWARD_TRANSFORMS)}")
    builder = FORWARD_TRANSFORMS[name]
    if getattr(builder, "needs_init_params", False):
      if init_params is None:
        raise ValueError(f"config.train.forward[{i}]: {name!r} needs the run's "
                         "initial params: build_forward(..., init_params=params)")
      kwargs["init_params"] = init_params
    fns.append(builder(**kwargs))
  if not fns:
    return None

  def forward(params):
    for fn in fns:
      params = fn(params)
    return params

  return forward
