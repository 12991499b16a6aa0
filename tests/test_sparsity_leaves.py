"""Tests for leaf selection (default filter, per-leaf axes) and docstrings."""

import doctest

import jax
from sparse_jax._core import nm_schedule
from sparse_jax._core.trees import path_str
import jax.numpy as jnp
import pytest
from flax import nnx

from sparse_jax.models import build_model
from sparse_jax.sparsity import (axis_by_path, convert, default_filter,
                                 diagnostics, leaf_name, leaves, projection,
                                 schedules, ste)


def abstract_params(name, input_shape, **kwargs):
  """The model's Param state as shapes only (no compute: fast)."""
  model = nnx.eval_shape(lambda: build_model(name, input_shape, 10, **kwargs))
  return nnx.split(model, nnx.Param, ...)[1]


def names_selected(params, selection):
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return sorted(jax.tree_util.keystr(p) for (p, _), s in
                zip(flat, jax.tree.leaves(selection)) if s)


def test_leaf_names_of_nnx_linen_and_bare_trees():
  state = abstract_params("cnn", (8, 8, 1), features=(4, 8), dense=8)
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  assert {leaf_name(p) for p in paths} == {"kernel", "bias"}
  linen = {"params": {"Dense_0": {"kernel": jnp.ones((4, 4))}}}
  (path, _), = jax.tree_util.tree_flatten_with_path(linen)[0]
  assert leaf_name(path) == "kernel"
  (path, _), = jax.tree_util.tree_flatten_with_path([jnp.ones((4, 4))])[0]
  assert leaf_name(path) is None


def test_default_filter_on_a_resnet():
  params = abstract_params("resnet", (8, 8, 3), widths=(8, 16))
  chosen = names_selected(params, default_filter(4)(params))
  # every conv kernel but the stem (3 input channels), and the head
  assert "['stem']['kernel'].value" not in chosen
  assert "['head']['kernel'].value" in chosen
  assert all(c.endswith("['kernel'].value") for c in chosen)
  n_kernels = sum(1 for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
                  if leaf_name(p) == "kernel")
  assert len(chosen) == n_kernels - 1
  # exclude the first and last layers
  chosen = names_selected(params, default_filter(4, exclude=["head"])(params))
  assert "['head']['kernel'].value" not in chosen
  # transposable also needs the output size divisible (head: 16 -> 10)
  chosen = names_selected(params, default_filter(4, transposable=True)(params))
  assert "['head']['kernel'].value" not in chosen


def test_attention_kernels_need_an_explicit_axis():
  params = abstract_params("vit", (8, 8, 1), dim=16, heads=2, depth=1,
                           mlp_dim=16)
  with pytest.raises(ValueError,
                     match=r"\['attn'\]\['key'\]\['kernel'\].*ambiguous"):
    default_filter(4)(params)
  axes = axis_by_path({r"query|key|value": 0})
  chosen = names_selected(params, default_filter(4, axis=axes)(params))
  assert any("query" in c for c in chosen)
  assert not any("pos" in c or "scale" in c or "bias" in c for c in chosen)
  got = axes(params)
  flat = jax.tree_util.tree_flatten_with_path(got)[0]
  for p, ax in flat:
    # Rules match the path NAME (no trailing ".value" of NNX variables,
    # which used to make "value" match every leaf).
    key = path_str(p)
    assert ax == (0 if any(k in key for k in ("query", "key", "value"))
                  else -2)
  # or leave attention dense
  chosen = names_selected(params, default_filter(4, exclude="attn")(params))
  assert not any("attn" in c for c in chosen) and chosen


def test_mask_and_axis_specs_errors():
  params = {"a": {"kernel": jnp.ones((8, 4))}, "b": jnp.ones((4, 8))}
  pruned = leaves.resolve(params, 4, mask={"a": True, "b": False}, axis=-2,
                          transposable=False, who="t")
  assert [p.path for p in pruned] == ["['a']['kernel']"]
  # "b" is not named like a kernel: the default filter skips it
  pruned = leaves.resolve(params, 4, mask=None, axis={"a": -2, "b": -1},
                          transposable=False, who="t")
  assert [p.path for p in pruned] == ["['a']['kernel']"]
  pruned = leaves.resolve(params, 4, mask=True, axis={"a": -2, "b": -1},
                          transposable=False, who="t")
  assert [(p.path, p.axis) for p in pruned] == [("['a']['kernel']", 0),
                                                ("['b']", 1)]
  with pytest.raises(ValueError, match="structure of the params"):
    leaves.resolve(params, 4, mask={"x": True}, axis=-2, transposable=False,
                   who="t")
  with pytest.raises(ValueError, match=r"axis of \['b'\]"):
    leaves.resolve(params, 4, mask=True, axis={"a": 0, "b": 5},
                   transposable=False, who="t")
  with pytest.raises(ValueError, match=r"concrete Python bool"):
    jax.jit(lambda p: leaves.resolve(
        p, 4, mask={"a": jnp.sum(p["b"]) > 0, "b": False}, axis=-2,
        transposable=False, who="t"))(params)
  with pytest.raises(ValueError, match=r"transposable.*axis 0"):
    leaves.resolve({"k": jnp.ones((8, 8, 8))}, 4, mask={"k": True},
                   axis=0, transposable=True, who="t")


@pytest.mark.parametrize("module", [convert, diagnostics, nm_schedule,
                                    projection, schedules, ste])
def test_docstring_examples_run(module):
  result = doctest.testmod(module, verbose=False)
  assert result.attempted > 0 and result.failed == 0
