"""A small character-level causal Transformer language model (GPT-style, pre-LN)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_jax.models.vit import EncoderBlock


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention with 2-D ``nnx.Linear`` projections.

  ``query``, ``key``, ``value`` and ``out`` are plain ``(dim, dim)`` Dense kernels,
  so N:M masks (groups along the input axis -2), the one-shot converters
  (Wanda / SparseGPT / AdaPrune capture their inputs) and transposable masks
  apply to them exactly as to the MLP's kernels.
  """

  def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
    if dim % heads:
      raise ValueError(f"CharTransformer: dim={dim} is not divisible by heads={heads}")
    self.heads = heads
    self.query = nnx.Linear(dim, dim, rngs=rngs)
    self.key = nnx.Linear(dim, dim, rngs=rngs)
    self.value = nnx.Linear(dim, dim, rngs=rngs)
    self.out = nnx.Linear(dim, dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    h = self.heads

    def split(y):
      return y.reshape(b, t, h, d // h)

    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // h).astype(x.dtype)
    causal = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    return self.out(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d))


class CharTransformer(nnx.Module):
  """Next-character logits at every position of a sequence of character codes.

  Token embedding + learned position embedding, ``depth`` pre-LN blocks
  (:class:`~sparse_jax.models.vit.EncoderBlock` with causal attention), a final LayerNorm and a Dense head to ``num_classes`` logits.

  Args:
    input_shape: ``(seq_len,)``: the longest sequence it takes.
    num_classes: vocabulary size (e.g. 128 for bytes < 128).
    dim: model width. heads: attention heads. depth: blocks.
    mlp_dim: hidden width of the block MLPs.
    rngs: ``nnx.Rngs`` for initialisation.

  Example:
    >>> model = CharTransformer((16,), 128, dim=32, heads=2, depth=1,
    ...                         mlp_dim=64, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 16))).shape   # float codes are cast to int
    (2, 16, 128)
  """

  def __init__(self, input_shape: Sequence[int], num_classes: int, *,
               dim: int = 64, heads: int = 4, depth: int = 2, mlp_dim: int = 256,
               rngs: nnx.Rngs):
    if len(input_shape) != 1:
      raise ValueError("CharTransformer needs (seq_len,) inputs of character codes, "
                       f"got input_shape={tuple(input_shape)}")
    self.embed = nnx.Embed(num_classes, dim, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (input_shape[0], dim)))
    self.blocks = nnx.List([
        EncoderBlock(dim, heads, mlp_dim, rngs=rngs,
                     attention=CausalSelfAttention(dim, heads, rngs=rngs))
        for _ in range(depth)])
    self.ln = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    del train
    tokens = x.astype(jnp.int32)
    h = self.embed(tokens) + self.pos[...][:tokens.shape[1]]
    for block in self.blocks:
      h = block(h)
    return self.head(self.ln(h))
