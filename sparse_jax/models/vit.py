"""A small Vision Transformer classifier (Dosovitskiy et al. 2021)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class EncoderBlock(nnx.Module):
  """Pre-LayerNorm Transformer block: multi-head self-attention + GELU MLP.

  ``attention``: the self-attention module (default: ``nnx.MultiHeadAttention``,
  bidirectional); it is called on the normalised tokens ``(batch, seq, dim)``.
  """

  def __init__(self, dim: int, heads: int, mlp_dim: int, *, rngs: nnx.Rngs,
               attention: nnx.Module | None = None):
    self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = (nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
                 if attention is None else attention)
    self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
    self.mlp_in = nnx.Linear(dim, mlp_dim, rngs=rngs)
    self.mlp_out = nnx.Linear(mlp_dim, dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln1(x))
    return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.ln2(x))))


class ViT(nnx.Module):
  """Patch embedding (a strided Conv), learned position embedding, Transformer, mean pool.

  The attention projections are 3-D ``DenseGeneral`` kernels ``(in, heads, head_dim)``
  (query/key/value) and ``(heads, head_dim, out)`` (output): N:M sparsity on them needs
  an explicit axis.

  Args:
    input_shape: ``(H, W, C)``; H and W must be divisible by ``patch``.
    num_classes: number of output logits.
    patch: patch size (2 for 8x8 digits, 4 for 28x28 / 32x32).
    dim: token width. heads: attention heads. depth: number of blocks.
    mlp_dim: hidden width of the block MLPs.
    rngs: ``nnx.Rngs`` for initialisation.

  Example:
    >>> model = ViT((8, 8, 1), 10, patch=2, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 8, 8, 1))).shape
    (2, 10)
  """

  def __init__(self, input_shape: Sequence[int], num_classes: int, *,
               patch: int = 2, dim: int = 64, heads: int = 4, depth: int = 2,
               mlp_dim: int = 128, rngs: nnx.Rngs):
    if len(input_shape) != 3:
      raise ValueError(f"ViT needs (H, W, C) inputs, got input_shape={input_shape}")
    h, w, c = input_shape
    if h % patch or w % patch:
      raise ValueError(f"ViT: input {h}x{w} is not divisible by patch={patch}")
    self.embed = nnx.Conv(c, dim, (patch, patch), strides=patch, padding="VALID",
                          rngs=rngs)
    tokens = (h // patch) * (w // patch)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, tokens, dim)))
    self.blocks = nnx.List([EncoderBlock(dim, heads, mlp_dim, rngs=rngs)
                            for _ in range(depth)])
    self.ln = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    del train
    x = self.embed(x)
    x = x.reshape(x.shape[0], -1, x.shape[-1]) + self.pos[...]
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln(x).mean(axis=1))
