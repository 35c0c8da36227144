"""Pallas grouped-matmul kernels, lowered through Triton on GPU.

Shapes (dimension letters: M rows, I contraction (inner), N output columns, G groups):

  gmm:   lhs [M, I], rhs [G, I, N] -> out [M, N],  out[m] = lhs[m] @ rhs[g(m)]
         transpose_rhs: rhs [G, N, I],              out[m] = lhs[m] @ rhs[g(m)].T
         (the input-gradient form: dlhs = gmm(dout, rhs, transpose_rhs=True))
  tgmm:  lhs [M, I], dout [M, N] -> out [G, I, N], out[g] = lhs_g.T @ dout_g
         (the weight gradient)

Tiling (tm, tk, tn): every block edge is a power of two >= 16 (Triton tensors
are power-of-two shaped and its dots need 16); M, I, N need not be multiples
of the tiles: partial blocks are handled with masked loads and stores, so no
operand is ever padded or copied.

gmm grid: (row tile t, column tile j), all programs independent (a GPU runs
them in parallel, so nothing may be accumulated across grid steps). The
tile-to-group map (tiles.make_group_metadata) lists, per row tile, the groups
it touches: tile t loops over visits [tile_visit_start[t], tile_visit_start[t+1]),
each visit one pass over I with the lhs rows of other groups masked to zero,
summing into one fp32 accumulator. A tile inside one group (the common case:
the MoE layer pads groups to multiples of 128 rows) is one pass; a tile that
straddles b boundaries costs b + 1 passes; a tile past sum(group_sizes) has no
visits and stores zeros.

tgmm grid: (group g, I tile, N tile). Each program walks the rows of its group
in chunks of tm starting at the group's first row, masking rows past its end,
and accumulates lhs_chunk.T @ dout_chunk in fp32. An empty group runs zero
chunks and stores zeros.

Precision: bf16/fp16 operands use tensor cores with fp32 accumulation; fp32
operands are multiplied at full fp32 precision (Precision.HIGHEST: no TF32),
to meet the library's 1e-5 contract.

On GPU the kernels run through Triton with explicit
`jax.experimental.pallas.triton.CompilerParams` (in JAX 0.10 a bare
pallas_call would pick the Mosaic GPU backend). Elsewhere they run with
interpret=True (tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jmoe.kernels.tiles import Tiling, group_bounds, make_group_metadata
from jmoe.vma import struct_like


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _precision(dtype) -> lax.Precision:
    return (lax.Precision.HIGHEST if jnp.dtype(dtype).itemsize >= 4
            else lax.Precision.DEFAULT)


def _compiler_params(tiling: Tiling, interpret: bool):
    if interpret:
        return None
    return plt.CompilerParams(num_warps=tiling.num_warps,
                              num_stages=tiling.num_stages)


def _gmm_kernel(tile_visit_start_ref, visit_group_ref, group_start_ref,
                group_end_ref, lhs_ref, rhs_ref, out_ref, *, m: int, k: int,
                n: int, tm: int, tk: int, tn: int, transpose_rhs: bool,
                precision):
    t = pl.program_id(0)
    j = pl.program_id(1)
    row0 = t * tm
    col0 = j * tn
    rows = row0 + lax.broadcasted_iota(jnp.int32, (tm,), 0)
    cols = col0 + lax.broadcasted_iota(jnp.int32, (tn,), 0)
    col_ok = cols < n
    num_k = _cdiv(k, tk)

    def visit(v, acc):
        g = visit_group_ref[v]
        # Rows of this tile that belong to group g (also excludes rows >= M,
        # since group ends are clipped to M).
        row_ok = (rows >= group_start_ref[g]) & (rows < group_end_ref[g])

        def k_step(kb, acc):
            ks = kb * tk + lax.broadcasted_iota(jnp.int32, (tk,), 0)
            k_ok = ks < k
            x = plt.load(lhs_ref.at[pl.ds(row0, tm), pl.ds(kb * tk, tk)],
                         mask=row_ok[:, None] & k_ok[None, :], other=0)
            if transpose_rhs:
                w = plt.load(rhs_ref.at[g, pl.ds(col0, tn), pl.ds(kb * tk, tk)],
                             mask=col_ok[:, None] & k_ok[None, :], other=0)
            else:
                w = plt.load(rhs_ref.at[g, pl.ds(kb * tk, tk), pl.ds(col0, tn)],
                             mask=k_ok[:, None] & col_ok[None, :], other=0)
            return acc + plt.dot(x, w, trans_b=transpose_rhs, precision=precision)

        return lax.fori_loop(0, num_k, k_step, acc)

    acc = lax.fori_loop(tile_visit_start_ref[t], tile_visit_start_ref[t + 1],
                        visit, jnp.zeros((tm, tn), jnp.float32))
    plt.store(out_ref.at[pl.ds(row0, tm), pl.ds(col0, tn)],
              acc.astype(out_ref.dtype),
              mask=(rows < m)[:, None] & col_ok[None, :])


def gmm(
    lhs_MI: jax.Array,
    rhs_GIN: jax.Array,
    group_sizes_G: jax.Array,
    *,
    tiling: Tiling,
    out_dtype,
    interpret: bool,
    transpose_rhs: bool = False,
) -> jax.Array:
    """out[m] = lhs[m] @ rhs[g(m)] (rhs[g(m)].T if transpose_rhs) -> [M, N].

    lhs_MI: [M, I]; rhs_GIN: [G, I, N] or [G, N, I] (transpose_rhs), same
    dtype as lhs; group_sizes_G: [G] int32. Arguments are validated by
    jmoe.kernels.ops.gmm.
    """
    m, k = lhs_MI.shape
    n = rhs_GIN.shape[1] if transpose_rhs else rhs_GIN.shape[2]
    if m == 0 or n == 0:
        return jnp.zeros((m, n), out_dtype)
    tm, tk, tn = tiling.tm, tiling.tk, tiling.tn
    meta = make_group_metadata(group_sizes_G, m, tm)
    kernel = functools.partial(
        _gmm_kernel, m=m, k=k, n=n, tm=tm, tk=tk, tn=tn,
        transpose_rhs=transpose_rhs, precision=_precision(lhs_MI.dtype))
    flops = 2 * m * k * n
    bytes_accessed = (lhs_MI.size * lhs_MI.dtype.itemsize
                      + rhs_GIN.size * rhs_GIN.dtype.itemsize
                      + m * n * jnp.dtype(out_dtype).itemsize)
    return pl.pallas_call(
        kernel,
        out_shape=struct_like((m, n), out_dtype, lhs_MI, rhs_GIN, group_sizes_G),
        grid=(_cdiv(m, tm), _cdiv(n, tn)),
        compiler_params=_compiler_params(tiling, interpret),
        interpret=interpret,
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0,
                                      bytes_accessed=bytes_accessed),
        name="jmoe_gmm_t" if transpose_rhs else "jmoe_gmm",
    )(meta.tile_visit_start, meta.visit_group, meta.group_start,
      meta.group_end, lhs_MI, rhs_GIN)


def _tgmm_kernel(group_start_ref, group_end_ref, lhs_ref, dout_ref, out_ref, *,
                 k: int, n: int, tm: int, tk: int, tn: int, precision):
    g = pl.program_id(0)
    kb = pl.program_id(1)
    j = pl.program_id(2)
    k0 = kb * tk
    col0 = j * tn
    ks = k0 + lax.broadcasted_iota(jnp.int32, (tk,), 0)
    cols = col0 + lax.broadcasted_iota(jnp.int32, (tn,), 0)
    k_ok = ks < k
    col_ok = cols < n
    start = group_start_ref[g]
    end = group_end_ref[g]
    # Chunks start at the group's first row (not at a global tile boundary),
    # so a group of s rows costs exactly ceil(s / tm) chunks.
    num_chunks = (end - start + tm - 1) // tm

    def chunk(c, acc):
        r0 = start + c * tm
        rows = r0 + lax.broadcasted_iota(jnp.int32, (tm,), 0)
        row_ok = rows < end
        x = plt.load(lhs_ref.at[pl.ds(r0, tm), pl.ds(k0, tk)],
                     mask=row_ok[:, None] & k_ok[None, :], other=0)
        dy = plt.load(dout_ref.at[pl.ds(r0, tm), pl.ds(col0, tn)],
                      mask=row_ok[:, None] & col_ok[None, :], other=0)
        return acc + plt.dot(x, dy, trans_a=True, precision=precision)

    acc = lax.fori_loop(0, num_chunks, chunk, jnp.zeros((tk, tn), jnp.float32))
    plt.store(out_ref.at[g, pl.ds(k0, tk), pl.ds(col0, tn)],
              acc.astype(out_ref.dtype), mask=k_ok[:, None] & col_ok[None, :])


def tgmm(
    lhs_MI: jax.Array,
    dout_MN: jax.Array,
    group_sizes_G: jax.Array,
    *,
    tiling: Tiling,
    out_dtype,
    interpret: bool,
) -> jax.Array:
    """out[g] = lhs[rows of g].T @ dout[rows of g] -> [G, I, N]; empty groups 0.

    lhs_MI: [M, I]; dout_MN: [M, N], same dtype; group_sizes_G: [G] int32.
    """
    m, k = lhs_MI.shape
    n = dout_MN.shape[1]
    num_groups = group_sizes_G.shape[0]
    if m == 0 or k == 0 or n == 0:
        return jnp.zeros((num_groups, k, n), out_dtype)
    tm, tk, tn = tiling.tm, tiling.tk, tiling.tn
    start, end = group_bounds(group_sizes_G, m)
    kernel = functools.partial(_tgmm_kernel, k=k, n=n, tm=tm, tk=tk, tn=tn,
                               precision=_precision(lhs_MI.dtype))
    return pl.pallas_call(
        kernel,
        out_shape=struct_like((num_groups, k, n), out_dtype, lhs_MI, dout_MN, group_sizes_G),
        grid=(num_groups, _cdiv(k, tk), _cdiv(n, tn)),
        compiler_params=_compiler_params(tiling, interpret),
        interpret=interpret,
        cost_estimate=pl.CostEstimate(
            flops=2 * m * k * n, transcendentals=0,
            bytes_accessed=(lhs_MI.size * lhs_MI.dtype.itemsize
                            + dout_MN.size * dout_MN.dtype.itemsize
                            + num_groups * k * n * jnp.dtype(out_dtype).itemsize)),
        name="jmoe_tgmm",
    )(start, end, lhs_MI, dout_MN)
