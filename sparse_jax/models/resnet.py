"""CIFAR-style ResNet (He et al. 2016, section 4.2) with BatchNorm."""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx


class BasicBlock(nnx.Module):
  """Two 3x3 convs with BatchNorm and an identity (or 1x1 projection) shortcut."""

  def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, use_bias=False,
                          rngs=rngs)
    self.bn1 = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
    self.conv2 = nnx.Conv(cout, cout, (3, 3), use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
    if stride != 1 or cin != cout:
      self.proj = nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False,
                           rngs=rngs)
      self.proj_bn = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
    else:
      self.proj = self.proj_bn = None

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    frozen = not train
    y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=frozen))
    y = self.bn2(self.conv2(y), use_running_average=frozen)
    if self.proj is not None:
      x = self.proj_bn(self.proj(x), use_running_average=frozen)
    return jax.nn.relu(x + y)


class ResNet(nnx.Module):
  """CIFAR ResNet: a 3x3 stem, stages of BasicBlocks (stride 2 from stage 2), GAP, Dense.

  ``blocks_per_stage=3`` with ``widths=(16, 32, 64)`` is ResNet-20. Call with
  ``train=True`` to use and update batch statistics; ``train=False`` uses the running
  averages. Conv kernels keep the Flax HWIO layout.

  Args:
    input_shape: ``(H, W, C)`` of one example.
    num_classes: number of output logits.
    widths: channels of each stage.
    blocks_per_stage: BasicBlocks per stage.
    rngs: ``nnx.Rngs`` for initialisation.

  Example:
    >>> model = ResNet((32, 32, 3), 10, blocks_per_stage=1, rngs=nnx.Rngs(0))
    >>> model(jax.numpy.zeros((2, 32, 32, 3))).shape
    (2, 10)
  """

  def __init__(self, input_shape: Sequence[int], num_classes: int, *,
               widths: Sequence[int] = (16, 32, 64), blocks_per_stage: int = 1,
               rngs: nnx.Rngs):
    if len(input_shape) != 3:
      raise ValueError(f"ResNet needs (H, W, C) inputs, got input_shape={input_shape}")
    self.stem = nnx.Conv(input_shape[-1], widths[0], (3, 3), use_bias=False,
                         rngs=rngs)
    self.stem_bn = nnx.BatchNorm(widths[0], momentum=0.9, rngs=rngs)
    blocks = []
    cin = widths[0]
    for s, width in enumerate(widths):
      for b in range(blocks_per_stage):
        stride = 2 if (s > 0 and b == 0) else 1
        blocks.append(BasicBlock(cin, width, stride, rngs=rngs))
        cin = width
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(cin, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = jax.nn.relu(self.stem_bn(self.stem(x), use_running_average=not train))
    for block in self.blocks:
      x = block(x, train=train)
    return self.head(x.mean(axis=(1, 2)))
