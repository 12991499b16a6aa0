"""The runnable examples in the docstrings of sparse_jax.bayes stay correct."""

import doctest
import importlib

import jax
import jax.numpy as jnp
import optax
import pytest

MODULES = ["fixed_point", "kronecker", "transform", "predict", "step"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(f"sparse_jax.bayes.{name}")
  globs = dict(vars(module), jax=jax, jnp=jnp, optax=optax)
  result = doctest.testmod(module, extraglobs=globs,
                           optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0
  assert result.failed == 0
