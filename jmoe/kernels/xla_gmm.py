"""Pure-XLA grouped matmul: per group, a few large dots over row chunks.

Shapes: lhs [M, I], rhs [G, I, N] (or [G, N, I] with transpose_rhs),
group_sizes [G], out [M, N]; tgmm gives [G, I, N].

Design (chosen by measurement on CPU, see bench/gmm.py): an outer loop over
groups; for group g, rhs[g] is sliced once, then the group's rows are covered
by chunks that start at the group's first row, each one dense
[c, I] x [I, N] dot with fp32 accumulation:

  * as many chunks of `tm` rows as fit (an inner loop with a traced trip
    count), then
  * the remainder (< tm rows) in binary pieces tm/2, tm/4, ..., down to the
    smallest rung `min_rows` (each taken or skipped with a `lax.cond`), then
  * if rows are still left (a size not a multiple of `min_rows`), one masked
    chunk of `min_rows` rows merged into the output under a row mask.

No chunk straddles two groups, so no row is computed twice (with chunks on a
global tile grid, a skewed routing wastes up to G - 1 extra tiles), every dot
is large enough for the CPU's GEMM library to run near its peak, the expert
matrix is copied once per group rather than once per chunk, and tgmm keeps one
[I, N] fp32 accumulator per group in the loop carry. Groups padded to
multiples of 128 rows (what the MoE layer does) need no masked chunk. Rows
past sum(group_sizes) are never touched, so they stay zero.

A chunk that would run past row M is shifted back to end at M (no padded copy
of lhs); rows it re-covers are masked out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jmoe.kernels.tiles import group_bounds
from jmoe.vma import varying_like

# Smallest chunk: the row multiple the MoE layer pads groups to.
MIN_ROWS = 128


def chunk_ladder(tm: int, m: int) -> tuple[int, ...]:
    """Chunk sizes, largest first: tm, tm/2, ... down to min(128, tm/4),
    each clipped to M=m rows (duplicates removed)."""
    low = max(1, min(MIN_ROWS, tm // 4))
    sizes, c = set(), tm
    while c >= low:
        sizes.add(min(c, m))
        c //= 2
    return tuple(sorted((s for s in sizes if s > 0), reverse=True))


def _chunk(m: int, c: int, nominal: jax.Array, end: jax.Array):
    """First row actually sliced (shifted back if it would pass M) and the
    [c, 1] mask of rows that are both >= nominal and < end."""
    row0 = jnp.minimum(nominal, m - c)
    rows = row0 + lax.broadcasted_iota(jnp.int32, (c, 1), 0)
    return row0, (rows >= nominal) & (rows < end)


def _walk_group(ladder, m, start, end, visit_full, visit_masked, carry):
    """Calls visit_full(carry, row0, c) for full chunks and
    visit_masked(carry, row0, c, keep) for the one possible partial chunk,
    covering rows [start, end) of one group (see module doc)."""
    top = ladder[0]
    n_top = (end - start) // top

    # Full chunks end at or before `end` <= M, so they never need a shift.
    def top_step(i, carry):
        return visit_full(carry, start + i * top, top)

    carry = lax.fori_loop(0, n_top, top_step, carry)
    row = start + n_top * top
    for c in ladder[1:]:
        take = end - row >= c
        carry = lax.cond(take, lambda cr, r=row, c=c: visit_full(cr, r, c),
                         lambda cr: cr, carry)
        row = jnp.where(take, row + c, row)
    c = ladder[-1]
    row0, keep = _chunk(m, c, row, end)
    return lax.cond(end > row, lambda cr: visit_masked(cr, row0, c, keep),
                    lambda cr: cr, carry)


def gmm(
    lhs_MI: jax.Array,
    rhs_GIN: jax.Array,
    group_sizes_G: jax.Array,
    *,
    tm: int,
    out_dtype,
    transpose_rhs: bool = False,
) -> jax.Array:
    """out[m] = lhs[m] @ rhs[g(m)] (or rhs[g(m)].T); rows past the groups are 0.

    lhs_MI: [M, I]; rhs_GIN: [G, I, N], or [G, N, I] if transpose_rhs.
    tm: largest chunk (rows per dot). Returns [M, N] in out_dtype.
    """
    m, _ = lhs_MI.shape
    n = rhs_GIN.shape[1] if transpose_rhs else rhs_GIN.shape[2]
    out = varying_like(jnp.zeros((m, n), out_dtype), lhs_MI, rhs_GIN,
                       group_sizes_G)
    if m == 0 or n == 0:
        return out
    ladder = chunk_ladder(tm, m)
    start_G, end_G = group_bounds(group_sizes_G, m)
    # Contract lhs dim 1 with rhs dim 0 ([I, N]) or dim 1 ([N, I]).
    dims = (((1,), (1 if transpose_rhs else 0,)), ((), ()))

    def group(g, out):
        w = lax.dynamic_index_in_dim(rhs_GIN, g, axis=0, keepdims=False)

        def product(row0, c):
            x = lax.dynamic_slice_in_dim(lhs_MI, row0, c, axis=0)
            return lax.dot_general(
                x, w, dims, preferred_element_type=jnp.float32).astype(out_dtype)

        def full(out, row0, c):
            return lax.dynamic_update_slice_in_dim(out, product(row0, c), row0, 0)

        def masked(out, row0, c, keep):
            # Keep what the neighbouring group (or nothing: zeros) left there.
            old = lax.dynamic_slice_in_dim(out, row0, c, axis=0)
            new = jnp.where(keep, product(row0, c), old)
            return lax.dynamic_update_slice_in_dim(out, new, row0, 0)

        return _walk_group(ladder, m, start_G[g], end_G[g], full, masked, out)

    def group_if_rows(g, out):
        # Empty groups (common with many experts) skip even the rhs[g] copy.
        return lax.cond(end_G[g] > start_G[g], group, lambda g, out: out, g, out)

    return lax.fori_loop(0, group_sizes_G.shape[0], group_if_rows, out)


def tgmm(
    lhs_MI: jax.Array,
    dout_MN: jax.Array,
    group_sizes_G: jax.Array,
    *,
    tm: int,
    out_dtype,
) -> jax.Array:
    """out[g] = lhs[rows of g].T @ dout[rows of g]; empty groups give zeros.

    lhs_MI: [M, I]; dout_MN: [M, N]. tm: largest chunk. Returns [G, I, N].
    """
    m, k = lhs_MI.shape
    n = dout_MN.shape[1]
    num_groups = group_sizes_G.shape[0]
    out = varying_like(jnp.zeros((num_groups, k, n), out_dtype), lhs_MI,
                       dout_MN, group_sizes_G)
    if m == 0 or k == 0 or n == 0:
        return out
    ladder = chunk_ladder(tm, m)
    start_G, end_G = group_bounds(group_sizes_G, m)
    dims = (((0,), (0,)), ((), ()))
    acc0 = varying_like(jnp.zeros((k, n), jnp.float32), lhs_MI, dout_MN,
                        group_sizes_G)

    def update(acc, x, dy):
        return acc + lax.dot_general(x, dy, dims,
                                     preferred_element_type=jnp.float32)

    def full(acc, row0, c):
        x = lax.dynamic_slice_in_dim(lhs_MI, row0, c, axis=0)
        dy = lax.dynamic_slice_in_dim(dout_MN, row0, c, axis=0)
        return update(acc, x, dy)

    def masked(acc, row0, c, keep):
        x = lax.dynamic_slice_in_dim(lhs_MI, row0, c, axis=0)
        dy = lax.dynamic_slice_in_dim(dout_MN, row0, c, axis=0)
        # Zeroing one operand's rows drops them from the sum: the narrower one.
        if k <= n:
            x = jnp.where(keep, x, jnp.zeros_like(x))
        else:
            dy = jnp.where(keep, dy, jnp.zeros_like(dy))
        return update(acc, x, dy)

    def group(g, out):
        acc = _walk_group(ladder, m, start_G[g], end_G[g], full, masked, acc0)
        return lax.dynamic_update_index_in_dim(
            out, acc.astype(out_dtype)[None], g, axis=0)

    def group_if_rows(g, out):
        # An empty group's gradient is the zeros `out` starts with.
        return lax.cond(end_G[g] > start_G[g], group, lambda g, out: out, g, out)

    return lax.fori_loop(0, num_groups, group_if_rows, out)
