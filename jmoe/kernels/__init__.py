"""Grouped matrix multiplication for MoE experts.

    out_MN   = gmm(lhs_MI, rhs_GIN, group_sizes_G)    out[m] = lhs[m] @ rhs[g(m)]
    drhs_GIN = tgmm(lhs_MI, dout_MN, group_sizes_G)   per-group lhs.T @ dout

M rows grouped contiguously into G groups, I contraction (inner), N output columns.
Both are differentiable (jax.custom_vjp). Backends: 'xla' (pure XLA, any
platform), 'pallas' (Triton kernels on GPU; interpret mode elsewhere), 'auto'.
"""

from jmoe.kernels.ops import BACKENDS, gmm, resolve_backend, tgmm
from jmoe.kernels.tiles import PALLAS_TILINGS, Tiling, make_group_metadata

__all__ = [
    "BACKENDS",
    "PALLAS_TILINGS",
    "Tiling",
    "gmm",
    "make_group_metadata",
    "resolve_backend",
    "tgmm",
]
