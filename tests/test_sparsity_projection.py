"""Tests for the nm_projection optax transform and its diagnostics."""

import jax
from sparse_jax._core.trees import path_str
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sparse_jax.masks import nm_mask, transposable_nm_mask
from sparse_jax.models import build_model
from sparse_jax.sparsity import (NMProjectionState, axis_by_path,
                                 default_filter, nm_projection, nm_schedule,
                                 sparsity_diagnostics)


def make_params(key=0, dtype=jnp.float32):
  rng = np.random.default_rng(key)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
  return {
      "conv": {"kernel": normal(3, 3, 8, 16), "bias": jnp.ones(16, dtype)},
      "dense": {"kernel": normal(16, 8), "bias": jnp.ones(8, dtype)},
      "norm": {"scale": jnp.ones((8,), dtype)},
      "embed": {"embedding": normal(12, 8)},
  }


def is_nm_sparse(x, n, m, axis=-2):
  """NumPy check: at most n nonzeros in every m consecutive along axis."""
  x = np.moveaxis(np.asarray(x, np.float32), axis, -1)
  return bool(np.all((x != 0).reshape(x.shape[:-1] + (-1, m)).sum(-1) <= n))


def is_transposable_nm_sparse(x, n, m):
  x = np.asarray(x, np.float32) != 0
  return is_nm_sparse(x, n, m, -2) and is_nm_sparse(x, n, m, -1)


def grads_like(params, step):
  """Deterministic pseudo-random 'gradients' (cheap to compile, unlike PRNG)."""
  leaves, treedef = jax.tree.flatten(params)
  out = []
  for i, x in enumerate(leaves):
    t = (jnp.arange(x.size) % 89).astype(jnp.float32).reshape(x.shape)
    t2 = (jnp.arange(x.size) % 31).astype(jnp.float32).reshape(x.shape)
    g = 2.0 * jnp.sin(t * 1.37 + step * 0.71 + i) * jnp.cos(t2 * 0.53 - step)
    out.append(g.astype(x.dtype))
  return jax.tree.unflatten(treedef, out)


def run(tx, params, steps):
  """Jitted training loop; returns params, state and per-step snapshots."""
  state = tx.init(params)

  @jax.jit
  def step_fn(params, state, step):
    updates, state = tx.update(grads_like(params, step), state, params)
    return updates, optax.apply_updates(params, updates), state

  history = []
  for step in range(steps):
    updates, new, state = step_fn(params, state, step)
    history.append((params, updates, new, state))
    params = new
  return params, state, history


def find_state(state):
  return [s for s in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, NMProjectionState))
          if isinstance(s, NMProjectionState)][0]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_params_satisfy_mask_exactly_after_apply_updates(dtype):
  params = make_params(dtype=dtype)
  inner = optax.adam(1e-1)
  tx = optax.chain(inner, nm_projection(2, 4))
  params, state, history = run(tx, params, 4)
  proj = find_state(state)
  for name in ("conv", "dense"):
    k = params[name]["kernel"]
    mask = proj.masks[name]["kernel"]
    assert bool(is_nm_sparse(k, 2, 4))
    assert np.all(np.asarray(k)[~np.asarray(mask)] == 0)  # exact zeros
    assert np.asarray(mask).mean() == 0.5
  # each step: the mask is nm_mask(params + inner updates) and the kept
  # entries are those of params + inner updates.
  @jax.jit
  def reference(before, inner_state, step):
    u, inner_state = inner.update(grads_like(before, step), inner_state, before)
    dense = {k: before[k]["kernel"] + u[k]["kernel"] for k in ("conv", "dense")}
    expect = {k: jnp.where(nm_mask(v, 2, 4), v, 0).astype(dtype)
              for k, v in dense.items()}
    return expect, optax.apply_updates(before, u), inner_state

  inner_state = inner.init(make_params(dtype=dtype))
  tol = dict(rtol=1e-2, atol=1e-2) if dtype == jnp.bfloat16 else dict(
      rtol=1e-5, atol=1e-6)
  for step, (before, _, after, _) in enumerate(history):
    expect, plain, inner_state = reference(before, inner_state, step)
    for name in ("conv", "dense"):
      np.testing.assert_allclose(np.asarray(after[name]["kernel"], np.float32),
                                 np.asarray(expect[name], np.float32), **tol)
    # leaves the default filter skips are left to the optimizer.
    for name, leaf in (("norm", "scale"), ("embed", "embedding"),
                       ("dense", "bias")):
      np.testing.assert_allclose(np.asarray(after[name][leaf], np.float32),
                                 np.asarray(plain[name][leaf], np.float32),
                                 **tol)


def test_update_every_and_fixed_masks():
  params = make_params(1)
  _, _, history = run(optax.chain(optax.sgd(0.5), nm_projection(
      1, 4, update_every=3)), params, 7)
  masks = [np.asarray(find_state(h[3]).masks["dense"]["kernel"])
           for h in history]
  changed = [not np.array_equal(a, b) for a, b in zip(masks[:-1], masks[1:])]
  # recomputed at steps 0, 3, 6 only: no change at steps 1, 2, 4, 5.
  assert changed[0] is False and changed[1] is False
  assert changed[3] is False and changed[4] is False
  assert changed[2] or changed[5]  # big sgd steps do move the mask
  for h in history:
    assert bool(is_nm_sparse(h[2]["dense"]["kernel"], 1, 4))
  # update_every=None: computed once, never changes.
  _, _, history = run(optax.chain(optax.sgd(0.5), nm_projection(
      1, 4, update_every=None)), params, 4)
  first = np.asarray(find_state(history[0][3]).masks["dense"]["kernel"])
  for h in history[1:]:
    np.testing.assert_array_equal(
        np.asarray(find_state(h[3]).masks["dense"]["kernel"]), first)
    k = np.asarray(h[2]["dense"]["kernel"])
    assert np.all(k[~first] == 0)


def test_dense_warmup_then_projection():
  params = make_params(2)
  inner = optax.sgd(0.1)
  _, _, history = run(optax.chain(inner, nm_projection(2, 4, start_step=2)),
                      params, 4)
  for step, (before, updates, after, state) in enumerate(history):
    k = np.asarray(after["dense"]["kernel"])
    if step < 2:  # dense: the inner updates pass through unchanged
      expect, _ = jax.jit(inner.update)(grads_like(before, step),
                                        inner.init(before))
      np.testing.assert_allclose(np.asarray(updates["dense"]["kernel"]),
                                 np.asarray(expect["dense"]["kernel"]),
                                 rtol=1e-5, atol=1e-6)
      assert np.all(k != 0)
      assert np.asarray(find_state(state).masks["dense"]["kernel"]).all()
    else:
      assert bool(is_nm_sparse(k, 2, 4)) and (k == 0).mean() == 0.5


def test_init_masks_keeps_a_converted_mask():
  params = make_params(3)
  mask0 = nm_mask(params["dense"]["kernel"], 2, 4)
  params["dense"]["kernel"] = jnp.where(mask0, params["dense"]["kernel"], 0)
  tx = optax.chain(optax.sgd(1.0),
                   nm_projection(2, 4, init_masks=True, update_every=None))
  _, _, history = run(tx, params, 3)
  for h in history:
    np.testing.assert_array_equal(
        np.asarray(find_state(h[3]).masks["dense"]["kernel"]),
        np.asarray(mask0))
    assert np.all(np.asarray(h[2]["dense"]["kernel"])[~np.asarray(mask0)] == 0)
  with pytest.raises(ValueError, match="start_step must be 0"):
    nm_projection(2, 4, init_masks=True, start_step=3)


@pytest.mark.parametrize("method", ["exact", "greedy_repair"])
def test_transposable_projection(method):
  params = make_params(4)
  tx = optax.chain(optax.sgd(0.3),
                   nm_projection(2, 4, transposable=True, method=method))
  _, _, history = run(tx, params, 2)
  for _, _, after, _ in history:
    for name in ("conv", "dense"):
      assert is_transposable_nm_sparse(after[name]["kernel"], 2, 4)
    assert (np.asarray(after["dense"]["kernel"]) == 0).mean() == 0.5
  # the mask is the transposable mask of params + updates
  before = history[0][0]
  step0 = before["dense"]["kernel"] - 0.3 * grads_like(before, 0)["dense"][
      "kernel"]
  expect = transposable_nm_mask(step0, 2, 4, method=method)
  np.testing.assert_array_equal(
      np.asarray(find_state(history[0][3]).masks["dense"]["kernel"]),
      np.asarray(expect))


def test_schedule_of_n():
  params = {"kernel": jnp.asarray(np.random.default_rng(5).normal(size=(16, 4)),
                                  jnp.float32)}
  sched = nm_schedule(2, 8, start_step=0, end_step=6, power=1.0)
  _, _, history = run(optax.chain(optax.sgd(0.01), nm_projection(sched, 8)),
                      params, 8)
  for step, h in enumerate(history):
    k = np.asarray(h[2]["kernel"])
    per_group = (k != 0).reshape(2, 8, 4).sum(1)
    assert np.all(per_group == int(sched(step)))
  with pytest.raises(ValueError, match="transposable masks need n"):
    nm_projection(sched, 8, transposable=True)
  with pytest.raises(ValueError, match="recomputed"):
    nm_projection(sched, 8, update_every=None)


def test_leaf_selection_errors_name_the_path():
  params = make_params()
  params["attn"] = {"query": {"kernel": jnp.ones((8, 2, 4))}}
  tx = nm_projection(2, 4)
  with pytest.raises(ValueError, match=r"\['attn'\]\['query'\]\['kernel'\].*"
                     r"\(8, 2, 4\).*ambiguous"):
    tx.init(params)
  tx = nm_projection(2, 4, axis=axis_by_path({"query": 0}))
  params, state, _ = run(optax.chain(optax.sgd(0.1), tx), params, 1)
  q = np.asarray(params["attn"]["query"]["kernel"])
  assert np.all((q != 0).reshape(2, 4, 2, 4).sum(1) == 2)  # groups along in
  # a selected leaf whose axis size is not divisible by m
  bad = {"a": {"kernel": jnp.ones((6, 4))}}
  with pytest.raises(ValueError, match=r"\['a'\]\['kernel'\].*\(6, 4\).*m=4"):
    nm_projection(2, 4, mask={"a": {"kernel": True}}).init(bad)
  # ...which the default filter skips: with nothing left to prune it says so
  with pytest.raises(ValueError, match=r"no leaf is selected.*\['a'\]\['kernel'\] "
                     r"\(6, 4\).*mask="):
    nm_projection(2, 4).init(bad)
  # Haiku-style names: nothing named 'kernel'; the hint names kernel_names
  haiku = {"linear": {"w": jnp.ones((8, 4)), "b": jnp.ones(4)}}
  with pytest.raises(ValueError, match=r"\['linear'\]\['w'\].*kernel_names"):
    nm_projection(2, 4).init(haiku)
  state = nm_projection(2, 4, mask=default_filter(4, kernel_names=("w",))).init(haiku)
  assert len(jax.tree.leaves(state.masks)) == 1
  good = {"a": {"kernel": jnp.ones((8, 4))}}
  with pytest.raises(ValueError, match="needs the params"):
    tx = nm_projection(2, 4)
    tx.update(good, tx.init(good))
  with pytest.raises(ValueError, match="update_every must be an int >= 1"):
    nm_projection(2, 4, update_every=0)
  with pytest.raises(ValueError, match="method must be one of"):
    nm_projection(2, 4, method="lp")


def test_default_filter_exclude_and_callable_mask():
  params = make_params()
  sel = default_filter(4, exclude=r"conv")(params)
  assert sel["conv"]["kernel"] is False and sel["dense"]["kernel"] is True
  tx = optax.chain(optax.sgd(0.1), nm_projection(
      2, 4, mask=lambda p: default_filter(4, exclude="conv")(p)))
  new, _, _ = run(tx, params, 1)
  assert np.all(np.asarray(new["conv"]["kernel"]) != 0)
  assert bool(is_nm_sparse(new["dense"]["kernel"], 2, 4))
  # a prefix mask: everything under "dense" (the 1-D bias is rejected)
  with pytest.raises(ValueError, match=r"\['dense'\]\['bias'\].*ndim >= 2"):
    nm_projection(2, 4, mask={"conv": False, "dense": True, "norm": False,
                              "embed": False}).init(params)


@pytest.mark.parametrize("name,kwargs", [
    ("cnn", dict(features=(8, 8), dense=8)),
    ("resnet", dict(widths=(8, 16))), ("vit", dict(dim=16, heads=2, depth=1,
                                                   mlp_dim=16)),
])
def test_flax_nnx_models(name, kwargs):
  model = build_model(name, (8, 8, 1), 10, **kwargs)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # attention: (in, heads, head_dim) groups along `in`; the output projection
  # (heads, head_dim, out) along head_dim.
  axis = axis_by_path({r"query|key|value": 0}) if name == "vit" else -2
  tx = optax.chain(optax.sgd(0.1), nm_projection(2, 4, axis=axis))
  state = tx.init(params)

  def loss_fn(p, x, y):
    logits = nnx.merge(graphdef, p, rest)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, s, x, y):
    g = jax.grad(loss_fn)(p, x, y)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 1)),
                  jnp.float32)
  y = jnp.arange(4)
  params, state = step(params, state, x, y)
  diag = sparsity_diagnostics(params, state)
  pruned = [k for k in diag if k != "all"]
  assert pruned and all("kernel" in k for k in pruned)
  for k in pruned:
    assert float(diag[k]["sparsity"]) >= 0.5
    assert float(diag[k]["mask_sparsity"]) == 0.5
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    where = path_str(path)   # the one naming rule: keystr without ".value"
    ax = 0 if name == "vit" and any(k in where for k in ("query", "key",
                                                          "value")) else -2
    if "kernel" in where and leaf.shape[ax] % 4 == 0:
      assert where in diag
      assert bool(is_nm_sparse(leaf, 2, 4, axis=ax))
  if name == "vit":
    assert any("query" in k for k in diag) and any("out" in k for k in diag)


def test_diagnostics_values():
  params = {"kernel": jnp.asarray(np.random.default_rng(6).normal(size=(8, 8)),
                                  jnp.float32)}
  tx = nm_projection(2, 4)
  state = tx.init(params)
  update = jax.jit(tx.update)
  prev = None
  for step in range(3):
    g = jax.tree.map(lambda x: 0.7 * x, grads_like(params, step))
    dense = params["kernel"] + g["kernel"]
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    d = sparsity_diagnostics(params, state)
    mask = nm_mask(dense, 2, 4)
    kept = float(jnp.abs(jnp.where(mask, dense, 0)).sum()
                 / jnp.abs(dense).sum())
    assert float(d["['kernel']"]["kept_mass"]) == pytest.approx(kept, rel=1e-5)
    flip = 1.0 if prev is None else float(jnp.mean(prev != mask))
    if prev is None:  # from the initial all-True mask
      flip = 0.5
    assert float(d["['kernel']"]["flip_rate"]) == pytest.approx(flip)
    assert float(d["all"]["sparsity"]) == 0.5
    prev = mask
  with pytest.raises(ValueError, match="no NMProjectionState"):
    sparsity_diagnostics(params, optax.sgd(0.1).init(params))


def test_vmap_over_an_ensemble():
  params = {"kernel": jnp.asarray(np.random.default_rng(7).normal(size=(3, 8, 4)),
                                  jnp.float32)}
  tx = nm_projection(2, 4, mask={"kernel": True}, axis=-2)
  state = jax.jit(jax.vmap(tx.init))({"kernel": params["kernel"]})
  grads = {"kernel": jnp.ones((3, 8, 4))}
  updates, state = jax.jit(jax.vmap(tx.update))(grads, state, params)
  new = optax.apply_updates(params, updates)
  for i in range(3):
    assert bool(is_nm_sparse(new["kernel"][i], 2, 4))


def test_scan_and_shard_map():
  """Inside lax.scan, and per device under shard_map (kernel split on `out`)."""
  params = {"kernel": jnp.asarray(
      np.random.default_rng(8).normal(size=(16, 8)), jnp.float32)}
  tx = optax.chain(optax.sgd(0.1), nm_projection(2, 4, update_every=2))

  def body(carry, step):
    p, s = carry
    u, s = tx.update(grads_like(p, step), s, p)
    return (optax.apply_updates(p, u), s), None

  (scanned, _), _ = jax.jit(lambda p: jax.lax.scan(
      body, (p, tx.init(p)), jnp.arange(3)))(params)
  looped, _, _ = run(tx, params, 3)
  np.testing.assert_allclose(np.asarray(scanned["kernel"]),
                             np.asarray(looped["kernel"]), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(scanned["kernel"]) == 0,
                                np.asarray(looped["kernel"]) == 0)

  n_dev = min(jax.device_count(), 4)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:n_dev]), ("d",))
  spec = jax.sharding.PartitionSpec(None, "d")  # groups run along `in`
  grads = {"kernel": jnp.ones((16, 8))}
  tx = nm_projection(2, 4, mask={"kernel": True})

  def local(p, g):
    u, _ = tx.update(g, tx.init(p), p)
    return u

  sharded = jax.jit(jax.shard_map(
      local, mesh=mesh, in_specs=({"kernel": spec}, {"kernel": spec}),
      out_specs={"kernel": spec}))(params, grads)
  plain, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  np.testing.assert_array_equal(np.asarray(sharded["kernel"]),
                                np.asarray(plain["kernel"]))


def test_diagnostics_can_be_switched_off():
  params = {"kernel": jnp.asarray(
      np.random.default_rng(9).normal(size=(8, 4)), jnp.float32)}
  _, state, _ = run(nm_projection(2, 4, diagnostics=False), params, 2)
  assert float(state.kept_mass["kernel"]) == 0.0
  assert float(state.flip_rate["kernel"]) == 0.0
  assert np.asarray(state.masks["kernel"]).mean() == 0.5
