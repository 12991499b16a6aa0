"""Pure array functions computing sparsity masks (no optax): jittable, vmappable.

``n`` always means the number of entries KEPT per group of ``m``.
"""

from sparse_jax.masks.diversity import (mask_diversity, regular_matrix_count,
                                        unstructured_diversity)
from sparse_jax.masks.nm import is_nm_sparse, nm_mask, nm_prune
from sparse_jax.masks.transposable import (is_transposable_nm_sparse,
                                           transposable_nm_mask,
                                           transposable_nm_mask_tree)
from sparse_jax.masks.unstructured import (erk_sparsity, uniform_sparsity,
                                           unstructured_mask)

__all__ = [
    "erk_sparsity",
    "is_nm_sparse",
    "is_transposable_nm_sparse",
    "mask_diversity",
    "nm_mask",
    "nm_prune",
    "regular_matrix_count",
    "transposable_nm_mask",
    "transposable_nm_mask_tree",
    "uniform_sparsity",
    "unstructured_diversity",
    "unstructured_mask",
]
