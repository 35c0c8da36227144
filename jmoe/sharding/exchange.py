"""The exchanges of expert parallelism: tokens to their experts' devices,
the local experts, and back.

  capacity: `[E, C, D]` buffers -> all-to-all -> local experts on
            `[E/ep, ep*C, D]` -> all-to-all back (`capacity_exchange`,
            chunked by `Execution.overlap_chunks`);
  dropless: per-expert counts -> ragged all-to-all of exactly the rows each
            peer needs -> regroup by local expert -> grouped matmul -> back
            (`dropless_exchange`, in run-time buckets on the dense emulation).

With expert tensor parallelism (`tensor` axis) each device holds an F slice
of its experts; the partial products are summed over `tensor` here.
Shapes: A assignments (rows) of this shard, P peers on `expert`, R rows of a
receive buffer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from jmoe import dispatch, experts
from jmoe.config import MoEConfig
from jmoe.sharding import collective_matmul
from jmoe.sharding.collectives import all_to_all, ragged_all_to_all
from jmoe.sharding.schedule import after, chunk_bounds
from jmoe.vma import varying_axes, varying_like


@struct.dataclass
class ExchangeSizes:
    """Who sends how many rows to whom (int32, per peer P and local expert E).

    recv_counts_PE: rows arriving from each peer for each of our experts;
    recv_sizes_P / send_sizes_P: rows from / to each peer; in_off_P: where
    each peer's slice starts in our send buffer; recv_off_P: where each
    peer's slice lands in our receive buffer.
    """

    recv_counts_PE: jax.Array
    recv_sizes_P: jax.Array
    send_sizes_P: jax.Array
    in_off_P: jax.Array
    recv_off_P: jax.Array


def _exclusive_cumsum(x, axis=-1):
    return jnp.cumsum(x, axis=axis) - x


def _row_local_expert(recv_off_P, counts_PE, num_rows):
    """Local expert of each received row (rows come ordered by source, then
    expert); `E_local` marks rows nobody filled."""
    p, e_local = counts_PE.shape
    ends = (recv_off_P[:, None] + jnp.cumsum(counts_PE, axis=1)).reshape(-1)
    block_R = jnp.searchsorted(ends, jnp.arange(num_rows, dtype=jnp.int32), side="right")
    return jnp.where(block_R < p * e_local, block_R % e_local, e_local).astype(jnp.int32)


def dropless_exchange(buf_AD, counts_E, w, cfg: MoEConfig, ep: int, tp: bool,
                       mesh_axes: tuple = ("expert",)):
    """Sends expert-sorted rows to their experts' devices, runs them, brings
    them back. Returns (y_AD in the same row order, dropped count).

    With `Execution.ep_buckets` and the dense emulation, the exchange runs in the smallest bucket that
    holds the busiest (source, destination) pair on the whole mesh, chosen at
    run time by `lax.switch` (every device picks the same branch: the choice
    comes from a max over `mesh_axes`); the worst-case (or capped) buffer is
    the last branch. The branches compute the same result.
    """
    e_local = counts_E.shape[0] // ep  # experts (or placement slots) per device
    num_a = buf_AD.shape[0]
    h = cfg.execution.a2a_hierarchy
    send_counts_PE = counts_E.reshape(ep, e_local).astype(jnp.int32)
    recv_counts_PE = all_to_all(send_counts_PE, ep, h)
    send_sizes_P = jnp.sum(send_counts_PE, axis=1)
    recv_sizes_P = jnp.sum(recv_counts_PE, axis=1)
    sizes = ExchangeSizes(recv_counts_PE=recv_counts_PE, recv_sizes_P=recv_sizes_P,
                          send_sizes_P=send_sizes_P, in_off_P=_exclusive_cumsum(send_sizes_P),
                          recv_off_P=_exclusive_cumsum(recv_sizes_P))
    rows = cfg.recv_buffer_rows(num_a, ep)
    # Buckets pay where the exchange is the padded dense emulation (its bytes
    # scale with the buffer); the native ragged exchange already moves only
    # the real rows, and re-running a bucket in the backward pass (below)
    # would cost it an extra expert forward.
    slots = cfg.ep_bucket_slots(num_a, ep) if cfg.execution.ragged(jax.default_backend()) == "dense" else []

    def fallback(buf_AD, w):
        fit = sizes
        dropped = jnp.zeros((), jnp.int32)
        if rows < ep * num_a:
            # Capped buffer: each source keeps what fits, in source order; the
            # senders learn how much was accepted and count the rest as dropped.
            accepted_P = jnp.clip(rows - sizes.recv_off_P, 0, recv_sizes_P)
            first_PE = _exclusive_cumsum(recv_counts_PE, axis=1)
            sent_ok_P = all_to_all(accepted_P, ep, h)
            dropped = jnp.sum(send_sizes_P - sent_ok_P).astype(jnp.int32)
            fit = dataclasses.replace(
                sizes, recv_counts_PE=jnp.clip(accepted_P[:, None] - first_PE, 0, recv_counts_PE),
                recv_sizes_P=accepted_P, send_sizes_P=sent_ok_P)
        # No pair moves more than one shard's assignments (or the cap).
        y = _exchange_and_run(buf_AD, w, cfg, ep, tp, fit, rows=rows, slot=min(num_a, rows))
        return y, dropped

    if not slots:
        return fallback(buf_AD, w)

    def bucket(slot):
        def run(buf_AD, w):
            y = _exchange_and_run(buf_AD, w, cfg, ep, tp, sizes, rows=ep * slot, slot=slot)
            return y, jnp.zeros((), jnp.int32)
        return run

    # Same on every device: the busiest pair anywhere (received = sent).
    busiest = lax.pmax(jnp.max(send_sizes_P), mesh_axes)
    branch = jnp.sum(busiest > jnp.asarray(slots, jnp.int32)).astype(jnp.int32)
    with jax.named_scope("ep_buckets"):
        # Each branch is rematerialised in the backward pass: its residuals
        # (shaped by its buffer) would otherwise be zero-filled for every
        # branch not taken, the worst-case one included, on every step.
        branches = [jax.checkpoint(f) for f in [bucket(s_) for s_ in slots] + [fallback]]
        return lax.switch(branch, branches, buf_AD, w)


def _exchange_and_run(buf_AD, w, cfg: MoEConfig, ep: int, tp: bool, sizes: "ExchangeSizes", *,
                      rows: int, slot: int):
    """Dispatch exchange into a `rows`-row receive buffer, the local experts,
    and the combine exchange back (no slice longer than `slot` rows).
    Returns y_AD."""
    e_local = sizes.recv_counts_PE.shape[1]
    h = cfg.execution.a2a_hierarchy
    recv_counts_PE, recv_sizes_P, send_sizes_P = (sizes.recv_counts_PE, sizes.recv_sizes_P,
                                                  sizes.send_sizes_P)
    in_off_P, recv_off_P = sizes.in_off_P, sizes.recv_off_P
    out_off_P = all_to_all(recv_off_P, ep, h)
    zeros = varying_like(jnp.zeros((rows,) + buf_AD.shape[1:], buf_AD.dtype), buf_AD)
    with jax.named_scope("all_to_all_dispatch"):
        recv_RD = ragged_all_to_all(cfg.execution, ep, buf_AD, zeros, in_off_P, send_sizes_P, out_off_P,
                          recv_sizes_P, slot_rows=slot)
    with jax.named_scope("local_experts"):
        expert_R = _row_local_expert(recv_off_P, recv_counts_PE, rows)
        # Group the received rows by local expert; unfilled rows form a last
        # group that the grouped matmul never visits.
        lperm = dispatch.dropless_permutation(expert_R[:, None], e_local + 1, cfg.group_align)
        lbuf = dispatch.permute(recv_RD, lperm.slot_TK, lperm.src_R)
        y = experts.grouped_mlp(lbuf, w, lperm.group_sizes_E[:e_local], cfg.activation,
                                cfg.execution.gmm_backend, cfg.swiglu_alpha, cfg.swiglu_limit,
                                tiling=cfg.execution.gmm_tiling)
        y = _tp_reduce(y, tp, axis=1)
        ones = varying_like(jnp.ones((rows, 1), jnp.float32), buf_AD)
        y_RD = dispatch.unpermute(y, ones, lperm.slot_TK, lperm.src_R)
    back_off_P = all_to_all(in_off_P, ep, h)
    with jax.named_scope("all_to_all_combine"):
        out = varying_like(jnp.zeros((buf_AD.shape[0],) + y_RD.shape[1:], y_RD.dtype), y_RD)
        y_AD = ragged_all_to_all(cfg.execution, ep, y_RD, out, recv_off_P, recv_sizes_P, back_off_P,
                       send_sizes_P, slot_rows=slot)
    return _tp_gather(y_AD, tp, axis=1)


def _tp_reduce(y, tp: bool, axis: int):
    """Sums the F-shard partial products over `tensor`. When D splits evenly,
    as a reduce-scatter: each tensor shard keeps 1/tp of the D columns, so
    the combine all-to-all moves 1/tp of the bytes and `_tp_gather` completes
    the all-reduce after it (psum = reduce-scatter + all-gather). Otherwise a
    plain psum. Either way y leaves here invariant or varying over `tensor`
    as `_tp_gather` expects."""
    if not tp:
        return y
    if y.shape[axis] % lax.axis_size("tensor"):
        return lax.psum(y, "tensor")  # invariant over `tensor` already
    return lax.psum_scatter(y, "tensor", scatter_dimension=axis, tiled=True)


def _tp_gather(y, tp: bool, axis: int):
    """Undoes `_tp_reduce`'s scatter: all D columns, invariant over `tensor`."""
    if not tp or "tensor" not in varying_axes(y):
        return y
    return lax.all_gather(y, "tensor", axis=axis, tiled=True, to="invarying")


def capacity_exchange(buf_ECD, w, cfg: MoEConfig, ep: int, tp: bool):
    """[E, C, D] buffers -> experts on their devices -> back, as [E, C, D].

    With `overlap_chunks = n` the C slots are cut into n pieces, each with its
    own all-to-alls and expert matmuls: piece i+1's dispatch does not wait for
    piece i's experts, so the scheduler may run them concurrently. Every row
    is computed exactly as without chunking.
    """
    pieces = chunk_bounds(buf_ECD.shape[1], cfg.execution.overlap_chunks)
    if len(pieces) == 1:
        return _capacity_exchange_one(buf_ECD, w, cfg, ep, tp)
    ys = []
    for i, (a, b) in enumerate(pieces):
        piece = after(buf_ECD[:, a:b], ys[-1]) if ys else buf_ECD[:, a:b]
        with jax.named_scope(f"chunk{i}"):
            ys.append(_capacity_exchange_one(piece, w, cfg, ep, tp))
    return jnp.concatenate(ys, axis=1)


def _capacity_exchange_one(buf_ECD, w, cfg: MoEConfig, ep: int, tp: bool):
    e, c, d = buf_ECD.shape
    e_local = e // ep
    with jax.named_scope("all_to_all_dispatch"):
        recv = all_to_all(buf_ECD, ep, cfg.execution.a2a_hierarchy)       # [src, E_local] x C
    recv = recv.reshape(ep, e_local, c, d).swapaxes(0, 1).reshape(e_local, ep * c, d)
    with jax.named_scope("local_experts"):
        if tp and cfg.execution.collective_matmul and lax.axis_size("tensor") > 1:
            y = _tensor_parallel_mlp_ring(recv, w, cfg)
        else:
            y = _tp_reduce(experts.batched_mlp(recv, w, cfg.activation, cfg.swiglu_alpha,
                                               cfg.swiglu_limit), tp, axis=2)
    d_y = y.shape[2]  # D, or D / tp after a reduce-scatter
    y = y.reshape(e_local, ep, c, d_y).swapaxes(0, 1).reshape(e, c, d_y)
    with jax.named_scope("all_to_all_combine"):
        y = all_to_all(y, ep, cfg.execution.a2a_hierarchy)
    return _tp_gather(y, tp, axis=2)


def _tensor_parallel_mlp_ring(x_ECD, w, cfg: MoEConfig):
    """Expert MLP with F sharded over `tensor`; the down projection's sum over
    F shards runs as a ppermute ring overlapped with its matmul, then the row
    blocks are all-gathered (psum = reduce-scatter + all-gather)."""
    tp = lax.axis_size("tensor")
    c = x_ECD.shape[1]
    pad = (-c) % tp
    h_ECF = experts.batched_hidden(x_ECD, w, cfg.activation)
    if pad:
        h_ECF = jnp.pad(h_ECF, ((0, 0), (0, pad), (0, 0)))
    w_down = w["w_down_EFD"].astype(h_ECF.dtype)
    y_blk = jax.vmap(lambda h, wd: collective_matmul.matmul_reduce_scatter(h, wd, "tensor"))(
        h_ECF, w_down)
    y = lax.all_gather(y_blk, "tensor", axis=1, tiled=True, to="invarying")
    return y[:, :c]


