"""sparse_jax: sparse and Bayesian training for JAX / Flax NNX, as optax transforms.

The curated public API (``import sparse_jax as sj``):

- masks (pure functions): ``sj.masks.nm_mask``, ``sj.masks.transposable_nm_mask``,
  ``sj.masks.mask_diversity``;
- N:M training: ``sj.nm_projection``, ``sj.nm_ste``, ``sj.sr_ste``, ``sj.s_ste``, ``sj.nm_convert``
  (more in ``sj.sparsity``);
- gradient compression: ``sj.error_feedback`` and the compressors
  ``sj.compression.top_k``, ``rand_k``, ``threshold``, ``lognormal``, ``nm``;
- online variational Bayes: ``sj.foovb``, ``sj.foovb_sample``,
  ``sj.foovb_nm_projection`` (its mean on transposable N:M masks scored by
  ``|mean| / std``; prediction and more in ``sj.bayes``);
- plumbing: ``sj.models``, ``sj.data``, ``sj.training``.
"""

from sparse_jax import bayes, compression, data, masks, models, sparsity, training
from sparse_jax.bayes import foovb, foovb_nm_projection, foovb_sample
from sparse_jax.compression import error_feedback
from sparse_jax.sparsity import nm_convert, nm_projection, nm_ste, s_ste, sr_ste

__version__ = "0.1.0"

__all__ = ["bayes", "compression", "data", "error_feedback", "foovb",
           "foovb_nm_projection", "foovb_sample",
           "masks", "models", "nm_convert", "nm_projection", "nm_ste", "s_ste", "sparsity",
           "sr_ste", "training"]
