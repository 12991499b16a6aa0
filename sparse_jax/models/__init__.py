"""Flax NNX models used by the experiments; all take ``(input_shape, num_classes)``.

Every model is called as ``model(x, train=...)`` with ``x`` of shape
``(batch, *input_shape)``; kernels keep the Flax layouts (Dense ``(in, out)``,
Conv ``(H, W, in, out)``).
"""

from __future__ import annotations

from typing import Any, Sequence

from flax import nnx

from sparse_jax.models.charlm import CharTransformer
from sparse_jax.models.cnn import CNN
from sparse_jax.models.layers import NMDense, NMMask
from sparse_jax.models.mlp import MLP
from sparse_jax.models.resnet import ResNet
from sparse_jax.models.vit import ViT

MODELS = {"mlp": MLP, "cnn": CNN, "resnet": ResNet, "vit": ViT,
          "char_transformer": CharTransformer}
"""Model classes by ``config.model.name`` (the names :func:`build_model` takes)."""


def build_model(name: str, input_shape: Sequence[int], num_classes: int, *,
                seed: int = 0, **kwargs: Any) -> nnx.Module:
  """Builds a registered model by name.

  Args:
    name: one of ``MODELS`` ("mlp", "cnn", "resnet", "vit", "char_transformer").
    input_shape: shape of one example, e.g. ``(8, 8, 1)``.
    num_classes: number of logits.
    seed: initialisation seed.
    **kwargs: model options (e.g. ``hidden=(200, 200)`` for the MLP).

  Returns:
    The initialised ``nnx.Module``.
  """
  if name not in MODELS:
    raise ValueError(f"config.model.name={name!r} is not a model; choose one of "
                     f"{sorted(MODELS)}")
  return MODELS[name](tuple(input_shape), num_classes, rngs=nnx.Rngs(seed),
                      **kwargs)


__all__ = ["CNN", "CharTransformer", "MLP", "MODELS", "NMDense", "NMMask", "ResNet", "ViT", "build_model"]
