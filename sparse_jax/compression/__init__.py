"""Gradient compression with error feedback, and its data-parallel exchange.

Compressors (pure functions on one array, static-size compressed form):
sparsifiers :func:`top_k`, :func:`rand_k`, :func:`threshold`,
:func:`lognormal`, :func:`nm`; low-precision formats :func:`fp_quantize`
(any float format, e.g. FP8 e4m3 / e5m2), :func:`fp4` (radix-4 FP4),
:func:`lognormal_fp` (format chosen per tensor from the lognormal fit); and
:func:`compose` (sparsify, then send the kept values in a format). The optax
transform :func:`error_feedback` (EF / EF21 / EControl / DGC / none) compresses the gradients (:func:`powersgd` is the low-rank one), keeps the residuals in its state and, with
``axis_name`` inside ``jax.shard_map``, exchanges the compressed tensors with
``all_gather`` + scatter-add. :func:`make_data_parallel_step` builds the
jitted data-parallel train step; :mod:`~sparse_jax.compression.wire` counts
the bytes on the wire (analytically and from the compiled HLO);
:func:`initialize_distributed` sets up several processes.
"""

from sparse_jax.compression.compressors import Compressed
from sparse_jax.compression.compressors import Compressor
from sparse_jax.compression.compressors import compose
from sparse_jax.compression.compressors import fp4
from sparse_jax.compression.compressors import fp_quantize
from sparse_jax.compression.compressors import kept_count
from sparse_jax.compression.compressors import lognormal
from sparse_jax.compression.compressors import lognormal_fp
from sparse_jax.compression.compressors import nm
from sparse_jax.compression.compressors import rand_k
from sparse_jax.compression.compressors import threshold
from sparse_jax.compression.compressors import top_k
from sparse_jax.compression.data_parallel import DataParallelStep
from sparse_jax.compression.data_parallel import make_data_parallel_step
from sparse_jax.compression.distributed import initialize_distributed
from sparse_jax.compression.error_feedback import ECONTROL_ETA
from sparse_jax.compression.error_feedback import ErrorFeedbackState
from sparse_jax.compression.error_feedback import VARIANTS
from sparse_jax.compression.error_feedback import WorkerLocal
from sparse_jax.compression.error_feedback import error_feedback
from sparse_jax.compression.lognormal_model import fit_lognormal
from sparse_jax.compression.lognormal_model import lognormal_threshold
from sparse_jax.compression.powersgd import PowerSGDLocal
from sparse_jax.compression.powersgd import PowerSGDState
from sparse_jax.compression.powersgd import powersgd
from sparse_jax.compression.selection import select_above
from sparse_jax.compression.selection import top_k_indices
from sparse_jax.compression.wire import WireBytes
from sparse_jax.compression.wire import exchange_bytes
from sparse_jax.compression.wire import exchange_plan
from sparse_jax.compression.wire import hlo_collectives
from sparse_jax.compression.wire import hlo_wire_bytes

__all__ = [
    "Compressed", "Compressor", "DataParallelStep", "ECONTROL_ETA",
    "ErrorFeedbackState", "compose", "fp4", "fp_quantize", "lognormal_fp",
    "VARIANTS", "WireBytes", "WorkerLocal", "error_feedback", "exchange_bytes", "exchange_plan",
    "fit_lognormal", "hlo_collectives", "hlo_wire_bytes",
    "initialize_distributed", "kept_count", "lognormal", "lognormal_threshold",
    "make_data_parallel_step", "nm", "PowerSGDLocal", "PowerSGDState",
    "powersgd", "rand_k", "select_above", "threshold",
    "top_k", "top_k_indices",
]
