"""Public grouped-matmul ops: argument checks, backend choice, custom VJPs.

    out_MN  = gmm(lhs_MI, rhs_GIN, group_sizes_G)   out[m] = lhs[m] @ rhs[g(m)]
    drhs_GIN = tgmm(lhs_MI, dout_MN, group_sizes_G) drhs[g] = lhs_g.T @ dout_g

Rows are grouped contiguously (group 0 owns rows [0, gs[0]), group 1 the next
gs[1] rows, ...); rows past sum(group_sizes) give zeros and receive zero
gradient. Both ops are differentiable in their float arguments:

    gmm:  dlhs = gmm(dout, rhs, transpose_rhs=True)   drhs = tgmm(lhs, dout)
    tgmm: dlhs = gmm(dout, c, transpose_rhs=True)     ddout = gmm(lhs, c)

Backends: 'xla' (per-group loops of large dots, any platform), 'pallas' (Triton
kernels on GPU, interpret mode elsewhere), 'auto' (pallas on GPU, else xla).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jmoe.config import GMM_BACKENDS, GPU_PLATFORMS, resolve_gmm_backend
from jmoe.kernels import xla_gmm
from jmoe.vma import match_cotangent
from jmoe.kernels.tiles import (
    XLA_TM, Tiling, as_tiling, check_pallas_tiling, check_tiling_class, default_pallas_tiling)

BACKENDS = GMM_BACKENDS


def resolve_backend(backend: str) -> str:
    """Maps 'auto' to the concrete backend for the default platform."""
    return resolve_gmm_backend(backend, jax.default_backend())


def _check_float(name: str, dtype) -> None:
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{name} has dtype {jnp.dtype(dtype)}: grouped matmuls take "
            "floating-point operands (float32, bfloat16, float16)")


def _check_group_sizes(group_sizes: Any, num_groups: int | None = None) -> None:
    if getattr(group_sizes, "ndim", None) != 1:
        raise ValueError(
            f"group_sizes must have shape [G], got shape "
            f"{getattr(group_sizes, 'shape', None)}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(
            f"group_sizes has dtype {group_sizes.dtype}: it must be int32")
    if group_sizes.shape[0] < 1:
        raise ValueError("group_sizes must have at least one group (G >= 1)")
    if num_groups is not None and group_sizes.shape[0] != num_groups:
        raise ValueError(
            f"group_sizes has {group_sizes.shape[0]} entries but rhs has "
            f"{num_groups} groups: they must match")


def _out_dtype(preferred_element_type, default) -> np.dtype:
    if preferred_element_type is None:
        return jnp.dtype(default)
    _check_float("preferred_element_type", preferred_element_type)
    return jnp.dtype(preferred_element_type)


def _tiling_for(backend: str, tiling, dtype, k: int, n: int) -> Tiling:
    """A shipped class name (`auto`, `wide`, `narrow`) or None picks the
    default; the xla backend has one shipped tiling (its row chunk)."""
    if backend == "pallas":
        t = (default_pallas_tiling(dtype, k, n, tiling or "auto")
             if tiling is None or isinstance(tiling, str) else as_tiling(tiling))
        check_pallas_tiling(t, jnp.dtype(dtype).itemsize)
        return t
    if tiling is None or isinstance(tiling, str):
        check_tiling_class(tiling or "auto")
        return Tiling(XLA_TM, XLA_TM, XLA_TM)
    return as_tiling(tiling)


def _interpret(interpret: bool | None) -> bool:
    return (jax.default_backend() not in GPU_PLATFORMS) if interpret is None else bool(interpret)


# ---------------------------------------------------------------------------
# Backend dispatch (no autodiff rules here).


def _gmm_impl(lhs, rhs, group_sizes, backend, tiling, out_dtype, interpret,
              transpose_rhs):
    if backend == "xla":
        return xla_gmm.gmm(lhs, rhs, group_sizes, tm=tiling.tm,
                           out_dtype=out_dtype, transpose_rhs=transpose_rhs)
    from jmoe.kernels import pallas_gmm  # pylint: disable=g-import-not-at-top
    return pallas_gmm.gmm(lhs, rhs, group_sizes, tiling=tiling,
                          out_dtype=out_dtype, interpret=interpret,
                          transpose_rhs=transpose_rhs)


def _tgmm_impl(lhs, dout, group_sizes, backend, tiling, out_dtype, interpret):
    if backend == "xla":
        return xla_gmm.tgmm(lhs, dout, group_sizes, tm=tiling.tm,
                            out_dtype=out_dtype)
    from jmoe.kernels import pallas_gmm  # pylint: disable=g-import-not-at-top
    return pallas_gmm.tgmm(lhs, dout, group_sizes, tiling=tiling,
                           out_dtype=out_dtype, interpret=interpret)


# ---------------------------------------------------------------------------
# custom_vjp wiring. Static arguments: backend, tiling, out_dtype, interpret
# (and transpose_rhs); group_sizes is an integer array with no cotangent.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _gmm(lhs, rhs, group_sizes, backend, tiling, out_dtype, interpret,
         transpose_rhs):
    return _gmm_impl(lhs, rhs, group_sizes, backend, tiling, out_dtype,
                     interpret, transpose_rhs)


def _gmm_fwd(lhs, rhs, group_sizes, backend, tiling, out_dtype, interpret,
             transpose_rhs):
    out = _gmm_impl(lhs, rhs, group_sizes, backend, tiling, out_dtype,
                    interpret, transpose_rhs)
    return out, (lhs, rhs, group_sizes)


def _gmm_bwd(backend, tiling, out_dtype, interpret, transpose_rhs, res, dout):
    lhs, rhs, group_sizes = res
    # Operands of one dot share a dtype (see _common), so cast the cotangent
    # to the weights' dtype: the usual mixed-precision backward.
    dout = dout.astype(rhs.dtype)
    # out = lhs @ W with W = rhs[g] ([I, N]) or rhs[g].T (transpose_rhs).
    # dlhs = dout @ W.T: the transposed-rhs form of the same op.
    dlhs = _gmm(dout, rhs, group_sizes, backend, tiling, lhs.dtype, interpret,
                not transpose_rhs)
    # The weight gradient feeds nothing else in the backward pass (no
    # all-to-all waits on it: Lancet's observation), so the scheduler may run
    # it alongside the backward exchange; the scope name lets tests check that.
    with jax.named_scope("expert_weight_grad"):
        if transpose_rhs:  # rhs[g] is [N, I]: drhs[g] = dout_g.T @ lhs_g
            drhs = _tgmm(dout, lhs, group_sizes, backend, tiling, rhs.dtype,
                         interpret)
        else:
            drhs = _tgmm(lhs, dout, group_sizes, backend, tiling, rhs.dtype,
                         interpret)
    # Inside shard_map: weights replicated over an axis get the summed gradient.
    return match_cotangent(dlhs, lhs), match_cotangent(drhs, rhs), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _tgmm(lhs, dout, group_sizes, backend, tiling, out_dtype, interpret):
    return _tgmm_impl(lhs, dout, group_sizes, backend, tiling, out_dtype,
                      interpret)


def _tgmm_fwd(lhs, dout, group_sizes, backend, tiling, out_dtype, interpret):
    out = _tgmm_impl(lhs, dout, group_sizes, backend, tiling, out_dtype,
                     interpret)
    return out, (lhs, dout, group_sizes)


def _tgmm_bwd(backend, tiling, out_dtype, interpret, res, c_GIN):
    lhs, dout, group_sizes = res
    c_GIN = c_GIN.astype(lhs.dtype)
    # out[g] = lhs_g.T @ dout_g, so dlhs_g = dout_g @ c[g].T, ddout_g = lhs_g @ c[g].
    dlhs = _gmm(dout, c_GIN, group_sizes, backend, tiling, lhs.dtype, interpret,
                True)
    ddout = _gmm(lhs, c_GIN, group_sizes, backend, tiling, dout.dtype,
                 interpret, False)
    return match_cotangent(dlhs, lhs), match_cotangent(ddout, dout), None


_tgmm.defvjp(_tgmm_fwd, _tgmm_bwd)


def _common(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Casts both operands to their promoted float dtype (exact)."""
    dt = jnp.promote_types(a.dtype, b.dtype)
    return a.astype(dt), b.astype(dt)


# ---------------------------------------------------------------------------
# Public API.


def gmm(
    lhs_MI: jax.Array,
    rhs_GIN: jax.Array,
    group_sizes_G: jax.Array,
    *,
    backend: str = "auto",
    tiling: Tiling | tuple[int, int, int] | str | None = None,
    preferred_element_type=None,
    interpret: bool | None = None,
    transpose_rhs: bool = False,
) -> jax.Array:
    """Grouped matmul: out[m] = lhs[m] @ rhs[g(m)].

    Args:
      lhs_MI: [M, I] rows grouped contiguously by group_sizes.
      rhs_GIN: [G, I, N] one matrix per group ([G, N, I] if transpose_rhs).
      group_sizes_G: [G] int32 rows per group (traced; may be 0). Rows past
        sum(group_sizes) give zeros; a sum past M is clipped at M.
      backend: 'auto' (pallas on GPU, xla elsewhere), 'xla' or 'pallas'.
      tiling: (tm, tk, tn) or a Tiling; None or 'auto' picks the shipped
        default for the backend, dtype and shape; 'wide' / 'narrow' force
        a shipped Pallas class (`PALLAS_TILINGS`). The xla backend uses
        only tm (its shipped row chunk for a class name).
      preferred_element_type: output dtype (default: lhs dtype). Accumulation
        is always fp32.
      interpret: run Pallas kernels in interpret mode (default: off GPU only).
      transpose_rhs: use rhs[g].T, with rhs of shape [G, N, I].

    Returns:
      [M, N] array.
    """
    backend = resolve_backend(backend)
    if getattr(lhs_MI, "ndim", None) != 2:
        raise ValueError(f"lhs must have shape [M, I], got {getattr(lhs_MI, 'shape', None)}")
    if getattr(rhs_GIN, "ndim", None) != 3:
        raise ValueError(
            f"rhs must have shape [G, I, N], got {getattr(rhs_GIN, 'shape', None)}")
    _check_float("lhs", lhs_MI.dtype)
    _check_float("rhs", rhs_GIN.dtype)
    _check_group_sizes(group_sizes_G, rhs_GIN.shape[0])
    k_rhs = rhs_GIN.shape[2] if transpose_rhs else rhs_GIN.shape[1]
    if lhs_MI.shape[1] != k_rhs:
        raise ValueError(
            f"lhs has I={lhs_MI.shape[1]} columns but rhs {rhs_GIN.shape} has I={k_rhs}"
            f"{' (transpose_rhs=True: rhs is [G, N, I])' if transpose_rhs else ''}")
    out_dtype = _out_dtype(preferred_element_type, lhs_MI.dtype)
    lhs_MI, rhs_GIN = _common(lhs_MI, rhs_GIN)
    n = rhs_GIN.shape[1] if transpose_rhs else rhs_GIN.shape[2]
    t = _tiling_for(backend, tiling, lhs_MI.dtype, lhs_MI.shape[1], n)
    return _gmm(lhs_MI, rhs_GIN, group_sizes_G.astype(jnp.int32), backend, t,
                out_dtype, _interpret(interpret), bool(transpose_rhs))


def tgmm(
    lhs_MI: jax.Array,
    dout_MN: jax.Array,
    group_sizes_G: jax.Array,
    *,
    num_groups: int | None = None,
    backend: str = "auto",
    tiling: Tiling | tuple[int, int, int] | None = None,
    preferred_element_type=None,
    interpret: bool | None = None,
) -> jax.Array:
    """Per-group transposed matmul: out[g] = lhs[rows of g].T @ dout[rows of g].

    This is the weight gradient of gmm. Empty groups give zeros.

    Args:
      lhs_MI: [M, I]; dout_MN: [M, N], rows grouped by group_sizes.
      group_sizes_G: [G] int32 rows per group.
      num_groups: number of output groups, 1 <= num_groups <= G (default G);
        rows of later groups are ignored.
      backend, tiling, preferred_element_type, interpret: as for gmm.

    Returns:
      [num_groups, I, N] array in lhs dtype (or preferred_element_type).
    """
    backend = resolve_backend(backend)
    if getattr(lhs_MI, "ndim", None) != 2:
        raise ValueError(f"lhs must have shape [M, I], got {getattr(lhs_MI, 'shape', None)}")
    if getattr(dout_MN, "ndim", None) != 2:
        raise ValueError(
            f"dout must have shape [M, N], got {getattr(dout_MN, 'shape', None)}")
    if lhs_MI.shape[0] != dout_MN.shape[0]:
        raise ValueError(
            f"lhs {lhs_MI.shape} and dout {dout_MN.shape} must have the same "
            "number of rows M")
    _check_float("lhs", lhs_MI.dtype)
    _check_float("dout", dout_MN.dtype)
    _check_group_sizes(group_sizes_G)
    g_all = group_sizes_G.shape[0]
    if num_groups is None:
        num_groups = g_all
    if (not isinstance(num_groups, (int, np.integer)) or isinstance(num_groups, bool)
            or not 1 <= num_groups <= g_all):
        raise ValueError(
            f"num_groups={num_groups!r} is invalid: must be an int in "
            f"[1, {g_all}] (the length of group_sizes)")
    out_dtype = _out_dtype(preferred_element_type, lhs_MI.dtype)
    lhs_MI, dout_MN = _common(lhs_MI, dout_MN)
    t = _tiling_for(backend, tiling, lhs_MI.dtype, lhs_MI.shape[1],
                    dout_MN.shape[1])
    # Groups past num_groups then lie past sum(group_sizes): ignored.
    group_sizes_G = group_sizes_G[:int(num_groups)].astype(jnp.int32)
    return _tgmm(lhs_MI, dout_MN, group_sizes_G, backend, t, out_dtype,
                 _interpret(interpret))
