"""Multi-layer perceptron classifier."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nnx.Module):
  """ReLU MLP on flattened inputs: ``in -> hidden... -> num_classes``.

  Kernels keep the Flax Dense layout ``(in, out)``.

  Args:
    input_shape: shape of one example (without batch), e.g. ``(8, 8, 1)``.
    num_classes: number of output logits.
    hidden: widths of the hidden layers.
    rngs: ``nnx.Rngs`` for initialisation.

  Example:
    >>> from flax import nnx
    >>> model = MLP((8, 8, 1), 10, hidden=(200, 200), rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 8, 8, 1))).shape
    (2, 10)
  """

  def __init__(self, input_shape: Sequence[int], num_classes: int, *,
               hidden: Sequence[int] = (200, 200), rngs: nnx.Rngs):
    sizes = [int(jnp.prod(jnp.array(input_shape)))] + list(hidden)
    self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs)
                            for a, b in zip(sizes[:-1], sizes[1:])])
    self.head = nnx.Linear(sizes[-1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    del train  # no train/eval difference
    x = x.reshape(x.shape[0], -1)
    for layer in self.hidden:
      x = jax.nn.relu(layer(x))
    return self.head(x)
