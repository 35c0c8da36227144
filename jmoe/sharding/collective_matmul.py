"""Collective matmuls: a collective and a matmul fused into a ring of `ppermute`s.

Call these inside `shard_map`. Each ring step sends one block to a neighbour
while the matmul runs on the block already here, so on hardware with async
collectives the transfer hides behind the compute (Wang et al., "Overlap
Communication with Dependent Computation via Decomposition", ASPLOS'23).
The results equal the plain collective + matmul up to float summation order.

  all_gather_matmul(x_mK, w_KN, axis)     == all_gather(x, axis, tiled) @ w
  all_gather_matmul(x_MK, w_Kn, axis, gathered="rhs")
                                          == x @ all_gather(w, axis=1, tiled)
  matmul_reduce_scatter(x_MK, w_KN, axis) == psum_scatter(x @ w, axis, tiled)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _ring(n: int, step: int) -> list:
    """Permutation sending every device's block `step` places to the left."""
    return [(j, (j - step) % n) for j in range(n)]


def all_gather_matmul(lhs: jax.Array, rhs: jax.Array, axis_name: str, *,
                      gathered: str = "lhs", bidirectional: bool = False) -> jax.Array:
    """All-gather one operand over `axis_name` while multiplying.

    gathered="lhs": lhs [m, K] is this device's row block; returns [n*m, N].
    gathered="rhs": rhs [K, n_] is this device's column block (FSDP-style
      weight shard); returns [M, n*n_].
    bidirectional: blocks travel both ways round the ring (half the steps).
    """
    n = lax.axis_size(axis_name)
    idx = lax.axis_index(axis_name)
    if gathered not in ("lhs", "rhs"):
        raise ValueError(f"gathered={gathered!r}: use 'lhs' or 'rhs'.")
    moving = lhs if gathered == "lhs" else rhs
    product = (lambda blk: blk @ rhs) if gathered == "lhs" else (lambda blk: lhs @ blk)
    first = product(moving)
    out = jnp.zeros((n,) + first.shape, first.dtype)
    out = _put(out, idx, first)
    if n == 1:
        return _merge(out, gathered)
    if not bidirectional:
        blk = moving
        for s in range(1, n):
            # After s hops leftwards we hold the block of device idx + s.
            blk = lax.ppermute(blk, axis_name, _ring(n, 1))
            out = _put(out, (idx + s) % n, product(blk))
        return _merge(out, gathered)
    left, right = moving, moving
    for s in range(1, n // 2 + 1):
        left = lax.ppermute(left, axis_name, _ring(n, 1))     # holds idx + s
        out = _put(out, (idx + s) % n, product(left))
        if s < n - s:                                          # not the same block
            right = lax.ppermute(right, axis_name, _ring(n, -1))  # holds idx - s
            out = _put(out, (idx - s) % n, product(right))
    return _merge(out, gathered)


def _put(out, i, value):
    return lax.dynamic_update_index_in_dim(out, value, i, axis=0)


def _merge(out_nXY, gathered):
    n, x, y = out_nXY.shape
    if gathered == "lhs":
        return out_nXY.reshape(n * x, y)
    return out_nXY.transpose(1, 0, 2).reshape(x, n * y)


def matmul_reduce_scatter(lhs: jax.Array, rhs: jax.Array, axis_name: str) -> jax.Array:
    """`psum_scatter(lhs @ rhs, axis_name, scatter_dimension=0, tiled=True)` as a ring.

    lhs [n*m, K_local], rhs [K_local, N] (the K shards differ per device);
    returns this device's [m, N] row block of the sum over devices.
    """
    n = lax.axis_size(axis_name)
    idx = lax.axis_index(axis_name)
    m = lhs.shape[0] // n
    if lhs.shape[0] % n:
        raise ValueError(f"lhs rows {lhs.shape[0]} do not split over {axis_name}={n}.")

    def partial(block):
        return lax.dynamic_slice_in_dim(lhs, block * m, m, axis=0) @ rhs

    # The accumulator for block b visits devices b+1, ..., b+n (= b), adding
    # each one's partial product; it moves right after every step.
    acc = partial((idx - 1) % n)
    for s in range(1, n):
        acc = lax.ppermute(acc, axis_name, _ring(n, -1))
        acc = acc + partial((idx - 1 - s) % n)
    return acc
