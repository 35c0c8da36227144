"""One layer's forward and backward time on one device, region by region:
attention, a dense FFN, and the MoE layer (router, plan, permute, the
exchange -- dispatch all-to-all, experts, combine all-to-all -- shared
experts, residual).

The MoE exchange runs as a pipeline of `execution.overlap_chunks` chunks:
chunk i+1's all-to-all overlaps chunk i's experts where the hardware runs
collectives asynchronously. The capacity path keeps its static shapes and
drops what overflows; the dropless path runs as slowly as its most loaded
device, in the bucket the runtime would pick (`jmoe.sharding.exchange`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from jmoe.config import MoEConfig, mlp_matrices, resolve_gmm_backend
from jmoe.planner.hardware import Hardware
from jmoe.planner.load import (bucket_probabilities, capacity_drop_fraction, device_loads,
                               recv_drop_fraction)
from jmoe.planner.primitives import (Prim, all_to_all_time, dtype_bytes, pipeline_time,
                                     ring_allreduce, ring_gather)


@dataclasses.dataclass(frozen=True)
class OpCost:
    """One region of a layer: seconds per micro-batch on one device."""

    name: str
    kind: str  # "compute" | "comm"
    fwd: float
    bwd: float
    recompute: float = 0.0  # forward work repeated in the backward (remat)

    @property
    def total(self) -> float:
        return self.fwd + self.bwd + self.recompute


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """A layer's regions and its time with and without the overlap schedule."""

    name: str
    ops: tuple
    time: float  # with the pipeline schedule (== serial where nothing overlaps)
    drop_fraction: float = 0.0
    detail: dict = dataclasses.field(default_factory=dict)

    @property
    def serial(self) -> float:
        return sum(o.total for o in self.ops)

    @property
    def compute(self) -> float:
        return sum(o.total for o in self.ops if o.kind == "compute")

    @property
    def comm(self) -> float:
        return sum(o.total for o in self.ops if o.kind == "comm")

    @property
    def hidden(self) -> float:
        """Communication time hidden under compute by the schedule."""
        return max(0.0, self.serial - self.time)

    @property
    def a2a(self) -> float:
        return sum(o.total for o in self.ops if o.name.startswith("a2a"))


def remat_split(remat: str, fwd: float, is_plain_matmul: bool) -> float:
    """Forward seconds recomputed in the backward under `remat`."""
    if remat == "full":
        return fwd
    if remat == "dots":
        return 0.0 if is_plain_matmul else fwd
    return 0.0


def attention_cost(d_model: int, num_heads: int, kv_heads: int, head_dim: int,
                   tokens: int, seq_len: int, prim: Prim, remat: str = "none") -> LayerCost:
    """Norm + QKV/output projections + causal attention core + residual."""
    d, h, j, k, t = d_model, num_heads, kv_heads, head_dim, tokens
    b = dtype_bytes(prim.dtype)
    proj_f = 2 * t * d * (2 * h * k + 2 * j * k)
    proj_w = d * (2 * h * k + 2 * j * k) * b
    proj_io = t * (2 * d + 2 * h * k + 2 * j * k) * b
    proj = prim.matmul(proj_f, proj_w + proj_io)
    # QK^T and PV: 4*S*H*K FLOPs per token, half of it under a causal mask
    # when the kernel skips masked blocks; flash backward ~2.5x forward.
    causal = 0.5 if prim.hw.causal_skip else 1.0
    core_f = 4 * t * seq_len * h * k * causal
    core = prim.matmul(core_f, t * (2 * h * k + 2 * j * k) * b, prim.hw.attn_eff)
    core_b = prim.matmul(2.5 * core_f, 2 * t * (2 * h * k + 2 * j * k) * b, prim.hw.attn_eff)
    elem = prim.mem(t * d * b * 6 + t * (h + j) * k * b * 4, kernels=4)  # norm, rope, residual
    ops = (
        OpCost("attn_proj", "compute", proj, 2 * proj, remat_split(remat, proj, True)),
        OpCost("attn_core", "compute", core, core_b, remat_split(remat, core, False)),
        OpCost("attn_elementwise", "compute", elem, 2 * elem, remat_split(remat, elem, False)),
    )
    return LayerCost("attention", ops, sum(o.total for o in ops))


def dense_ffn_cost(d_model: int, hidden: int, activation: str, tokens: int, prim: Prim,
                   remat: str = "none", name: str = "dense_ffn") -> LayerCost:
    mats = mlp_matrices(activation)
    b = dtype_bytes(prim.dtype)
    t, d, f = tokens, d_model, hidden
    mm = prim.matmul(2 * t * d * f * mats, (mats * d * f + t * (2 * d + mats * f)) * b)
    act = prim.mem(t * f * b * (mats + 1) + t * d * b * 4, kernels=2)  # act + norm/residual
    ops = (OpCost(f"{name}_matmul", "compute", mm, 2 * mm, remat_split(remat, mm, True)),
           OpCost(f"{name}_elementwise", "compute", act, 2 * act,
                  remat_split(remat, act, False)))
    return LayerCost(name, ops, sum(o.total for o in ops))


def expert_compute(rows: float, el: int, d: int, f: int, mats: int, prim: Prim,
                   kernels: int = 1, buffer_rows: Optional[float] = None,
                   xla_loop: bool = False) -> tuple[float, float]:
    """(forward, backward) seconds of `el` local experts over `rows` rows.

    buffer_rows: rows of the padded buffer the experts run on (default
    `rows`). Matmuls visit only the real rows; the activation's elementwise
    ops run over the whole buffer. xla_loop: the grouped matmuls are the
    pure-XLA group loop (`jmoe.kernels.xla_gmm`), whose every call zero-fills
    its [buffer_rows, N] output and writes it once more through the loop
    carry.
    """
    b = dtype_bytes(prim.dtype)
    buf = rows if buffer_rows is None else max(rows, buffer_rows)
    flops = 2 * rows * d * f * mats
    w = el * mats * d * f * b
    io = rows * (2 * d + (mats + 1) * f) * b
    fwd = prim.matmul(flops, w + io, prim.hw.gmm_eff) + (kernels - 1) * prim.hw.kernel_overhead
    act = prim.mem(buf * f * b * (mats + 1))
    # Outputs of the forward gmms: (mats - 1) of [buf, F] and one of [buf, D];
    # the backward's data-gradient gmms write the same shapes.
    loop = prim.mem(2 * buf * ((mats - 1) * f + d) * b, kernels=mats) if xla_loop else 0.0
    # Backward: data and weight gradients (2x FLOPs), weights read and their
    # gradients written, activation backward.
    bwd = (prim.matmul(2 * flops, 2 * w + 2 * io, prim.hw.gmm_eff)
           + 2 * (kernels - 1) * prim.hw.kernel_overhead + 1.5 * act + loop)
    return fwd + act + loop, bwd


# -------------------------------------------------------------- MoE layer --

@dataclasses.dataclass(frozen=True)
class _MoELayer:
    """One MoE layer on one device per micro-batch: what every region reads."""

    moe: MoEConfig
    hw: Hardware
    prim: Prim
    ep: int  # expert-parallel size
    tokens: int  # T_local
    load_E: tuple
    remat: str
    backend: str
    chunks: int  # the exchange's pipeline chunks
    core_chunks: int  # the dropless path chunks by token (the whole core per chunk)

    @property
    def b(self) -> int:
        return dtype_bytes(self.prim.dtype)

    @property
    def local_experts(self) -> int:
        return self.moe.num_experts // self.ep

    @property
    def t_c(self) -> float:
        """Tokens of one core chunk."""
        return self.tokens / self.core_chunks

    @property
    def a_c(self) -> float:
        """Assignments of one core chunk."""
        return self.t_c * self.moe.top_k

    def a2a(self, nbytes: float) -> float:
        return all_to_all_time(nbytes, self.ep, self.hw, self.moe.execution.a2a_hierarchy)["time"]

    def op(self, name: str, kind: str, fwd: float, bwd: float,
           plain_matmul: bool = False) -> OpCost:
        return OpCost(name, kind, fwd, bwd, remat_split(self.remat, fwd, plain_matmul))

    def experts(self, rows: float, **kw) -> tuple[float, float]:
        m = self.moe
        return expert_compute(rows, self.local_experts, m.d_model, m.d_ff, m.expert_matrices,
                              self.prim, **kw)


@dataclasses.dataclass(frozen=True)
class _Exchange:
    """The dispatch all-to-all, experts and combine all-to-all of one chunk."""

    comm_in: float
    comm_out: float
    compute_fwd: float
    compute_bwd: float
    chunks: int
    rows: float  # expert rows per device (activations)
    a2a_bytes: float
    drop: float


def _router_ops(g: _MoELayer) -> list:
    """Logits matmul, softmax/top-k, statistics (all fp32 [T, E])."""
    d, e, b, t_c, n = g.moe.d_model, g.moe.num_experts, g.b, g.t_c, g.core_chunks
    r_mm = g.prim.matmul(2 * t_c * d * e, (t_c * d + d * e) * b + t_c * e * 4)
    r_el = g.prim.mem(t_c * e * 4 * 8, kernels=3)
    ops = [g.op("router", "compute", n * (r_mm + r_el), n * (2 * r_mm + r_el))]
    stats = g.hw.intra_alpha if g.ep > 1 else 0.0  # psum of router sums
    if stats:
        ops.append(g.op("router_stats_psum", "comm", stats, 0.0))
        if g.moe.batch_capacity:  # the all-gather of [K, E] counts that ranks rows batch-wide
            ops.append(g.op("batch_rank_all_gather", "comm", stats, 0.0))
    return ops


def _capacity_regions(g: _MoELayer) -> tuple[list, _Exchange, dict]:
    """Plan and permute into static [E, C, D] buffers; the exchange chunks
    cut the C slots, so experts run on [E_local, ep*C/n, D]."""
    prim, d, b, n = g.prim, g.moe.d_model, g.b, g.chunks
    t_all, a_all = g.tokens, g.tokens * g.moe.top_k
    # A batch-wide capacity in dense buffers holds C rows per expert from
    # every shard; C counts over the whole batch, at least the ep shards'
    # tokens (the layer cost does not see the data axis).
    cap = g.moe.capacity(g.tokens * (g.ep if g.moe.batch_capacity else 1))
    rows_buf = g.moe.num_experts * cap  # per device, before and after the exchange
    plan = prim.sort(a_all) + prim.mem(a_all * 4 * 6 + rows_buf * 4 * 4, kernels=4)
    perm = prim.gather(2 * rows_buf * d * b)
    perm_b = prim.gather((a_all + t_all) * d * b) + prim.mem(a_all * d * b)
    unperm = prim.gather(a_all * d * b + t_all * d * b) + prim.mem(a_all * d * 4)
    unperm_b = prim.gather(2 * rows_buf * d * b + 2 * a_all * d * b) + prim.mem(a_all * d * 4)
    ops = [g.op("plan", "compute", plan, 0.0),
           g.op("permute", "compute", perm + unperm, perm_b + unperm_b)]
    v = rows_buf * d * b
    comm = g.a2a(v / n)
    reorder = prim.mem(2 * v / n) if (g.ep > 1 and g.local_experts > 1) else 0.0
    c_f, c_b = g.experts(rows_buf / n)
    exchange = _Exchange(comm, comm, c_f + 2 * reorder, c_b + 2 * reorder, n, rows_buf, v / n,
                         capacity_drop_fraction(g.load_E, a_all, cap))
    return ops, exchange, {"capacity": cap, "buffer_rows": rows_buf}


def _dense_emulation(g: _MoELayer, vb: float, n_rows: float,
                     out_rows: float) -> tuple[float, float]:
    """(forward, backward) of the dense ragged all-to-all emulation on an
    operand of `n_rows` rows and a `vb`-byte send buffer. Forward: copy the
    operand (+1 zero row), gather vb, scatter vb into a zeroed output;
    backward: gather vb (cotangent at the destinations), scatter zeros into
    it, scatter-add vb back."""
    prim, d, b = g.prim, g.moe.d_model, g.b
    fwd = (prim.mem(2 * n_rows * d * b) + prim.gather(2 * vb)
           + prim.scatter(2 * vb + out_rows * d * b))
    bwd = (prim.gather(2 * vb) + prim.scatter(vb + out_rows * d * b)
           + prim.scatter(2 * vb + n_rows * d * b) + prim.mem(2 * n_rows * d * b))
    return fwd, bwd


def _bucket(g: _MoELayer, buf: float, slot: float, rerun: bool, native: bool, hot: float,
            xla_loop: bool) -> tuple:
    """(comm_in, comm_out, c_f, c_b, rows_dev, v_in) of an exchange into a
    `buf`-row receive buffer with per-pair slots of `slot` rows; `rerun`: a
    bucket runs its forward (exchanges included) again in the backward."""
    prim, d, b, a_c = g.prim, g.moe.d_model, g.b, g.a_c
    el, align = g.local_experts, g.moe.group_align
    rows_dev = min(buf, a_c * hot)  # real rows on the hottest device
    # Receive side: group the `buf` rows by local expert (padded to
    # group_align): a sort, then permute / un-permute over all of them.
    rrows = buf + (el + 1) * (align - 1)
    regroup = prim.sort(buf) + prim.mem(buf * 4 * 8, kernels=4)
    regroup_mv = prim.gather(2 * rrows * d * b) + prim.gather(2 * (rrows + buf) * d * b)
    if native:
        # Actual rows: the hottest device receives (and sends back) most.
        v_in = v_out = max(a_c, a_c * hot) * d * b
        move = move_b = 0.0
    else:
        # Every peer's slice travels in a slot of `slot` rows, both ways.
        v_in = v_out = g.ep * slot * d * b
        f1, b1 = _dense_emulation(g, v_in, a_c, buf)
        f2, b2 = _dense_emulation(g, v_out, buf, a_c)
        move, move_b = f1 + f2, b1 + b2
    cin, cout = g.a2a(v_in), g.a2a(v_out)
    cf, cb = g.experts(rows_dev + el * (align - 1) / 2, buffer_rows=rrows, xla_loop=xla_loop)
    cf += regroup + regroup_mv + move
    cb += regroup_mv + move_b
    if rerun:
        cb += cf + cin + cout
    return cin, cout, cf, cb, rows_dev, v_in


def _dropless_regions(g: _MoELayer) -> tuple[list, Optional[_Exchange], dict]:
    """Local sort by (global) expert, then (ep > 1) the exchange in the
    smallest bucket that holds the busiest (source, destination) pair of
    the mesh, else in the fallback buffer: the cost is the expectation over
    that choice, and only the fallback can drop."""
    m, prim, d, b, ep, n = g.moe, g.prim, g.moe.d_model, g.b, g.ep, g.core_chunks
    a_c, t_c, el = g.a_c, g.t_c, g.local_experts
    plan = prim.sort(a_c) + prim.mem(a_c * 4 * 8, kernels=4)
    perm = prim.gather(2 * a_c * d * b)
    perm_b = prim.gather((a_c + t_c) * d * b) + prim.mem(a_c * d * b)
    unperm = prim.gather((a_c + t_c) * d * b) + prim.mem(a_c * d * 4)
    unperm_b = prim.gather(4 * a_c * d * b) + prim.mem(a_c * d * 4)
    ops = [g.op("plan", "compute", n * plan, 0.0),
           g.op("permute", "compute", n * (perm + unperm), n * (perm_b + unperm_b))]
    # The grouped matmul: Pallas kernels on GPU unless asked otherwise.
    # The XLA grouped matmul runs as a loop over groups (jmoe.kernels.xla_gmm).
    xla_loop = resolve_gmm_backend(m.execution.gmm_backend, g.backend) == "xla"
    if ep == 1:
        # One device: the layer's own plan pads groups to group_align.
        rows_dev = a_c + m.num_experts * (m.group_align - 1) / 2
        c_f, c_b = g.experts(rows_dev, buffer_rows=a_c + m.num_experts * (m.group_align - 1),
                             xla_loop=xla_loop)
        ops.append(g.op("experts", "compute", n * c_f, n * c_b))
        return ops, None, {"rows_per_device": rows_dev * n}
    hot = max(device_loads(g.load_E, ep)) * ep  # hottest device's rows relative to the mean
    native = m.execution.ragged(g.backend) == "native"
    recv = m.recv_buffer_rows(int(a_c), ep)
    slots = [] if native else m.ep_bucket_slots(int(a_c), ep)
    # Counts and offsets: three small all-to-alls, two more per dense
    # call, and the scalar all-reduce that picks the bucket.
    small = g.a2a(ep * 4 * max(1, el))
    picks = small if slots else 0.0
    ops.append(g.op("a2a_counts", "comm", n * (small * (3 if native else 5) + picks), 0.0))
    probs = bucket_probabilities(g.load_E, ep, a_c, slots)
    costs = [_bucket(g, ep * s, s, True, native, hot, xla_loop) for s in slots]
    costs.append(_bucket(g, recv, min(a_c, recv), False, native, hot, xla_loop))
    comm_in, comm_out, c_f, c_b, rows_dev, v_in = (
        sum(p * c[i] for p, c in zip(probs, costs)) for i in range(6))
    buf = sum(p * r for p, r in zip(probs, [ep * s for s in slots] + [recv]))
    drop = probs[-1] * recv_drop_fraction(g.load_E, ep, int(a_c), int(recv))
    # Every branch of the bucket switch keeps its own buffers in the
    # compiled step: memory holds them all.
    detail = dict(recv_rows=recv + ep * sum(slots), exchange_buffer_rows=buf,
                  bucket_probabilities=probs, rows_per_device=rows_dev * n,
                  ragged="native" if native else "dense-emulation")
    return ops, _Exchange(comm_in, comm_out, c_f, c_b, n, rows_dev, v_in, drop), detail


def _pipelined(g: _MoELayer, x: _Exchange) -> tuple[list, float, dict]:
    """The exchange as a pipeline: forward (dispatch, experts, combine), the
    backward mirror image (2x compute), and the recomputed forward (remat).
    Returns its ops, the seconds the schedule hides, and its detail."""
    n, ovl = x.chunks, g.hw.async_collectives
    c_in, c_out, c_f, c_b = x.comm_in, x.comm_out, x.compute_fwd, x.compute_bwd
    fwd_t = pipeline_time([c_in] * n, [c_f] * n, [c_out] * n, ovl)
    bwd_t = pipeline_time([c_out] * n, [c_b] * n, [c_in] * n, ovl)
    r = 1.0 if g.remat in ("full", "dots") else 0.0
    ops = [OpCost("a2a_dispatch", "comm", n * c_in, n * c_in, r * n * c_in),
           OpCost("a2a_combine", "comm", n * c_out, n * c_out, r * n * c_out),
           OpCost("experts", "compute", n * c_f, n * c_b, r * n * c_f)]
    serial = (2 + r) * n * (c_in + c_out) + n * (c_f + c_b + r * c_f)
    exch = fwd_t + bwd_t + r * fwd_t
    detail = dict(exchange_serial=serial, exchange_time=exch, exchange_rows=x.rows)
    return ops, serial - exch, detail


def _shared_and_residual_ops(g: _MoELayer) -> list:
    """Shared experts (a dense FFN beside the routed ones), then the norm and
    residual around the FFN."""
    m, ops = g.moe, []
    if m.num_shared_experts:
        ops.extend(dense_ffn_cost(m.d_model, m.shared_hidden, m.activation, g.tokens, g.prim,
                                  g.remat, name="shared_experts").ops)
    el = g.prim.mem(g.tokens * m.d_model * g.b * 4, kernels=2)
    ops.append(g.op("ffn_elementwise", "compute", el, 2 * el))
    return ops


def moe_layer_cost(moe: MoEConfig, tokens: int, ep: int, hw: Hardware, *,
                   load_E: Optional[Sequence[float]] = None, remat: str = "none",
                   dtype: Optional[str] = None, backend: str = "gpu") -> LayerCost:
    """One MoE layer (router, dispatch, experts, combine, shared experts).

    tokens: tokens on this device per micro-batch (T_local). ep: expert-
    parallel size (the mesh's `expert` axis). backend: "gpu" or "cpu" (as
    `jax.default_backend()` names it), which decides the dropless exchange
    exactly as the runtime does (`Execution.ragged`).
    """
    e = moe.num_experts
    chunks = max(1, moe.execution.overlap_chunks)
    g = _MoELayer(
        moe=moe, hw=hw, prim=Prim(hw, dtype or moe.dtype), ep=ep, tokens=tokens,
        load_E=tuple(float(v) for v in load_E) if load_E is not None else tuple([1.0 / e] * e),
        remat=remat, backend=backend, chunks=chunks,
        core_chunks=chunks if moe.dispatch == "dropless" and ep > 1 else 1)
    ops = _router_ops(g)
    # The packed capacity layout moves and computes the kept rows only: the
    # dropless exchange's cost, plus what its capacity drops.
    packed = moe.dispatch == "capacity" and moe.packed_capacity and ep > 1
    regions = _capacity_regions if moe.dispatch == "capacity" and not packed else _dropless_regions
    region_ops, exchange, detail = regions(g)
    ops += region_ops
    drop, saved = 0.0, 0.0
    if exchange is not None:
        drop = exchange.drop
        if packed:
            cap = moe.capacity(tokens)
            drop = 1.0 - (1.0 - drop) * (1.0 - capacity_drop_fraction(
                g.load_E, tokens * moe.top_k, cap))
            detail["capacity"] = cap
        detail.update(drop_fraction=drop, a2a_bytes=exchange.a2a_bytes)
        exchange_ops, saved, exchange_detail = _pipelined(g, exchange)
        ops += exchange_ops
        detail.update(exchange_detail)
    ops += _shared_and_residual_ops(g)
    detail["drop_fraction"] = drop
    return LayerCost("moe", tuple(ops), sum(o.total for o in ops) - saved, drop, detail)


# ------------------------------------------------------------- placement --

@dataclasses.dataclass(frozen=True)
class PlacementPrice:
    """What a placement of one MoE layer gains and costs (seconds)."""

    step_gain: float  # per training step: the busiest device's excess expert compute saved
    replica_sync: float  # per training step: the all-reduce of replicated experts' gradients
    move: float  # once: moving expert weights and optimizer moments to new slots

    def net_gain(self, steps: int) -> float:
        """Saved over `steps` steps, minus the move and the replicas' gradient sums."""
        return steps * (self.step_gain - self.replica_sync) - self.move


def placement_price(moe: MoEConfig, tokens: int, ep: int, hw: Hardware, *,
                    busiest_before: float, busiest_after: float, redundant: int,
                    moved_slots: int, state_copies: int = 3,
                    param_dtype: str = "float32", dtype: Optional[str] = None) -> PlacementPrice:
    """Prices re-placing one layer's experts (`jmoe.balance`, issue 14).

    tokens: tokens per device per step (T_local). busiest_before/after:
    busiest device / mean under the current and the new placement (the
    step waits for the busiest device's expert compute). redundant: R, the
    slots beyond one per expert (replicas' gradients are summed every step
    by an all-reduce of R+1 expert matrices, `jmoe.layer.tie_replicas`).
    moved_slots: slots of the new placement whose expert changes (0 = no
    move). state_copies: arrays per expert weight that move (the weight
    and Adam's two moments). The move is priced as the trainer runs it: an
    all-gather of the layer's expert state (`jmoe.train.rebalance`).
    """
    prim = Prim(hw, dtype or moe.dtype)
    el = max(1, moe.num_experts // max(ep, 1))
    mats = moe.expert_matrices
    fwd, bwd = expert_compute(tokens * moe.top_k, el, moe.d_model, moe.d_ff, mats, prim)
    gain = max(0.0, busiest_before - busiest_after) * (fwd + bwd)
    spans = ep > hw.devices_per_node
    matrix = mats * moe.d_model * moe.d_ff * dtype_bytes(param_dtype)
    sync = ring_allreduce((redundant + 1) * matrix, ep, spans, hw) if redundant else 0.0
    num_slots = moe.num_experts + redundant
    move = (ring_gather(state_copies * num_slots * matrix, ep, spans, hw)
            if moved_slots else 0.0)
    return PlacementPrice(gain, sync, move)


def shadowed_device_loads(load_E: Sequence[float], ep: int, shadows: int) -> list:
    """Each device's share of the rows when the `shadows` most loaded experts
    are computed where their tokens are (spread evenly, `jmoe.sharding.shadow`)
    and the rest stay with their owners (static layout)."""
    hot = set(sorted(range(len(load_E)), key=lambda e: (-load_E[e], e))[:shadows])
    el = len(load_E) // ep
    spread = sum(load_E[e] for e in hot) / ep
    return [spread + sum(load_E[e] for e in range(p * el, (p + 1) * el) if e not in hot)
            for p in range(ep)]


def shadow_price(moe: MoEConfig, tokens: int, ep: int, hw: Hardware, *, busiest_before: float,
                 busiest_after: float, shadows: int, dtype: Optional[str] = None,
                 param_dtype: str = "float32") -> PlacementPrice:
    """Prices shadowing `shadows` experts in one layer for one step: the
    busiest device's expert compute saved, against the all-reduce that
    gathers their weights (forward) and the one that sums their gradients
    (backward). Nothing moves between steps (`move` = 0)."""
    prim = Prim(hw, dtype or moe.dtype)
    el = max(1, moe.num_experts // max(ep, 1))
    mats = moe.expert_matrices
    fwd, bwd = expert_compute(tokens * moe.top_k, el, moe.d_model, moe.d_ff, mats, prim)
    gain = max(0.0, busiest_before - busiest_after) * (fwd + bwd)
    matrix = mats * moe.d_model * moe.d_ff * dtype_bytes(param_dtype)
    spans = ep > hw.devices_per_node
    sync = 2 * ring_allreduce(shadows * matrix, ep, spans, hw) if shadows else 0.0
    return PlacementPrice(gain, sync, 0.0)
