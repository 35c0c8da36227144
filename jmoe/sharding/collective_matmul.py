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
  all_gather_einsum(spec, x, w, axis, w_dim=i)
                                          == einsum(spec, x, all_gather(w, axis=i, tiled))

`all_gather_einsum` is the FSDP form: the weight's shard may lie on an output
dimension (each step fills its block of the output) or on a contracting one
(each step adds the product of x's matching slice and the block).
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
    out = _ring_fold(moving, axis_name, bidirectional,
                     lambda acc, src, blk: _put(acc, src, product(blk)), out)
    return _merge(out, gathered)


def _ring_fold(own, axis_name: str, bidirectional: bool, visit, carry):
    """Folds `visit(carry, src, block)` over the other devices' blocks.

    `own` is this device's block; step s `ppermute`s the blocks one hop and
    hands `visit` the block of device `src`, so the transfer of step s+1 can
    run while `visit` computes on step s's block. Every device's block but
    our own is visited exactly once (n - 1 steps one way, or n // 2 both
    ways round the ring with `bidirectional`).
    """
    n = lax.axis_size(axis_name)
    idx = lax.axis_index(axis_name)
    if not bidirectional:
        blk = own
        for s in range(1, n):
            # After s hops leftwards we hold the block of device idx + s.
            blk = lax.ppermute(blk, axis_name, _ring(n, 1))
            carry = visit(carry, (idx + s) % n, blk)
        return carry
    left, right = own, own
    for s in range(1, n // 2 + 1):
        left = lax.ppermute(left, axis_name, _ring(n, 1))     # holds idx + s
        carry = visit(carry, (idx + s) % n, left)
        if s < n - s:                                          # not the same block
            right = lax.ppermute(right, axis_name, _ring(n, -1))  # holds idx - s
            carry = visit(carry, (idx - s) % n, right)
    return carry


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


def _parse(spec: str, x: jax.Array, w: jax.Array) -> tuple[str, str, str]:
    if "->" not in spec or "..." in spec or spec.count(",") != 1:
        raise ValueError(f"spec={spec!r}: write 'x,w->out' with explicit labels, no '...'.")
    ins, out = spec.replace(" ", "").split("->")
    xs, ws = ins.split(",")
    if len(xs) != x.ndim or len(ws) != w.ndim:
        raise ValueError(f"spec={spec!r} does not match x{tuple(x.shape)}, w{tuple(w.shape)}.")
    return xs, ws, out


def all_gather_einsum(spec: str, x: jax.Array, w: jax.Array, axis_name: str, *, w_dim: int,
                      bidirectional: bool = False) -> jax.Array:
    """`einsum(spec, x, all_gather(w, axis_name, axis=w_dim, tiled=True))` as a ring.

    x: any shape, the same on every step (e.g. this device's tokens [B, T, D]).
    w: this device's block of the weight along `w_dim`; the full weight has
      n = axis_size(axis_name) blocks there, device i holding block i.
    Let c be the label of `w_dim` in `spec`:
      c in the output: step s computes `einsum(spec, x, block)` and writes it
        to that block's slice of the output along c;
      c contracted: step s adds `einsum(spec, x_c, block)`, where x_c is x's
        slice along c matching the block (a label only w has is summed
        within the block); partial sums accumulate in at least float32.
    Returns the einsum's full output (the same shape as with the gathered w).
    """
    xs, ws, out = _parse(spec, x, w)
    if not 0 <= w_dim < w.ndim:
        raise ValueError(f"w_dim={w_dim} is not a dimension of w{tuple(w.shape)}.")
    c = ws[w_dim]
    if c in xs and c in out:
        raise ValueError(f"spec={spec!r}: label {c!r} of w_dim={w_dim} is a batch dimension "
                         "of x and w; gather a contracting or an output dimension.")
    n = lax.axis_size(axis_name)
    idx = lax.axis_index(axis_name)
    kb = w.shape[w_dim]
    if c in out:
        od = out.index(c)
        first = jnp.einsum(spec, x, w)
        y = jnp.zeros(first.shape[:od] + (n * kb,) + first.shape[od + 1:], first.dtype)

        def put(acc, src, y_blk):
            return lax.dynamic_update_slice_in_dim(acc, y_blk, src * kb, axis=od)

        y = put(y, idx, first)
        return _ring_fold(w, axis_name, bidirectional,
                          lambda acc, src, blk: put(acc, src, jnp.einsum(spec, x, blk)), y)

    xd = xs.index(c) if c in xs else None
    if xd is not None and x.shape[xd] != n * kb:
        raise ValueError(f"x dimension {xd} ({x.shape[xd]}) must be {n} x w's block {kb}.")
    out_dtype = jnp.result_type(x, w)
    acc_dtype = jnp.promote_types(out_dtype, jnp.float32)  # bf16 partial sums would round n times

    def partial(src, blk):
        x_blk = x if xd is None else lax.dynamic_slice_in_dim(x, src * kb, kb, axis=xd)
        return jnp.einsum(spec, x_blk, blk, preferred_element_type=acc_dtype)

    y = _ring_fold(w, axis_name, bidirectional,
                   lambda acc, src, blk: acc + partial(src, blk), partial(idx, w))
    return y.astype(out_dtype)
