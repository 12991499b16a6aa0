"""A small convolutional classifier."""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx


class CNN(nnx.Module):
  """Conv(3x3)-ReLU blocks, 2x2 average pooling between them, global pooling, Dense head.

  Works on 8x8x1 digits, 28x28x1 MNIST and 32x32x3 CIFAR: pooling is applied only
  while the spatial size is at least 4. Conv kernels keep the Flax HWIO layout.

  Args:
    input_shape: ``(H, W, C)`` of one example.
    num_classes: number of output logits.
    features: output channels of each conv block.
    dense: width of the hidden Dense layer before the head (0 for none).
    rngs: ``nnx.Rngs`` for initialisation.

  Example:
    >>> model = CNN((8, 8, 1), 10, rngs=nnx.Rngs(0))
    >>> model(jax.numpy.zeros((2, 8, 8, 1))).shape
    (2, 10)
  """

  def __init__(self, input_shape: Sequence[int], num_classes: int, *,
               features: Sequence[int] = (32, 64), dense: int = 128,
               rngs: nnx.Rngs):
    if len(input_shape) != 3:
      raise ValueError(f"CNN needs (H, W, C) inputs, got input_shape={input_shape}")
    channels = [input_shape[-1]] + list(features)
    self.convs = nnx.List([nnx.Conv(a, b, (3, 3), rngs=rngs)
                           for a, b in zip(channels[:-1], channels[1:])])
    self.dense = nnx.Linear(channels[-1], dense, rngs=rngs) if dense else None
    self.head = nnx.Linear(dense or channels[-1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    del train
    for conv in self.convs:
      x = jax.nn.relu(conv(x))
      if min(x.shape[1:3]) >= 4:
        x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.mean(axis=(1, 2))
    if self.dense is not None:
      x = jax.nn.relu(self.dense(x))
    return self.head(x)
