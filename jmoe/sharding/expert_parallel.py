"""Expert parallelism written out with `jax.shard_map` and explicit collectives.

Each device holds a shard of the tokens (over `data` x `expert`) and
`E / ep` experts. Per shard:

  capacity: route -> pack `[E, C_local, D]` -> all-to-all over `expert`
            -> local experts on `[E/ep, ep*C_local, D]` -> all-to-all back
            -> combine;
  dropless: route -> sort by expert -> exchange per-expert counts
            -> ragged all-to-all of exactly the rows each peer needs
            -> group by local expert -> grouped matmul -> reverse -> combine.

`lax.ragged_all_to_all` exists on GPU and TPU; XLA:CPU has none, so there the
dropless exchange is a padded dense all-to-all with identical results
(`ragged_all_to_all_dense`). Router statistics are summed over all shards, so
losses and loads equal the single-device layer's.

With `MoEConfig.a2a_hierarchy = g`, every dense all-to-all runs in two levels
(Tutel's 2DH): within groups of g consecutive devices on `expert`, then
across groups. The result is bitwise the flat all-to-all's.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jmoe import dispatch, experts
from jmoe.config import MoEConfig
from jmoe.vma import varying_axes, varying_like
from jmoe.sharding import collective_matmul, specs
from jmoe.sharding.mesh import axis_size

_OUR_AXES = ("data", "expert", "tensor")


def active_expert_mesh(mesh=None):
    """The mesh to run expert-parallel on, or None to run on one device.

    Uses `mesh`, else the mesh set by `jax.set_mesh`/`jax.sharding.use_mesh`.
    A mesh qualifies when its `data`/`expert`/`tensor` axes hold more than
    one device and none of them is already manual (inside a `shard_map`).
    """
    m = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    if m is None or not m.axis_names:
        return None
    ours = [a for a in m.axis_names if a in _OUR_AXES]
    if math.prod(axis_size(m, a) for a in ours) <= 1:
        return None
    manual = getattr(m, "manual_axes", ()) or ()
    if any(a in manual for a in ours):
        return None
    return m


# -------------------------------------------------------------- all-to-all --

def all_to_all(x: jax.Array, ep: int, hierarchy: int = 0) -> jax.Array:
    """Tiled all-to-all over `expert` on axis 0: chunk j of `x[ep*m, ...]` goes
    to device j; the result holds, in source order, the chunks sent to us.

    `hierarchy = g` (1 < g < ep, g | ep) runs it as two all-to-alls: within
    node groups of g devices, then across groups with the same local index.
    """
    if ep == 1:
        return x
    if hierarchy <= 1 or hierarchy >= ep:
        return lax.all_to_all(x, "expert", 0, 0, tiled=True)
    g, nodes = hierarchy, ep // hierarchy
    m = x.shape[0] // ep
    rest = x.shape[1:]
    # Chunks are indexed by destination (node, local); send each to its local
    # index inside our node first.
    x = x.reshape((nodes, g, m) + rest).swapaxes(0, 1).reshape(x.shape)
    intra = [[n * g + l for l in range(g)] for n in range(nodes)]
    x = lax.all_to_all(x, "expert", 0, 0, tiled=True, axis_index_groups=intra)
    # Now [source local, destination node]: forward across nodes.
    x = x.reshape((g, nodes, m) + rest).swapaxes(0, 1).reshape(x.shape)
    inter = [[n * g + l for n in range(nodes)] for l in range(g)]
    return lax.all_to_all(x, "expert", 0, 0, tiled=True, axis_index_groups=inter)


def ragged_all_to_all_dense(operand, output, input_offsets, send_sizes, output_offsets,
                            recv_sizes, *, ep: int, hierarchy: int = 0,
                            slot_rows: Optional[int] = None):
    """`lax.ragged_all_to_all` over `expert`, built from a padded dense all-to-all.

    Same semantics: to every peer j this device sends
    `operand[input_offsets[j] : input_offsets[j] + send_sizes[j]]`, which
    lands in peer j's `output` at `output_offsets[j]`; from peer j it receives
    `recv_sizes[j]` rows. Rows of `output` nobody writes keep their value.
    Each peer's slice travels in a buffer of `slot_rows` rows (default
    `operand.shape[0]`, which fits any slice), so this sends `ep * slot_rows`
    rows per device; a smaller `slot_rows` is the caller's promise that no
    slice, sent or received, is longer.
    """
    n = operand.shape[0] if slot_rows is None else slot_rows
    rows = jnp.arange(n, dtype=jnp.int32)
    valid_PN = rows[None, :] < send_sizes[:, None]
    src_end = operand.shape[0]
    idx_PN = jnp.where(valid_PN, input_offsets[:, None] + rows[None, :], src_end)
    padded = jnp.concatenate([operand, jnp.zeros((1,) + operand.shape[1:], operand.dtype)])
    send = padded[idx_PN]                                       # [ep, n, ...]
    recv = all_to_all(send.reshape((ep * n,) + operand.shape[1:]), ep, hierarchy)
    # Where each source wants its slice placed in our output (sender's view).
    dest_off = all_to_all(output_offsets, ep, hierarchy)
    ok_PN = rows[None, :] < recv_sizes[:, None]
    dest_PN = jnp.where(ok_PN, dest_off[:, None] + rows[None, :], output.shape[0])
    return output.at[dest_PN.reshape(-1)].set(recv, mode="drop")


def _exclusive_cumsum(x, axis=-1):
    return jnp.cumsum(x, axis=axis) - x


def _ragged_impl(cfg: MoEConfig) -> str:
    if cfg.ragged_impl != "auto":
        return cfg.ragged_impl
    if cfg.a2a_hierarchy > 1:
        return "dense"  # the two-level exchange is built from dense all-to-alls
    return "native" if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else "dense"


def _ragged(cfg: MoEConfig, ep: int, *args, slot_rows: Optional[int] = None):
    if _ragged_impl(cfg) == "native":
        return lax.ragged_all_to_all(*args, axis_name="expert")
    return ragged_all_to_all_dense(*args, ep=ep, hierarchy=cfg.a2a_hierarchy,
                                   slot_rows=slot_rows)


def _row_local_expert(recv_off_P, counts_PE, num_rows):
    """Local expert of each received row (rows come ordered by source, then
    expert); `E_local` marks rows nobody filled."""
    p, e_local = counts_PE.shape
    ends = (recv_off_P[:, None] + jnp.cumsum(counts_PE, axis=1)).reshape(-1)
    block_R = jnp.searchsorted(ends, jnp.arange(num_rows, dtype=jnp.int32), side="right")
    return jnp.where(block_R < p * e_local, block_R % e_local, e_local).astype(jnp.int32)


def _dropless_exchange(buf_AD, counts_E, w, cfg: MoEConfig, ep: int, tp: bool,
                       mesh_axes: tuple = ("expert",)):
    """Sends expert-sorted rows to their experts' devices, runs them, brings
    them back. Returns (y_AD in the same row order, dropped count).

    With `cfg.ep_buckets` and the dense emulation, the exchange runs in the smallest bucket that
    holds the busiest (source, destination) pair on the whole mesh, chosen at
    run time by `lax.switch` (every device picks the same branch: the choice
    comes from a max over `mesh_axes`); the worst-case (or capped) buffer is
    the last branch. The branches compute the same result.
    """
    e_local = cfg.num_experts // ep
    num_a = buf_AD.shape[0]
    send_counts_PE = counts_E.reshape(ep, e_local).astype(jnp.int32)
    recv_counts_PE = all_to_all(send_counts_PE, ep, cfg.a2a_hierarchy)
    send_sizes_P = jnp.sum(send_counts_PE, axis=1)
    in_off_P = _exclusive_cumsum(send_sizes_P)
    recv_sizes_P = jnp.sum(recv_counts_PE, axis=1)
    recv_off_P = _exclusive_cumsum(recv_sizes_P)
    rows = cfg.recv_buffer_rows(num_a, ep)
    # Buckets pay where the exchange is the padded dense emulation (its bytes
    # scale with the buffer); the native ragged exchange already moves only
    # the real rows, and re-running a bucket in the backward pass (below)
    # would cost it an extra expert forward.
    slots = cfg.ep_bucket_slots(num_a, ep) if _ragged_impl(cfg) == "dense" else []

    def fallback(buf_AD, w):
        r_counts_PE, r_sizes_P, s_sizes_P = recv_counts_PE, recv_sizes_P, send_sizes_P
        dropped = jnp.zeros((), jnp.int32)
        if rows < ep * num_a:
            # Capped buffer: each source keeps what fits, in source order; the
            # senders learn how much was accepted and count the rest as dropped.
            accepted_P = jnp.clip(rows - recv_off_P, 0, recv_sizes_P)
            first_PE = _exclusive_cumsum(recv_counts_PE, axis=1)
            r_counts_PE = jnp.clip(accepted_P[:, None] - first_PE, 0, recv_counts_PE)
            r_sizes_P = accepted_P
            sent_ok_P = all_to_all(accepted_P, ep, cfg.a2a_hierarchy)
            dropped = jnp.sum(send_sizes_P - sent_ok_P).astype(jnp.int32)
            s_sizes_P = sent_ok_P
        # No pair moves more than one shard's assignments (or the cap).
        y = _exchange_and_run(buf_AD, w, cfg, ep, tp, rows, min(num_a, rows), r_counts_PE,
                              r_sizes_P, s_sizes_P, in_off_P, recv_off_P)
        return y, dropped

    if not slots:
        return fallback(buf_AD, w)

    def bucket(slot):
        def run(buf_AD, w):
            y = _exchange_and_run(buf_AD, w, cfg, ep, tp, ep * slot, slot, recv_counts_PE,
                                  recv_sizes_P, send_sizes_P, in_off_P, recv_off_P)
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


def _exchange_and_run(buf_AD, w, cfg: MoEConfig, ep: int, tp: bool, rows: int, slot,
                      recv_counts_PE, recv_sizes_P, send_sizes_P, in_off_P, recv_off_P):
    """Dispatch exchange into a `rows`-row receive buffer, the local experts,
    and the combine exchange back (no slice longer than `slot` rows).
    Returns y_AD."""
    e_local = cfg.num_experts // ep
    out_off_P = all_to_all(recv_off_P, ep, cfg.a2a_hierarchy)
    zeros = varying_like(jnp.zeros((rows,) + buf_AD.shape[1:], buf_AD.dtype), buf_AD)
    with jax.named_scope("all_to_all_dispatch"):
        recv_RD = _ragged(cfg, ep, buf_AD, zeros, in_off_P, send_sizes_P, out_off_P,
                          recv_sizes_P, slot_rows=slot)
    with jax.named_scope("local_experts"):
        expert_R = _row_local_expert(recv_off_P, recv_counts_PE, rows)
        # Group the received rows by local expert; unfilled rows form a last
        # group that the grouped matmul never visits.
        lplan = dispatch.dropless_plan(expert_R[:, None], e_local + 1, cfg.group_align)
        lbuf = dispatch.permute(recv_RD, lplan.slot_TK, lplan.src_R)
        y = experts.grouped_mlp(lbuf, w, lplan.group_sizes_E[:e_local], cfg.activation,
                                cfg.gmm_backend)
        y = _tp_reduce(y, tp, axis=1)
        ones = varying_like(jnp.ones((rows, 1), jnp.float32), buf_AD)
        y_RD = dispatch.unpermute(y, ones, lplan.slot_TK, lplan.src_R)
    back_off_P = all_to_all(in_off_P, ep, cfg.a2a_hierarchy)
    with jax.named_scope("all_to_all_combine"):
        out = varying_like(jnp.zeros((buf_AD.shape[0],) + y_RD.shape[1:], y_RD.dtype), y_RD)
        y_AD = _ragged(cfg, ep, y_RD, out, recv_off_P, recv_sizes_P, back_off_P,
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


def serialize_chunks() -> bool:
    """Whether chunk i+1 must wait for chunk i (XLA:CPU only).

    XLA:CPU runs collectives synchronously, so overlapping chunks gains
    nothing there; ordering them keeps every device's sequence of collectives
    the same, forward and backward. (A segfault first blamed on unordered
    chunks turned out to be a YNNPACK fusion bug: see
    `jmoe.sharding.xla_flags.CPU_WORKAROUND_FLAGS`.)
    """
    return jax.default_backend() == "cpu"


def after(x, dep):
    """`x`, made to depend on `dep` when chunks are serialized (identity values).

    The order holds in the backward pass too, reversed: the cotangent that
    flows to `dep` (a zero) is only available once `x`'s cotangent is, so
    chunk i's backward waits for chunk i+1's.
    """
    if not serialize_chunks():
        return x
    return _ordered(x, dep)


@jax.custom_vjp
def _ordered(x, dep):
    x, _ = lax.optimization_barrier((x, dep))
    return x


def _ordered_fwd(x, dep):
    return _ordered(x, dep), jax.tree.map(jnp.zeros_like, dep)


def _ordered_bwd(zero_dep, ct_x):
    ct_dep, ct_x = lax.optimization_barrier((zero_dep, ct_x))
    return ct_x, ct_dep


_ordered.defvjp(_ordered_fwd, _ordered_bwd)


def chunk_bounds(size: int, chunks: int) -> list:
    """Static [start, stop) pieces of `range(size)`, as equal as possible, none empty."""
    edges = np.linspace(0, size, min(chunks, max(size, 1)) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _capacity_exchange(buf_ECD, w, cfg: MoEConfig, ep: int, tp: bool):
    """[E, C, D] buffers -> experts on their devices -> back, as [E, C, D].

    With `overlap_chunks = n` the C slots are cut into n pieces, each with its
    own all-to-alls and expert matmuls: piece i+1's dispatch does not wait for
    piece i's experts, so the scheduler may run them concurrently. Every row
    is computed exactly as without chunking.
    """
    pieces = chunk_bounds(buf_ECD.shape[1], cfg.overlap_chunks)
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
        recv = all_to_all(buf_ECD, ep, cfg.a2a_hierarchy)       # [src, E_local] x C
    recv = recv.reshape(ep, e_local, c, d).swapaxes(0, 1).reshape(e_local, ep * c, d)
    with jax.named_scope("local_experts"):
        if tp and cfg.collective_matmul and lax.axis_size("tensor") > 1:
            y = _tensor_parallel_mlp_ring(recv, w, cfg)
        else:
            y = _tp_reduce(experts.batched_mlp(recv, w, cfg.activation), tp, axis=2)
    d_y = y.shape[2]  # D, or D / tp after a reduce-scatter
    y = y.reshape(e_local, ep, c, d_y).swapaxes(0, 1).reshape(e, c, d_y)
    with jax.named_scope("all_to_all_combine"):
        y = all_to_all(y, ep, cfg.a2a_hierarchy)
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


def check_ep(cfg: MoEConfig, mesh, num_tokens: int) -> None:
    """Raises ValueError (before compile) for configs the mesh cannot run."""
    ep, tp = axis_size(mesh, "expert"), axis_size(mesh, "tensor")
    shards = axis_size(mesh, "data") * ep
    if cfg.num_experts % ep:
        raise ValueError(
            f"MoEConfig.num_experts={cfg.num_experts} does not divide over the mesh's expert "
            f"axis of size {ep}: choose an expert axis size that divides num_experts.")
    if num_tokens % shards:
        raise ValueError(
            f"{num_tokens} tokens do not split over data*expert={shards} devices: make "
            "batch*sequence (the token count) divisible by the data and expert axis sizes.")
    if cfg.d_ff % tp:
        raise ValueError(f"MoEConfig.d_ff={cfg.d_ff} does not divide over the tensor axis of "
                         f"size {tp}: choose a tensor axis size that divides d_ff.")
    h = cfg.a2a_hierarchy
    if h > 1 and (ep % h or h >= ep):
        raise ValueError(
            f"MoEConfig.a2a_hierarchy={h} must divide the expert axis size {ep} and be smaller "
            "than it (devices per node group); use 0 for a flat all-to-all.")
    if cfg.ragged_impl == "native" and h > 1:
        raise ValueError("MoEConfig.ragged_impl='native' has no two-level form: set "
                         "ragged_impl='dense' or 'auto', or a2a_hierarchy=0.")


def moe_apply_ep(params, x_TD: jax.Array, xr_TD: jax.Array, cfg: MoEConfig, mesh,
                 bias_E: Optional[jax.Array]):
    """The MoE layer over `mesh`: [T, D] -> ([T, D], MoEAux); equals `_local_moe`
    on one device (the capacity path computes C per token shard, like GShard's
    groups, so it matches when no shard overflows)."""
    from jmoe import moe  # moe imports this module lazily; no cycle at import time

    num_tokens = x_TD.shape[0]
    check_ep(cfg, mesh, num_tokens)
    names = mesh.axis_names
    ep = axis_size(mesh, "expert")
    # Axes of size 1 are left out of the specs: values are then invariant
    # over them, and shard_map's replication tracking needs no psum over
    # them. (XLA:CPU keeps collectives over size-1 groups: each one costs a
    # rendezvous of all devices and copies of its operands.)
    names = tuple(a for a in names if axis_size(mesh, a) > 1)
    tp = "tensor" in names
    tok = tuple(a for a in specs.TOKEN_AXES if a in names)
    tok_spec = P(tok, None) if tok else P()
    w_exp = params["experts"]
    w_specs = {k: specs.restrict(specs.EXPERT_SPECS[k], names) for k in w_exp}
    if bias_E is None:
        bias_E = jnp.zeros((cfg.num_experts,), jnp.float32)

    def core(x, xr, w_DE, bias, w):
        return moe.moe_core(
            x, xr, w_DE, cfg, bias,
            capacity_experts=functools.partial(_capacity_exchange, w=w, cfg=cfg, ep=ep, tp=tp),
            dropless_experts=lambda buf, counts: _dropless_exchange(
                buf, counts, w, cfg, ep, tp, names),
            # Rows are sorted per global expert before the exchange; the
            # receiving side pads to `group_align` when it regroups them.
            dropless_align=1)

    def body(x, xr, w_DE, bias, w):
        if cfg.dispatch == "dropless" and cfg.overlap_chunks > 1:
            # Dropless chunks by token: routing is per token and nothing drops,
            # so each chunk's pipeline is independent and the sum is exact.
            parts = []
            for i, (a, b) in enumerate(chunk_bounds(x.shape[0], cfg.overlap_chunks)):
                xa, xra = x[a:b], xr[a:b]
                if parts:
                    xa, xra = after((xa, xra), parts[-1][0])
                with jax.named_scope(f"chunk{i}"):
                    parts.append(core(xa, xra, w_DE, bias, w))
            out = jnp.concatenate([p_[0] for p_ in parts], axis=0)
            sums, dropped = jax.tree.map(lambda *v: sum(v[1:], v[0]),
                                         *[(p_[1], p_[2]) for p_ in parts])
        else:
            out, sums, dropped = core(x, xr, w_DE, bias, w)
        if tok:
            sums, dropped = lax.psum((sums, dropped), tok)
        return out, moe.finalize_stats(sums, cfg, dropped)

    fn = jax.shard_map(body, mesh=mesh,
                       in_specs=(tok_spec, tok_spec, P(), P(), w_specs),
                       out_specs=(tok_spec, P()))
    return fn(x_TD, xr_TD, params["router"]["w_DE"], bias_E, w_exp)
