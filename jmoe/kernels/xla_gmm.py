"""Pure-XLA grouped matmul: a loop over the visits of the tile-to-group map.

Shapes: lhs [M, K], rhs [G, K, N] (or [G, N, K] with transpose_rhs),
group_sizes [G], out [M, N]; tgmm gives [G, K, N].

Each loop step takes one row tile of `tm` rows (a dynamic_slice of lhs), one
expert matrix rhs[g] ([K, N]), does a single dense [tm, K] x [K, N] dot with
fp32 accumulation, and writes back only the rows of group g (a row mask, so a
tile that straddles a group boundary is completed over two visits). The trip
count is the number of *real* visits, a traced scalar: rows past
sum(group_sizes) cost nothing. On CPU this keeps every step one large GEMM for
the platform's matmul library, which is why it beats `lax.ragged_dot` (that
lowers to a per-row-block loop with much smaller dots on XLA:CPU).

The last tile of a non-multiple M is shifted back to start at M - tm rather
than padding lhs (no copy of lhs); rows it re-covers are masked out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jmoe.kernels.tiles import make_group_metadata


def _row_tile(m: int, tm: int, tile: jax.Array) -> tuple[jax.Array, jax.Array]:
    """First row of tile `tile` (clamped so the tile fits) and its nominal start."""
    nominal = tile * tm
    return jnp.minimum(nominal, m - tm), nominal


def gmm(
    lhs_MK: jax.Array,
    rhs_GKN: jax.Array,
    group_sizes_G: jax.Array,
    *,
    tm: int,
    out_dtype,
    transpose_rhs: bool = False,
) -> jax.Array:
    """out[m] = lhs[m] @ rhs[g(m)] (or rhs[g(m)].T); rows past the groups are 0.

    lhs_MK: [M, K]; rhs_GKN: [G, K, N], or [G, N, K] if transpose_rhs.
    Returns [M, N] in out_dtype.
    """
    m, _ = lhs_MK.shape
    n = rhs_GKN.shape[1] if transpose_rhs else rhs_GKN.shape[2]
    out = jnp.zeros((m, n), out_dtype)
    if m == 0:
        return out
    tm = min(tm, m)
    meta = make_group_metadata(group_sizes_G, m, tm)
    # Contract lhs dim 1 with rhs dim 0 ([K, N]) or dim 1 ([N, K]).
    dims = (((1,), (1 if transpose_rhs else 0,)), ((), ()))
    rows_in_tile = lax.broadcasted_iota(jnp.int32, (tm, 1), 0)

    def visit(v, out):
        g = meta.visit_group[v]
        row0, nominal = _row_tile(m, tm, meta.visit_tile[v])
        x = lax.dynamic_slice_in_dim(lhs_MK, row0, tm, axis=0)
        w = lax.dynamic_index_in_dim(rhs_GKN, g, axis=0, keepdims=False)
        y = lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)
        rows = row0 + rows_in_tile
        keep = (rows >= jnp.maximum(meta.group_start[g], nominal)) & (
            rows < meta.group_end[g])
        # Merge with what earlier visits of this tile wrote (other groups).
        old = lax.dynamic_slice_in_dim(out, row0, tm, axis=0)
        new = jnp.where(keep, y.astype(out_dtype), old)
        return lax.dynamic_update_slice_in_dim(out, new, row0, axis=0)

    return lax.fori_loop(0, meta.num_visits, visit, out)


def tgmm(
    lhs_MK: jax.Array,
    dout_MN: jax.Array,
    group_sizes_G: jax.Array,
    *,
    tm: int,
    out_dtype,
) -> jax.Array:
    """out[g] = lhs[rows of g].T @ dout[rows of g]; empty groups give zeros.

    lhs_MK: [M, K]; dout_MN: [M, N]. Returns [G, K, N] in out_dtype.
    """
    m, k = lhs_MK.shape
    n = dout_MN.shape[1]
    num_groups = group_sizes_G.shape[0]
    acc = jnp.zeros((num_groups, k, n), jnp.float32)
    if m == 0:
        return acc.astype(out_dtype)
    tm = min(tm, m)
    meta = make_group_metadata(group_sizes_G, m, tm)
    rows_in_tile = lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
    dims = (((0,), (0,)), ((), ()))

    def visit(v, acc):
        g = meta.visit_group[v]
        row0, nominal = _row_tile(m, tm, meta.visit_tile[v])
        x = lax.dynamic_slice_in_dim(lhs_MK, row0, tm, axis=0)
        dy = lax.dynamic_slice_in_dim(dout_MN, row0, tm, axis=0)
        rows = row0 + rows_in_tile
        keep = (rows >= jnp.maximum(meta.group_start[g], nominal)) & (
            rows < meta.group_end[g])
        # Zeroing the narrower operand is enough to drop a row's contribution.
        if k <= n:
            x = jnp.where(keep, x, jnp.zeros_like(x))
        else:
            dy = jnp.where(keep, dy, jnp.zeros_like(dy))
        upd = lax.dot_general(x, dy, dims, preferred_element_type=jnp.float32)
        cur = lax.dynamic_index_in_dim(acc, g, axis=0, keepdims=True)
        return lax.dynamic_update_index_in_dim(acc, cur + upd[None], g, axis=0)

    acc = lax.fori_loop(0, meta.num_visits, visit, acc)
    return acc.astype(out_dtype)
