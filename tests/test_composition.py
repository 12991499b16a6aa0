"""The composition contract: every public transform in the idioms users write.

One registry (``CASES``) of every public optax transform of the library --
each N:M mask flavour, error feedback per variant and compressor, PowerSGD,
FOO-VB diagonal / Kronecker / full -- run through one battery of idioms
(modelled on optax's ``contrib/_common_test.py``): ``jax.jit`` with donated
params and state, ``vmap`` over seeds, ``lax.scan`` with mixed dtypes,
``optax.masked`` / ``multi_transform`` / ``partition`` with the excluded leaf
first and last in flatten order, ``MultiSteps``, ``inject_hyperparams``,
``apply_if_finite``, ``nnx.Optimizer``, Linen ``TrainState``, orbax,
``tree_map_params``, 4-device meshes with Auto and Explicit axes, and bf16 /
fp16 params. A new transform joins the contract by joining ``CASES``.

FOO-VB transforms take K stacked gradients (``Case.k``); the battery feeds
them random gradients of that shape (the update is a deterministic function
of them), which is all composition needs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparse_jax as sj
from sparse_jax.compression import (lognormal, nm, rand_k, threshold, top_k)

K = 2  # Monte-Carlo samples of the FOO-VB cases


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
  name: str
  factory: Callable[..., Any]
  kwargs: dict
  k: int | None = None            # FOO-VB: stacked gradients
  hyper: tuple[str, Any] | None = None   # injectable: (name, new value)
  static: tuple[str, ...] = ()    # inject_hyperparams static_args it needs
  rtol: float = 1e-6

  def make(self, **overrides):
    if not overrides:   # one transform per case: jitted steps are reused
      return _made(self)
    return self.factory(**{**self.kwargs, **overrides})

  def __repr__(self):
    return self.name


@functools.lru_cache(maxsize=None)
def _made(case):
  return case.factory(**case.kwargs)


@functools.lru_cache(maxsize=None)
def _jit(fn):
  """One jitted function per transform method (cached across tests)."""
  return jax.jit(fn)


def _foovb(**kw):
  return sj.foovb(num_samples=K, init_std=0.05, key=1, **kw)


CASES = [
    Case("nm_projection", sj.nm_projection, dict(n=2, m=4), hyper=("n", 1)),
    Case("nm_projection_nodiag", sj.nm_projection,
         dict(n=2, m=4, diagnostics=False), hyper=("n", 1)),
    Case("nm_projection_every2", sj.nm_projection,
         dict(n=2, m=4, update_every=2, start_step=1), hyper=("n", 1)),
    Case("nm_projection_T24", sj.nm_projection,
         dict(n=2, m=4, transposable=True), hyper=("update_every", 2),
         static=("n",)),
    Case("nm_projection_T24_greedy", sj.nm_projection,
         dict(n=2, m=4, transposable=True, method="greedy_repair",
              update_every=3), hyper=("update_every", 1), static=("n",)),
    Case("sr_ste", sj.sr_ste, dict(n=2, m=4, decay=0.1), hyper=("decay", 0.5)),
    Case("sr_ste_T24", sj.sr_ste, dict(n=2, m=4, decay=0.1, transposable=True),
         hyper=("decay", 0.5), static=("n",)),
    Case("ef_top_k", sj.error_feedback,
         dict(compressor=top_k(0.25), learning_rate=0.1),
         hyper=("learning_rate", 0.3)),
    Case("ef21_top_k", sj.error_feedback,
         dict(compressor=top_k(0.25), variant="ef21", learning_rate=0.1),
         hyper=("learning_rate", 0.3)),
    Case("econtrol_top_k", sj.error_feedback,
         dict(compressor=top_k(0.25), variant="econtrol", learning_rate=0.1,
              eta=0.2), hyper=("eta", 0.5)),
    Case("dgc_top_k", sj.error_feedback,
         dict(compressor=top_k(0.25), variant="dgc", momentum=0.9,
              clip_norm=5.0), hyper=("momentum", 0.5)),
    Case("none_top_k", sj.error_feedback,
         dict(compressor=top_k(0.25), variant="none", clip_norm=1.0),
         hyper=("clip_norm", 0.1)),
    Case("ef_rand_k", sj.error_feedback,
         dict(compressor=rand_k(0.25), key=3, learning_rate=0.1),
         hyper=("learning_rate", 0.3)),
    Case("ef_threshold", sj.error_feedback,
         dict(compressor=threshold(0.5, max_fraction=0.5), learning_rate=0.1),
         hyper=("learning_rate", 0.3)),
    Case("ef_lognormal", sj.error_feedback,
         dict(compressor=lognormal(0.75), learning_rate=0.1),
         hyper=("learning_rate", 0.3), rtol=1e-5),
    Case("ef_nm", sj.error_feedback, dict(
        compressor=nm(1, 4), learning_rate=0.1,
        mask={k: {"bias": False, "kernel": True}   # kernels only: a prefix
              for k in ("first", "mid", "last")}),
         hyper=("learning_rate", 0.3)),
    Case("ef_fp8", sj.error_feedback,
         dict(compressor=sj.compression.fp_quantize(4, 3), learning_rate=0.1),
         hyper=("learning_rate", 0.3)),
    Case("econtrol_lognormal_fp4", sj.error_feedback,
         dict(compressor=sj.compression.lognormal_fp(4), variant="econtrol",
              learning_rate=0.1), hyper=("learning_rate", 0.3), rtol=1e-5),
    Case("ef_top_k_in_fp8", sj.error_feedback,
         dict(compressor=sj.compression.compose(
             top_k(0.25), sj.compression.fp_quantize(4, 3)),
              learning_rate=0.1), hyper=("learning_rate", 0.3)),
    Case("powersgd", sj.compression.powersgd, dict(rank=2, learning_rate=0.1),
         hyper=("learning_rate", 0.3), static=("rank",), rtol=1e-4),
    Case("foovb_diagonal", sj.foovb,
         dict(num_samples=K, init_std=0.05, key=1), k=K, hyper=("eta", 3.0)),
    # One Kronecker group (mid: kernel + bias row), the other kernels
    # diagonal: the matrix solves dominate compile time.
    Case("foovb_kron", sj.foovb,
         dict(covariance="kron", num_samples=K, init_std=0.05, key=1,
              kron_filter={"first": False, "last": False,
                           "mid": {"bias": False, "kernel": True}}), k=K,
         hyper=("eta", 3.0), rtol=1e-4),
    Case("foovb_full", sj.foovb,
         dict(covariance="full", num_samples=K, init_std=0.05, key=1), k=K,
         hyper=("eta", 3.0), rtol=1e-4),
    Case("ivon", sj.bayes.ivon,
         dict(learning_rate=0.1, ess=100.0, num_samples=K, key=1), k=K,
         hyper=("learning_rate", 0.3), rtol=1e-5),
    Case("foovb_nm_projection", sj.foovb_nm_projection,
         dict(foovb_tx=_foovb(), n=2, m=4), k=K, hyper=("n", 1)),
    Case("foovb_nm_projection_T24", sj.foovb_nm_projection,
         dict(foovb_tx=_foovb(), n=2, m=4, transposable=True), k=K,
         hyper=("update_every", 2), static=("n",)),
]
MASK_CASES = [c for c in CASES if c.factory in (
    sj.nm_projection, sj.sr_ste, sj.foovb_nm_projection)]


# --------------------------------------------------------------- helpers --


# Test data is drawn with NumPy and inits are jitted: every eager jax op
# compiles a kernel, and those compilations, not the transforms, would
# dominate the battery's time.


def _normal(rng, shape, dtype):
  return jnp.asarray(rng.standard_normal(shape).astype(np.float32)
                     .astype(dtype))


def _params(seed=0, dtype=jnp.float32):
  """Three layers; 'first' and 'last' lead and close the flatten order.

  The shapes also suit the 4-device mesh layouts (``LAYOUTS``), so every
  idiom's single-device reference is the same compiled program.
  """
  rng = np.random.default_rng(seed)
  return {"first": {"kernel": _normal(rng, (16, 8), dtype)},
          "mid": {"bias": _normal(rng, (8,), dtype),
                  "kernel": _normal(rng, (16, 8), dtype)},
          "last": {"kernel": _normal(rng, (8, 8), dtype)}}


def _grads(case, params, seed, dtype=None):
  rng = np.random.default_rng(100 + seed)
  lead = () if case.k is None else (case.k,)
  return jax.tree.map(lambda x: _normal(rng, lead + x.shape, dtype or x.dtype),
                      params)


def _init(tx, params):
  return _jit(tx.init)(params)


@functools.lru_cache(maxsize=None)
def _step(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def _close(a, b, rtol=1e-6, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=rtol,
      atol=atol), a, b)


def _equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x),
                                                          np.asarray(y)), a, b)


def _loop(case, tx, params, steps, dtype=None, state=None, seed0=0):
  state = _init(tx, params) if state is None else state
  step = _jit(_step(tx))
  for t in range(steps):
    params, state = step(params, state, _grads(case, params, seed0 + t, dtype))
  return params, state


cases = pytest.mark.parametrize("case", CASES, ids=repr)


# ---------------------------------------------------------------- idioms --


@cases
def test_jit_with_donated_params_and_state(case):
  tx = case.make()
  ref = _loop(case, tx, _params(), 2)
  params = _params()
  state = tx.init(params)   # eager init: its buffers must be its own
  step = jax.jit(_step(tx), donate_argnums=(0, 1))
  for t in range(2):
    params, state = step(params, state, _grads(case, params, t))
  # Within an ulp, not bitwise: with the suite's compile-speed flags
  # (tests/conftest.py) XLA may order IVON's arithmetic differently when
  # buffers are aliased. A clobbered buffer would be far off.
  _close((params, state), ref, rtol=1e-6, atol=1e-7)


@cases
def test_vmap_over_seeds(case):
  tx = case.make()
  seeds = [_params(s) for s in (0, 1)]
  batched = jax.tree.map(lambda *x: jnp.stack(x), *seeds)
  grads = jax.tree.map(lambda *x: jnp.stack(x),
                       *[_grads(case, p, 7) for p in seeds])
  states = jax.jit(jax.vmap(tx.init))(batched)
  new, _ = jax.jit(jax.vmap(_step(tx)))(batched, states, grads)
  for i, p in enumerate(seeds):
    want, _ = _jit(_step(tx))(p, _init(tx, p), _grads(case, p, 7))
    _close(jax.tree.map(lambda x: x[i], new), want, rtol=case.rtol,
           atol=case.rtol)


@cases
@pytest.mark.parametrize("pdtype,gdtype", [
    (jnp.float32, jnp.bfloat16), (jnp.bfloat16, jnp.float32),
    (jnp.float16, jnp.float16)],
    ids=["f32params_bf16grads", "bf16params_f32grads", "f16"])
def test_scan_carry_is_dtype_stable(case, pdtype, gdtype):
  """Low-precision params or grads: a scan carry (params, state) keeps its
  types, the params keep their dtype and stay finite."""
  tx = case.make()
  params = _params(dtype=pdtype)
  grads = [_grads(case, params, t, gdtype) for t in range(2)]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *grads)

  def body(carry, g):
    p, s = carry
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), None

  state = _init(tx, params)
  (p, s), _ = jax.jit(lambda c, g: jax.lax.scan(body, c, g))(
      (params, state), stacked)
  dtypes = lambda t: jax.tree.map(lambda x: x.dtype, t)
  assert dtypes(p) == dtypes(params) and dtypes(s) == dtypes(state)
  assert all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32))))
             for x in jax.tree.leaves(p))


LABELS = {"first": "off", "mid": "on", "last": "off"}


@cases
@pytest.mark.parametrize("combinator", ["masked", "multi_transform",
                                        "partition"])
def test_excluded_leaves_anywhere_in_flatten_order(case, combinator):
  """Excluded leaves FIRST and LAST in flatten order (both at once): the
  result on the selected leaves is the transform on that subtree alone."""
  if combinator == "masked":
    tx = optax.masked(case.make(), {k: v == "on" for k, v in LABELS.items()})
  else:
    combine = getattr(optax, combinator)
    tx = combine({"on": case.make(), "off": optax.set_to_zero()}, LABELS)
  on = [k for k, v in LABELS.items() if v == "on"]
  params = _params()
  alone = case.make()
  s_full, s_sub = _init(tx, params), _init(alone, {k: params[k] for k in on})
  for t in range(2):
    g = _grads(case, params, t)
    u_full, s_full = _jit(tx.update)(g, s_full, params)
    u_sub, s_sub = _jit(alone.update)({k: g[k] for k in on}, s_sub,
                                      {k: params[k] for k in on})
    _close({k: u_full[k] for k in on}, u_sub, rtol=case.rtol, atol=case.rtol)
    if combinator == "masked" and case.k is None:
      _equal({k: u_full[k] for k in LABELS if k not in on},
             {k: g[k] for k in LABELS if k not in on})   # untouched
    params = _jit(optax.apply_updates)(params, u_full)


@cases
def test_multisteps_applies_the_mean_gradient(case):
  inner = case.make()
  tx = optax.MultiSteps(inner, every_k_schedule=2)
  params = _params()
  if case.k is not None:
    # MultiSteps accumulates gradients shaped like the params; FOO-VB takes
    # K stacked ones: unsupported (documented in foovb), and it fails.
    with pytest.raises((TypeError, ValueError)):
      _jit(tx.update)(_grads(case, params, 0), _init(tx, params), params)
    return
  state = _init(tx, params)
  g1, g2 = _grads(case, params, 0), _grads(case, params, 1)
  u1, state = _jit(tx.update)(g1, state, params)
  assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(u1))
  u2, state = _jit(tx.update)(g2, state, params)
  mean = jax.tree.map(lambda a, b: (np.asarray(a) + np.asarray(b)) / 2, g1, g2)
  want, _ = _jit(inner.update)(mean, _init(inner, params), params)
  _close(u2, want, rtol=max(case.rtol, 1e-5), atol=1e-5)


@cases
def test_inject_hyperparams(case):
  name, value = case.hyper
  params = _params()
  if case.static:
    with pytest.raises(ValueError, match="static_args"):
      tx = optax.inject_hyperparams(case.factory)(**case.kwargs)
      _jit(tx.update)(_grads(case, params, 0), _init(tx, params), params)
  tx = optax.inject_hyperparams(case.factory, static_args=case.static)(
      **case.kwargs)
  state = tx.init(params)   # eagerly, as users do: m and axis are concrete
  update = _jit(tx.update)
  u, state = update(_grads(case, params, 0), state, params)
  plain = case.make()
  u_plain, _ = _jit(plain.update)(_grads(case, params, 0),
                                     _init(plain, params), params)
  _close(u, u_plain, rtol=case.rtol, atol=case.rtol)
  # The injected value takes effect: same as building with it.
  params = _jit(optax.apply_updates)(params, u)
  state.hyperparams[name] = jnp.asarray(value, state.hyperparams[name].dtype)
  g = _grads(case, params, 1)
  u, _ = update(g, state, params)
  other = case.make(**{name: value})
  u_other, _ = _jit(other.update)(g, state.inner_state, params)
  _close(u, u_other, rtol=max(case.rtol, 1e-5), atol=1e-6)


@cases
def test_apply_if_finite_skips_nan_steps(case):
  tx = optax.apply_if_finite(case.make(), max_consecutive_errors=2)
  params = _params()
  state = _init(tx, params)
  if case.k is not None:   # its skip branch returns grads-shaped zeros
    with pytest.raises((TypeError, ValueError)):
      _jit(tx.update)(_grads(case, params, 0), state, params)
    return
  bad = _grads(case, params, 0)
  bad["mid"]["bias"] = jnp.full(bad["mid"]["bias"].shape, np.nan,
                                bad["mid"]["bias"].dtype)
  u, skipped = _jit(tx.update)(bad, state, params)
  assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(u))
  assert int(skipped.notfinite_count) == 1
  _equal(skipped.inner_state, state.inner_state)
  g = _grads(case, params, 1)
  u, _ = _jit(tx.update)(g, skipped, params)
  inner = case.make()
  want, _ = _jit(inner.update)(g, _init(inner, params), params)
  _equal(u, want)


@cases
def test_orbax_round_trip_continues_bitwise(case, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  tx = case.make()
  params, state = _loop(case, tx, _params(), 1)
  want = _loop(case, tx, params, 1, state=state, seed0=1)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "ckpt", state)
  ckpt.wait_until_finished()
  fresh = _init(tx, _params(5))   # a freshly initialised state as the target
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh)
  restored = ckpt.restore(tmp_path / "ckpt", target=target)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  _equal(_loop(case, tx, params, 1, state=restored, seed0=1), want)


@cases
def test_tree_map_params(case):
  tx = case.make()
  state = _init(tx, _params())
  out = optax.tree_utils.tree_map_params(tx, lambda x: x, state)
  assert jax.tree.structure(out) == jax.tree.structure(state)


@cases
def test_linen_train_state(case):
  from flax.training import train_state
  tx = case.make()
  params = _params()
  ts = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
  g = _grads(case, params, 0)
  ts = jax.jit(lambda ts, g: ts.apply_gradients(grads=g))(ts, g)
  want, _ = _jit(_step(tx))(params, _init(tx, params), g)
  _equal(ts.params, want)


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.first = nnx.Linear(8, 16, rngs=rngs)
    self.last = nnx.Linear(16, 8, rngs=rngs)

  def __call__(self, x):
    return self.last(jax.nn.relu(self.first(x)))


@cases
def test_nnx_optimizer(case):
  model = _Net(nnx.Rngs(0))
  tx = case.make()
  graphdef, params0, rest = nnx.split(model, nnx.Param, ...)
  pure0 = nnx.as_pure(params0)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (4, 8))

  def loss(p):
    return jnp.sum(nnx.merge(graphdef, p, rest)(x) ** 2)

  @nnx.jit
  def step(model, opt):
    if case.k is None:
      grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    else:   # gradients at the K posterior samples, typed as nnx.Param
      samples = sj.foovb_sample(opt, case.k, like=model)
      grads = jax.vmap(jax.grad(loss))(samples)
    opt.update(model, grads)
    return grads

  grads = step(model, opt)
  want, _ = _jit(_step(tx))(pure0, _init(tx, pure0), nnx.as_pure(grads))
  _close(nnx.as_pure(nnx.state(model, nnx.Param)), want, rtol=1e-5,
         atol=1e-6)
  step(model, opt)   # and it keeps going


@pytest.mark.parametrize("case", MASK_CASES, ids=repr)
def test_masks_hold_after_every_idiom_step(case):
  """The params a mask transform returns are exactly N:M (bf16 included)."""
  if case.factory is sj.sr_ste:
    pytest.skip("SR-STE decays, it does not project")
  for dtype in (jnp.float32, jnp.bfloat16):
    p, state = _loop(case, case.make(), _params(dtype=dtype), 2)
    masks = sj.sparsity.find_mask_states(state)[0].masks
    for name in ("first", "mid", "last"):
      w, mk = p[name]["kernel"], masks[name]["kernel"]
      assert not bool(jnp.any((w != 0) & ~mk))


# ------------------------------------------------------------------ mesh --

# Each kernel has its own layout: "first" sharded along the output axis,
# "mid" along the input axis with N:M groups aligned to devices (4 rows per
# device, m=4), "last" along the input axis with groups straddling devices
# (2 rows per device).
LAYOUTS = {"first": (16, jax.P(None, "x")), "mid": (16, jax.P("x", None)),
           "last": (8, jax.P("x", None))}


def _mesh(kind):
  types = {"auto": jax.sharding.AxisType.Auto,
           "explicit": jax.sharding.AxisType.Explicit}[kind]
  return jax.make_mesh((4,), ("x",), axis_types=(types,),
                       devices=jax.devices()[:4])


@cases
@pytest.mark.parametrize("mesh_kind", ["auto", "explicit"])
def test_sharded_params_on_a_4_device_mesh(case, mesh_kind):
  tx = case.make()
  params = _params()
  grads = _grads(case, params, 0)
  want_p, want_s = _jit(_step(tx))(params, _init(tx, params), grads)
  mesh = _mesh(mesh_kind)

  def put(path, x, lead=0):
    spec = LAYOUTS[path[0].key][1] if x.ndim - lead == 2 else jax.P()
    return jax.device_put(x, jax.NamedSharding(
        mesh, jax.P(*(None,) * lead, *spec)))

  with jax.set_mesh(mesh):
    p_sh = jax.tree_util.tree_map_with_path(put, params)
    g_sh = jax.tree_util.tree_map_with_path(
        lambda path, g: put(path, g, 0 if case.k is None else 1), grads)
    s_sh = jax.jit(tx.init)(p_sh)
    new_p, new_s = jax.jit(_step(tx))(p_sh, s_sh, g_sh)
  if mesh_kind == "explicit":   # the params keep their sharding
    norm = lambda spec: tuple(spec) + (None,) * 4
    for a, b in zip(jax.tree.leaves(new_p), jax.tree.leaves(p_sh)):
      assert norm(a.sharding.spec)[:a.ndim] == norm(b.sharding.spec)[:b.ndim]
  _close(new_p, want_p, rtol=max(case.rtol, 1e-5), atol=1e-5)
  for a, b in zip(sj.sparsity.find_mask_states(new_s),
                  sj.sparsity.find_mask_states(want_s)):
    _equal(a.masks, b.masks)     # masks identical to one device
  if case.kwargs.get("covariance") == "kron":
    # The factors are canonical (fixed_point_factor): equal in value.
    f_sh = sj.bayes.find_foovb_state(new_s).kron
    f_1 = sj.bayes.find_foovb_state(want_s).kron
    for name in f_1:
      for attr in ("a", "b"):
        _close(getattr(f_sh[name], attr), getattr(f_1[name], attr),
               rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------- the rules --


def test_registry_covers_every_public_transform():
  public = {sj.nm_projection, sj.sr_ste, sj.foovb, sj.foovb_nm_projection,
            sj.bayes.ivon,
            sj.error_feedback, sj.compression.powersgd}
  assert public == {c.factory for c in CASES}
  variants = {c.kwargs.get("variant", "ef") for c in CASES
              if c.factory is sj.error_feedback}
  assert variants == set(sj.compression.VARIANTS)
  assert {c.kwargs.get("covariance", "diagonal") for c in CASES
          if c.factory is sj.foovb} == {"diagonal", "kron", "full"}


@pytest.mark.parametrize("build", [
    lambda: sj.masks.nm_mask(jnp.ones((8, 4)), 2, m=True),
    lambda: sj.nm_projection(2, True),
    lambda: sj.foovb(num_samples=True),
    lambda: sj.foovb(dtype=jnp.int32),
    lambda: sj.sr_ste(2, 4, decay=float("nan")),
    lambda: sj.error_feedback(top_k(0.1), learning_rate=float("inf")),
    lambda: sj.error_feedback(top_k(0.1), momentum=True, variant="dgc"),
    lambda: sj.nm_projection(2, 4, transposable=1),
    lambda: sj.foovb(key=True),
], ids=["m_bool", "m_bool_tx", "num_samples_bool", "int_dtype", "nan_decay",
        "inf_lr", "momentum_bool", "transposable_int", "key_bool"])
def test_bad_hyperparameters_are_one_clear_error(build):
  with pytest.raises(ValueError, match="must be"):
    build()


def test_prefix_masks_mean_the_same_everywhere():
  params = _params()
  prefix = {"first": True, "mid": False, "last": True}
  full = {"first": {"kernel": True}, "mid": {"bias": False, "kernel": False},
          "last": {"kernel": True}}
  for make in (lambda m: sj.nm_projection(2, 4, mask=m),
               lambda m: sj.error_feedback(top_k(0.25), mask=m),
               lambda m: sj.foovb(mask=m, num_samples=K)):
    a, b = make(prefix), make(full)
    assert jax.tree.structure(_init(a, params)) == jax.tree.structure(
        _init(b, params))
  wire = [sj.compression.exchange_bytes(top_k(0.25), params, num_workers=4,
                                        mask=m) for m in (prefix, full)]
  assert wire[0] == wire[1]
  with pytest.raises(ValueError, match=r"mask.*\['last'\]"):
    sj.error_feedback(top_k(0.25), mask={"first": True}).init(params)


def test_one_key_argument_everywhere():
  params = _params()
  for make in (lambda k: sj.error_feedback(rand_k(0.25), key=k),
               lambda k: sj.compression.powersgd(2, key=k),
               lambda k: sj.foovb(key=k, num_samples=K)):
    by_seed = make(7).init(params).key
    _equal(make(jax.random.key(7)).init(params).key, by_seed)
    _equal(make(jax.random.PRNGKey(7)).init(params).key, by_seed)
  with pytest.warns(DeprecationWarning, match="seed= is deprecated"):
    old = sj.error_feedback(rand_k(0.25), seed=7)
  _equal(old.init(params).key, sj.error_feedback(rand_k(0.25), key=7)
         .init(params).key)
  c = rand_k(0.5).compress(jnp.arange(8.0), 3)   # an int seed is a key too
  _equal(c, rand_k(0.5).compress(jnp.arange(8.0), jax.random.key(3)))


def test_nnx_grads_dropped_by_wrt_say_why():
  model = _Net(nnx.Rngs(0))
  opt = nnx.Optimizer(model, sj.foovb(num_samples=K), wrt=nnx.Param)
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  x = jnp.ones((2, 8))
  plain = sj.foovb_sample(opt, K)            # no like=: plain arrays
  grads = jax.vmap(jax.grad(
      lambda p: nnx.merge(graphdef, p, rest)(x).sum()))(plain)
  with pytest.raises(ValueError, match="like=model"):
    opt.update(model, grads)


def test_error_feedback_with_every_leaf_masked_out():
  """optax.masked may hand the transform no leaf at all: nothing is sent."""
  params = _params()
  tx = optax.masked(sj.error_feedback(top_k(0.25)), jax.tree.map(
      lambda _: False, params))
  g = _grads(CASES[7], params, 0)
  u, state = _jit(tx.update)(g, _init(tx, params), params)
  _equal(u, g)
  assert float(state.inner_state.wire.sent) == 0.0
