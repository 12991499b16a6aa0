"""Optax transforms for N:M sparsity, built on :mod:`sparse_jax.masks`.

``n`` always means the number of entries KEPT per group of ``m``.
"""

from sparse_jax.sparsity.convert import (conv_apply, dense_apply,
                                         reconstruct_dense_lstsq,
                                         reconstruct_layer,
                                         reconstruction_error)
from sparse_jax.sparsity.diagnostics import (find_mask_states,
                                             sparsity_diagnostics)
from sparse_jax.sparsity.oneshot import (nm_convert, sparsegpt,
                                         wanda_scores)
from sparse_jax.sparsity.matmul import nm_matmul
from sparse_jax.sparsity.leaves import axis_by_path, default_filter, leaf_name
from sparse_jax.sparsity.projection import NMProjectionState, nm_projection
from sparse_jax.sparsity.schedules import nm_schedule
from sparse_jax.sparsity.ste import (SRSTEState, nm_ste, s_ste, s_ste_scales,
                                     sr_ste)

__all__ = [
    "NMProjectionState",
    "SRSTEState",
    "axis_by_path",
    "conv_apply",
    "default_filter",
    "dense_apply",
    "find_mask_states",
    "leaf_name",
    "nm_convert",
    "nm_matmul",
    "nm_projection",
    "nm_schedule",
    "nm_ste",
    "reconstruct_dense_lstsq",
    "reconstruct_layer",
    "reconstruction_error",
    "s_ste",
    "s_ste_scales",
    "sparsegpt",
    "sparsity_diagnostics",
    "sr_ste",
    "wanda_scores",
]
