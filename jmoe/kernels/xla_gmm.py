"""Pure-XLA grouped matmul: loops over group-aligned row chunks.

Shapes: lhs [M, K], rhs [G, K, N] (or [G, N, K] with transpose_rhs),
group_sizes [G], out [M, N]; tgmm gives [G, K, N].

Each loop step takes one chunk of rows that all belong to one group g (a
dynamic_slice of lhs), one expert matrix rhs[g], and does a single dense
[c, K] x [K, N] dot with fp32 accumulation. On CPU every step is then one
large GEMM for the platform's matmul library, which is why this beats
`lax.ragged_dot` (on XLA:CPU that runs many small dots).

Chunks start at each group's first row, not at a global tile boundary, so no
chunk straddles two groups (with tile-aligned chunks a skewed routing wastes
up to G - 1 extra tiles of work). Chunk sizes form a ladder (tm, tm / 4), e.g. (512, 128):
a group of s rows takes s // 512 chunks of 512 rows, then ceil(rest / 128)
chunks of 128. Groups padded to multiples of 128 rows (what the MoE layer
does) are then covered with no wasted row; otherwise only a group's last
chunk is partial and is merged under a row mask. Each rung is one
`fori_loop` whose trip count is a traced scalar, so rows past
sum(group_sizes) cost nothing.

A chunk that would run past row M is shifted back to end at M (no padded copy
of lhs); rows it re-covers are masked out.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jmoe.kernels.tiles import group_bounds
from jmoe.vma import varying_like

# The small rung is tm / 4: with tm = 512 that is 128, the row multiple the
# MoE layer pads groups to, so padded groups need no masked chunk.
LADDER_STEP = 4


@dataclasses.dataclass(frozen=True)
class _Rung:
    """The chunks of one size c: chunk i is rows [row[i], row[i] + c) of
    group group[i]; slots at or past `count` are padding."""

    size: int
    group: jax.Array  # [S] int32
    row: jax.Array  # [S] int32, nominal first row (may exceed M - size)
    count: jax.Array  # [] int32


def chunk_ladder(tm: int, m: int) -> tuple[int, ...]:
    """Chunk sizes for a largest chunk of tm rows: (tm, tm // LADDER_STEP),
    clipped to M=m rows, largest first, no duplicates."""
    sizes = {min(tm, m), min(max(tm // LADDER_STEP, 1), m)}
    return tuple(sorted((s for s in sizes if s > 0), reverse=True))


def _plan(group_sizes_G: jax.Array, m: int, ladder: tuple[int, ...]):
    """Splits every group into chunks of the ladder's sizes (see module doc)."""
    start, end = group_bounds(group_sizes_G, m)
    num_groups = start.shape[0]
    done = start  # first row of each group not yet covered
    rungs = []
    for level, c in enumerate(ladder):
        rest = end - done
        last = level == len(ladder) - 1
        per_group = (rest + c - 1) // c if last else rest // c
        # Static bound on the number of chunks of this size.
        if level == 0:
            # A partial chunk per group at most: ceil(M / c) + G - 1.
            slots = (m + c - 1) // c + num_groups - 1 if last else m // c
        else:
            prev = ladder[level - 1]
            per = -(-prev // c) if last else prev // c
            slots = min(num_groups * per, (m + c - 1) // c + num_groups)
        slots = max(slots, 1)
        csum = jnp.cumsum(per_group)
        idx = jnp.arange(slots, dtype=jnp.int32)
        group = jnp.searchsorted(csum, idx, side="right").astype(jnp.int32)
        group = jnp.minimum(group, num_groups - 1)
        within = idx - (csum - per_group)[group]
        rungs.append(_Rung(size=c, group=group, row=done[group] + within * c,
                           count=csum[-1].astype(jnp.int32)))
        done = jnp.minimum(done + per_group * c, end)
    return start, end, rungs


def _chunk_rows(m: int, c: int, nominal: jax.Array, end: jax.Array):
    """(first row actually sliced, keep mask [c, 1], whether no row is masked)."""
    row0 = jnp.minimum(nominal, m - c)
    rows = row0 + lax.broadcasted_iota(jnp.int32, (c, 1), 0)
    keep = (rows >= nominal) & (rows < end)
    full = (row0 == nominal) & (nominal + c <= end)
    return row0, keep, full


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
    tm: largest chunk (rows per dot). Returns [M, N] in out_dtype.
    """
    m, _ = lhs_MK.shape
    n = rhs_GKN.shape[1] if transpose_rhs else rhs_GKN.shape[2]
    out = varying_like(jnp.zeros((m, n), out_dtype), lhs_MK, rhs_GKN,
                       group_sizes_G)
    if m == 0 or n == 0:
        return out
    _, end, rungs = _plan(group_sizes_G, m, chunk_ladder(tm, m))
    # Contract lhs dim 1 with rhs dim 0 ([K, N]) or dim 1 ([N, K]).
    dims = (((1,), (1 if transpose_rhs else 0,)), ((), ()))

    for rung in rungs:
        c = rung.size

        def step(i, out, rung=rung, c=c):
            g = rung.group[i]
            row0, keep, full = _chunk_rows(m, c, rung.row[i], end[g])
            x = lax.dynamic_slice_in_dim(lhs_MK, row0, c, axis=0)
            w = lax.dynamic_index_in_dim(rhs_GKN, g, axis=0, keepdims=False)
            y = lax.dot_general(x, w, dims,
                                preferred_element_type=jnp.float32).astype(out_dtype)

            def merge(out):
                # Partial chunk: keep what the neighbouring group wrote.
                old = lax.dynamic_slice_in_dim(out, row0, c, axis=0)
                return lax.dynamic_update_slice_in_dim(
                    out, jnp.where(keep, y, old), row0, axis=0)

            def write(out):
                return lax.dynamic_update_slice_in_dim(out, y, row0, axis=0)

            return lax.cond(full, write, merge, out)

        out = lax.fori_loop(0, rung.count, step, out)
    return out


def tgmm(
    lhs_MK: jax.Array,
    dout_MN: jax.Array,
    group_sizes_G: jax.Array,
    *,
    tm: int,
    out_dtype,
) -> jax.Array:
    """out[g] = lhs[rows of g].T @ dout[rows of g]; empty groups give zeros.

    lhs_MK: [M, K]; dout_MN: [M, N]. tm: largest chunk. Returns [G, K, N].
    """
    m, k = lhs_MK.shape
    n = dout_MN.shape[1]
    num_groups = group_sizes_G.shape[0]
    acc = varying_like(jnp.zeros((num_groups, k, n), jnp.float32), lhs_MK,
                       dout_MN, group_sizes_G)
    if m == 0 or k == 0 or n == 0:
        return acc.astype(out_dtype)
    _, end, rungs = _plan(group_sizes_G, m, chunk_ladder(tm, m))
    dims = (((0,), (0,)), ((), ()))

    for rung in rungs:
        c = rung.size

        def step(i, acc, rung=rung, c=c):
            g = rung.group[i]
            row0, keep, full = _chunk_rows(m, c, rung.row[i], end[g])
            x = lax.dynamic_slice_in_dim(lhs_MK, row0, c, axis=0)
            dy = lax.dynamic_slice_in_dim(dout_MN, row0, c, axis=0)
            # Zeroing one operand's rows drops them from the sum; pick the
            # narrower one. Full chunks skip the select.
            if k <= n:
                x = lax.cond(full, lambda x: x, lambda x: jnp.where(keep, x, 0), x)
            else:
                dy = lax.cond(full, lambda d: d, lambda d: jnp.where(keep, d, 0), dy)
            upd = lax.dot_general(x, dy, dims, preferred_element_type=jnp.float32)
            cur = lax.dynamic_index_in_dim(acc, g, axis=0, keepdims=True)
            return lax.dynamic_update_index_in_dim(acc, cur + upd[None], g, axis=0)

        acc = lax.fori_loop(0, rung.count, step, acc)
    return acc.astype(out_dtype)
