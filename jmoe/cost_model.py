"""An analytic time model of a GPT-MoE training step, and the planner on top.

Per layer and per device, every region of the forward and backward pass is
priced with a roofline on the hardware profile (`jmoe.hardware`):

  matmuls    max(FLOPs / (peak x efficiency), bytes / memory bandwidth)
  memory ops bytes moved / (memory bandwidth x efficiency)   (norms, gathers)
  all-to-all fixed cost + per-peer cost + bytes / link bandwidth, on the
             slower of the intra-node and inter-node links (flat), or both
             levels one after the other (two-level, Tutel's 2DH)

The MoE layer's exchange -- dispatch all-to-all, experts, combine all-to-all
-- runs as a pipeline of `overlap_chunks` chunks: chunk i+1's all-to-all
overlaps chunk i's experts where the hardware runs collectives
asynchronously (GPUs; not XLA:CPU). Chunks pay their own fixed costs, so
more chunks are not free: the planner weighs both.

Token imbalance enters as a load distribution over experts (`load_E`,
fractions of the T*K assignments): the capacity path keeps its static
shapes and drops what overflows (the expected drop rate is reported); the
dropless path runs as slowly as its most loaded device.

What the model leaves out is listed in `ASSUMPTIONS` (printed by the CLI).
Shapes follow `jmoe/__init__.py`; all times are seconds, sizes bytes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Optional, Sequence

from jmoe.config import MoEConfig
from jmoe.hardware import Hardware

ASSUMPTIONS = (
    "Times are per device; devices run in lockstep, so a step lasts as long as its "
    "slowest device (the most loaded one under imbalance).",
    "Matmuls, attention and grouped matmuls reach a fixed share of the datasheet "
    "peak (profile fields mm_eff, attn_eff, gmm_eff; assumed on GPUs, measured on "
    "cpu-local); backward = 2x forward FLOPs; remat='full' recomputes the forward "
    "(all-to-alls included), remat='dots' recomputes everything but plain matmuls.",
    "The expert axis is the fastest-varying mesh axis, so an expert-parallel group "
    "of <= devices_per_node devices stays inside one node.",
    "An all-to-all costs a fixed time, a per-peer time and bytes / bandwidth on "
    "each link; a flat one drives NVLink and InfiniBand at once (the slower "
    "decides), a two-level one runs the intra-node step, two local copies and "
    "the inter-node step in sequence (same inter-node bytes, fewer, larger "
    "messages).",
    "Overlap: only the MoE exchange is pipelined (chunk i+1's all-to-all with "
    "chunk i's experts), and only where collectives are asynchronous (GPU). "
    "Gradient all-reduces overlap the backward pass of the last micro-batch.",
    "The dropless path uses lax.ragged_all_to_all (actual rows) on GPU without a "
    "hierarchy, and the padded dense emulation (ep slots of the chosen bucket) on CPU or with "
    "a2a_hierarchy > 1, exactly as jmoe.sharding.expert_parallel does; the "
    "exchange runs in the smallest ep_buckets slot that holds the busiest "
    "(source, destination) pair, else in the fallback receive buffer of ep_recv_factor x "
    "(or ep x) the local assignments; the cost is the expectation over that choice, "
    "with binomial pair counts (normal approximation).",
    "Capacity drops are estimated per shard and expert with a normal "
    "approximation of the binomial token counts around the load distribution.",
    "Memory: parameters, gradients and both Adam moments in param_dtype, plus a "
    "rough activation estimate; not modelled: fragmentation, XLA temporaries, "
    "data loading, host overheads, stragglers, network congestion from other jobs.",
)


def dtype_bytes(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1}[dtype]


# ------------------------------------------------------------- primitives --

@dataclasses.dataclass(frozen=True)
class Prim:
    """Roofline prices of primitive operations on one device."""

    hw: Hardware
    dtype: str = "bfloat16"

    def matmul(self, flops: float, nbytes: float, eff: Optional[float] = None) -> float:
        e = self.hw.mm_eff if eff is None else eff
        return (max(flops / (self.hw.flops(self.dtype) * e),
                    nbytes / (self.hw.mem_bw * self.hw.mem_eff))
                + self.hw.kernel_overhead)

    def mem(self, nbytes: float, kernels: int = 1) -> float:
        return nbytes / (self.hw.mem_bw * self.hw.mem_eff) + kernels * self.hw.kernel_overhead

    def gather(self, nbytes: float, kernels: int = 1) -> float:
        return nbytes / (self.hw.mem_bw * self.hw.gather_eff) + kernels * self.hw.kernel_overhead

    def scatter(self, nbytes: float, kernels: int = 1) -> float:
        return nbytes / (self.hw.mem_bw * self.hw.scatter_eff) + kernels * self.hw.kernel_overhead

    def sort(self, n: int) -> float:
        """Sorting n int32 keys: ~log2(n) passes over 8-byte (key, index) pairs."""
        return self.mem(2 * 8 * n * max(1.0, math.log2(max(n, 2))), kernels=3)


def ep_layout(ep: int, devices_per_node: int) -> tuple[int, int]:
    """(devices per node, nodes) spanned by one expert-parallel group whose
    devices are consecutive in the node-major device order."""
    g = math.gcd(ep, devices_per_node) if ep > devices_per_node else ep
    return g, ep // g


def _flat_a2a(nbytes: float, size: int, per_node: int, hw: Hardware) -> dict:
    """One all-to-all over `size` devices, `per_node` of them sharing a node;
    `nbytes` is each device's whole buffer (its own chunk included)."""
    if size <= 1:
        return {"time": 0.0, "intra": 0.0, "inter": 0.0}
    chunk = nbytes / size
    intra = (per_node - 1) * (hw.intra_peer + chunk / (hw.intra_bw * hw.comm_eff))
    inter = (size - per_node) * (hw.inter_peer + chunk / (hw.inter_bw * hw.comm_eff))
    alpha = hw.inter_alpha if size > per_node else hw.intra_alpha
    return {"time": alpha + max(intra, inter), "intra": intra, "inter": inter}


def all_to_all_time(nbytes: float, ep: int, hw: Hardware, hierarchy: int = 0) -> dict:
    """Seconds for one tiled all-to-all of `nbytes` per device over `ep` devices.

    `hierarchy = h` (1 < h < ep, h | ep): Tutel's two-level form as written
    in `jmoe.sharding.expert_parallel.all_to_all` -- within groups of h
    consecutive devices, a local reorder, then across groups, and a reorder
    back. Returns {"time", "intra", "inter"} (the link terms of the levels).
    """
    g, _ = ep_layout(ep, hw.devices_per_node)
    if hierarchy <= 1 or hierarchy >= ep or ep % hierarchy:
        return _flat_a2a(nbytes, ep, g, hw)
    h = hierarchy
    lvl1 = _flat_a2a(nbytes, h, min(h, g), hw)
    lvl2 = _flat_a2a(nbytes, ep // h, max(1, g // h), hw)
    copies = 2 * 2 * nbytes / (hw.mem_bw * hw.mem_eff) + 2 * hw.kernel_overhead
    return {"time": lvl1["time"] + copies + lvl2["time"],
            "intra": lvl1["intra"] + lvl2["intra"], "inter": lvl1["inter"] + lvl2["inter"]}


def pipeline_time(comm_in: Sequence[float], compute: Sequence[float],
                  comm_out: Sequence[float], overlap: bool) -> float:
    """Makespan of chunks i = 0..n-1: comm_in[i] -> compute[i] -> comm_out[i].

    Communication and compute are two resources; with `overlap`, each starts
    an operation as soon as its inputs are ready (every inbound chunk is
    issued first, the outbound ones as their chunk's compute ends). Neither
    resource idles while the other waits, so this never exceeds the serial
    sum, and one chunk is exactly the serial sum.
    """
    n = len(compute)
    if not overlap or n == 1:
        return sum(comm_in) + sum(compute) + sum(comm_out)
    t_comm, t_comp = 0.0, 0.0
    in_done = []
    for a in comm_in:
        t_comm += a
        in_done.append(t_comm)
    comp_done = []
    for i, c in enumerate(compute):
        t_comp = max(t_comp, in_done[i]) + c
        comp_done.append(t_comp)
    for i, b in enumerate(comm_out):
        t_comm = max(t_comm, comp_done[i]) + b
    return max(t_comm, t_comp)


# ------------------------------------------------------------ load / drops --

def load_distribution(spec, num_experts: int) -> tuple[float, ...]:
    """Fractions of the assignments per expert, summing to 1.

    `spec`: None / "uniform"; "zipf:S" (p_e ~ 1/(e+1)^S, the hottest experts
    on the first device); "hot:R" (expert 0 gets R x the mean, the rest share
    the remainder); a comma list or sequence of E non-negative weights (e.g.
    the `expert_load` the trainer logs to metrics.jsonl).
    """
    e = num_experts
    if spec is None or (isinstance(spec, str) and spec.strip() in ("", "uniform")):
        w = [1.0] * e
    elif isinstance(spec, str) and spec.startswith("zipf:"):
        s = float(spec[5:])
        w = [1.0 / (i + 1) ** s for i in range(e)]
    elif isinstance(spec, str) and spec.startswith("hot:"):
        r = float(spec[4:])
        if not 1.0 <= r <= e:
            raise ValueError(f"load 'hot:{r}': the ratio must be in [1, num_experts={e}].")
        rest = (e - r) / (e - 1) if e > 1 else 0.0
        w = [r] + [rest] * (e - 1)
    else:
        w = [float(v) for v in (spec.split(",") if isinstance(spec, str) else spec)]
        if len(w) != e:
            raise ValueError(f"load has {len(w)} entries but num_experts={e}: give one "
                             "weight per expert (or 'uniform', 'zipf:S', 'hot:R').")
    if any(v < 0 for v in w) or sum(w) <= 0:
        raise ValueError(f"load {spec!r}: weights must be >= 0 with a positive sum.")
    tot = sum(w)
    return tuple(v / tot for v in w)


def _expected_excess(mean: float, var: float, cap: float) -> float:
    """E[max(0, X - cap)] for X ~ Normal(mean, var)."""
    if var <= 0:
        return max(0.0, mean - cap)
    sd = math.sqrt(var)
    z = (cap - mean) / sd
    pdf = math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    tail = 0.5 * math.erfc(z / math.sqrt(2))
    return max(0.0, sd * pdf + (mean - cap) * tail)


def capacity_drop_fraction(load_E: Sequence[float], assignments: int, capacity: int) -> float:
    """Expected share of a shard's `assignments` that find no slot."""
    lost = sum(_expected_excess(assignments * p, assignments * p * (1 - p), capacity)
               for p in load_E)
    return min(1.0, lost / max(assignments, 1))


def device_loads(load_E: Sequence[float], ep: int) -> list:
    """Share of the assignments that lands on each expert-parallel device."""
    el = len(load_E) // ep
    return [sum(load_E[j * el:(j + 1) * el]) for j in range(ep)]


def recv_drop_fraction(load_E: Sequence[float], ep: int, assignments: int,
                       recv_rows: int) -> float:
    """Expected share dropped by a dropless receive buffer of `recv_rows`."""
    if recv_rows >= ep * assignments:
        return 0.0
    lost = 0.0
    for q in device_loads(load_E, ep):
        n = ep * assignments
        lost += _expected_excess(n * q, n * q * (1 - q), recv_rows)
    return min(1.0, lost / (ep * assignments))


def prob_pairs_fit(load_E: Sequence[float], ep: int, assignments: float, slot: int) -> float:
    """Probability that no (source shard, destination device) pair exceeds
    `slot` rows when each of ep sources sends `assignments` rows (binomial
    counts, normal approximation with continuity correction; sources
    independent)."""
    p = 1.0
    for q in device_loads(load_E, ep):
        mu, var = assignments * q, assignments * q * (1.0 - q)
        if var <= 0:
            p *= 1.0 if mu <= slot else 0.0
            continue
        z = (slot + 0.5 - mu) / math.sqrt(var)
        p *= (0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))) ** ep
    return p


# ------------------------------------------------------------ layer costs --

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


def _remat_split(remat: str, fwd: float, is_plain_matmul: bool) -> float:
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
        OpCost("attn_proj", "compute", proj, 2 * proj, _remat_split(remat, proj, True)),
        OpCost("attn_core", "compute", core, core_b, _remat_split(remat, core, False)),
        OpCost("attn_elementwise", "compute", elem, 2 * elem, _remat_split(remat, elem, False)),
    )
    return LayerCost("attention", ops, sum(o.total for o in ops))


def dense_ffn_cost(d_model: int, hidden: int, activation: str, tokens: int, prim: Prim,
                   remat: str = "none", name: str = "dense_ffn") -> LayerCost:
    mats = 3 if activation == "swiglu" else 2
    b = dtype_bytes(prim.dtype)
    t, d, f = tokens, d_model, hidden
    mm = prim.matmul(2 * t * d * f * mats, (mats * d * f + t * (2 * d + mats * f)) * b)
    act = prim.mem(t * f * b * (mats + 1) + t * d * b * 4, kernels=2)  # act + norm/residual
    ops = (OpCost(f"{name}_matmul", "compute", mm, 2 * mm, _remat_split(remat, mm, True)),
           OpCost(f"{name}_elementwise", "compute", act, 2 * act,
                  _remat_split(remat, act, False)))
    return LayerCost(name, ops, sum(o.total for o in ops))


def _expert_compute(rows: float, el: int, d: int, f: int, mats: int, prim: Prim,
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


def moe_layer_cost(moe: MoEConfig, tokens: int, ep: int, hw: Hardware, *,
                   load_E: Optional[Sequence[float]] = None, remat: str = "none",
                   dtype: Optional[str] = None, backend: str = "gpu") -> LayerCost:
    """One MoE layer (router, dispatch, experts, combine, shared experts).

    tokens: tokens on this device per micro-batch (T_local). ep: expert-
    parallel size (the mesh's `expert` axis). backend: "gpu" (native ragged
    all-to-all available) or "cpu" (dense emulation), which decides the
    dropless exchange exactly as `ragged_impl="auto"` does.
    """
    dtype = dtype or moe.dtype
    prim = Prim(hw, dtype)
    b = dtype_bytes(dtype)
    d, f, e, k = moe.d_model, moe.d_ff, moe.num_experts, moe.top_k
    el = e // ep
    mats = 3 if moe.activation == "swiglu" else 2
    load = tuple(float(v) for v in load_E) if load_E is not None else tuple([1.0 / e] * e)
    n = max(1, moe.overlap_chunks)
    ops: list[OpCost] = []
    detail: dict = {}

    def add(name, kind, fwd, bwd, plain_matmul=False):
        ops.append(OpCost(name, kind, fwd, bwd, _remat_split(remat, fwd, plain_matmul)))

    def a2a(nbytes):
        return all_to_all_time(nbytes, ep, hw, moe.a2a_hierarchy)["time"]

    t_all, a_all = tokens, tokens * k
    # The dropless path chunks by token (the whole core per chunk); the
    # capacity path chunks only the exchange.
    n_core = n if moe.dispatch == "dropless" and ep > 1 else 1
    t_c = t_all / n_core
    a_c = t_c * k

    # Router: logits matmul, softmax/top-k, statistics (all fp32 [T, E]).
    r_mm = prim.matmul(2 * t_c * d * e, (t_c * d + d * e) * b + t_c * e * 4)
    r_el = prim.mem(t_c * e * 4 * 8, kernels=3)
    stats = hw.intra_alpha if ep > 1 else 0.0  # psum of router sums
    add("router", "compute", n_core * (r_mm + r_el), n_core * (2 * r_mm + r_el), False)
    if stats:
        add("router_stats_psum", "comm", stats, 0.0)

    if moe.dispatch == "capacity":
        cap = moe.capacity(tokens)
        rows_buf = e * cap  # [E, C, D] per device, before and after the exchange
        detail.update(capacity=cap, buffer_rows=rows_buf)
        plan = prim.sort(a_all) + prim.mem(a_all * 4 * 6 + rows_buf * 4 * 4, kernels=4)
        perm = prim.gather(2 * rows_buf * d * b)
        perm_b = prim.gather((a_all + t_all) * d * b) + prim.mem(a_all * d * b)
        unperm = prim.gather(a_all * d * b + t_all * d * b) + prim.mem(a_all * d * 4)
        unperm_b = prim.gather(2 * rows_buf * d * b + 2 * a_all * d * b) + prim.mem(
            a_all * d * 4)
        add("plan", "compute", plan, 0.0)
        add("permute", "compute", perm + unperm, perm_b + unperm_b)
        drop = capacity_drop_fraction(load, a_all, cap)
        # Exchange chunks cut the C slots; experts run on [E_local, ep*C/n, D].
        v = rows_buf * d * b
        comm_in = comm_out = a2a(v / n)
        reorder = prim.mem(2 * v / n) if (ep > 1 and el > 1) else 0.0
        c_f, c_b = _expert_compute(rows_buf / n, el, d, f, mats, prim)
        c_f, c_b = c_f + 2 * reorder, c_b + 2 * reorder
        exch_rows = rows_buf
    else:
        # Local sort by (global) expert, then the exchange.
        plan = prim.sort(a_c) + prim.mem(a_c * 4 * 8, kernels=4)
        perm = prim.gather(2 * a_c * d * b)
        perm_b = prim.gather((a_c + t_c) * d * b) + prim.mem(a_c * d * b)
        unperm = prim.gather((a_c + t_c) * d * b) + prim.mem(a_c * d * 4)
        unperm_b = prim.gather(4 * a_c * d * b) + prim.mem(a_c * d * 4)
        add("plan", "compute", n_core * plan, 0.0)
        add("permute", "compute", n_core * (perm + unperm), n_core * (perm_b + unperm_b))
        # The grouped matmul: Pallas kernels on GPU unless asked otherwise.
        xla_loop = moe.gmm_backend == "xla" or (moe.gmm_backend == "auto" and backend == "cpu")
        q = device_loads(load, ep)
        hot = max(q) * ep  # hottest device's rows relative to the mean
        if ep == 1:
            # One device: the layer's own plan pads groups to group_align.
            rows_dev = a_c + e * (moe.group_align - 1) / 2
            drop = 0.0
            c_f, c_b = _expert_compute(rows_dev, el, d, f, mats, prim,
                                       buffer_rows=a_c + e * (moe.group_align - 1),
                                       xla_loop=xla_loop)
            add("experts", "compute", n_core * c_f, n_core * c_b)
            detail.update(rows_per_device=rows_dev * n_core)
            return _finish_moe(moe, ops, prim, tokens, remat, detail, 0.0, add)
        native = (backend == "gpu" and moe.a2a_hierarchy <= 1
                  and moe.ragged_impl in ("auto", "native"))
        if moe.ragged_impl == "dense":
            native = False
        recv = moe.recv_buffer_rows(int(a_c), ep)
        slots = [] if native else moe.ep_bucket_slots(int(a_c), ep)
        # Counts and offsets: three small all-to-alls, two more per dense
        # call, and the scalar all-reduce that picks the bucket.
        small = all_to_all_time(ep * 4 * max(1, el), ep, hw, moe.a2a_hierarchy)["time"]
        picks = small if slots else 0.0
        add("a2a_counts", "comm", n_core * (small * (3 if native else 5) + picks), 0.0)

        def dense_call(vb, n_rows, out_rows):
            # The dense emulation on an operand of n rows and a v-byte send
            # buffer. Forward: copy the operand (+1 zero row), gather v,
            # scatter v into a zeroed output; backward: gather v (cotangent
            # at the destinations), scatter zeros into it, scatter-add v back.
            fwd = (prim.mem(2 * n_rows * d * b) + prim.gather(2 * vb)
                   + prim.scatter(2 * vb + out_rows * d * b))
            bwd = (prim.gather(2 * vb) + prim.scatter(vb + out_rows * d * b)
                   + prim.scatter(2 * vb + n_rows * d * b) + prim.mem(2 * n_rows * d * b))
            return fwd, bwd

        def branch(buf, slot, remat):
            """(comm_in, comm_out, c_f, c_b, rows_dev) of an exchange into a
            `buf`-row receive buffer with per-pair slots of `slot` rows."""
            rows_dev = min(buf, a_c * hot)  # real rows on the hottest device
            # Receive side: group the `buf` rows by local expert (padded to
            # group_align): a sort, then permute / un-permute over all of them.
            rrows = buf + (el + 1) * (moe.group_align - 1)
            regroup = prim.sort(buf) + prim.mem(buf * 4 * 8, kernels=4)
            regroup_mv = (prim.gather(2 * rrows * d * b)
                          + prim.gather(2 * (rrows + buf) * d * b))
            if native:
                # Actual rows: the hottest device receives (and sends back) most.
                v_in = v_out = max(a_c, a_c * hot) * d * b
                move = move_b = 0.0
            else:
                # Every peer's slice travels in a slot of `slot` rows, both ways.
                v_in = v_out = ep * slot * d * b
                f1, b1 = dense_call(v_in, a_c, buf)
                f2, b2 = dense_call(v_out, buf, a_c)
                move, move_b = f1 + f2, b1 + b2
            cin, cout = a2a(v_in), a2a(v_out)
            cf, cb = _expert_compute(rows_dev + el * (moe.group_align - 1) / 2, el, d, f,
                                     mats, prim, buffer_rows=rrows, xla_loop=xla_loop)
            cf += regroup + regroup_mv + move
            cb += regroup_mv + move_b
            if remat:  # a bucket runs its forward (exchanges included) again in backward
                cb += cf + cin + cout
            return cin, cout, cf, cb, rows_dev, v_in

        # Each step runs the smallest bucket that holds the busiest (source,
        # destination) pair of the mesh, else the fallback buffer: the cost is
        # the expectation over that choice, and only the fallback can drop.
        fits = [prob_pairs_fit(load, ep, a_c, s_) for s_ in slots]
        probs, taken = [], 0.0
        for p_fit in fits:
            probs.append(max(0.0, p_fit - taken))
            taken = max(taken, p_fit)
        probs.append(1.0 - taken)
        costs = [branch(ep * s_, s_, True) for s_ in slots]
        costs.append(branch(recv, min(a_c, recv), False))
        comm_in, comm_out, c_f, c_b, rows_dev, v_in = (
            sum(p_ * c[i] for p_, c in zip(probs, costs)) for i in range(6))
        buf = sum(p_ * r for p_, r in zip(probs, [ep * s_ for s_ in slots] + [recv]))
        drop = probs[-1] * recv_drop_fraction(load, ep, int(a_c), int(recv))
        exch_rows = rows_dev
        # Every branch of the bucket switch keeps its own buffers in the
        # compiled step: memory holds them all.
        held = recv + ep * sum(slots)
        detail.update(recv_rows=held, exchange_buffer_rows=buf, bucket_probabilities=probs,
                      rows_per_device=rows_dev * n_core,
                      ragged="native" if native else "dense-emulation")
        n = n_core
        v = v_in
    detail["drop_fraction"] = drop
    detail["a2a_bytes"] = (v / n if moe.dispatch == "capacity" else v)
    # The exchange as a pipeline: forward (dispatch, experts, combine), the
    # backward mirror image (2x compute), and the recomputed forward (remat).
    ovl = hw.async_collectives
    fwd_t = pipeline_time([comm_in] * n, [c_f] * n, [comm_out] * n, ovl)
    bwd_t = pipeline_time([comm_out] * n, [c_b] * n, [comm_in] * n, ovl)
    rec = remat in ("full", "dots")
    r = 1.0 if rec else 0.0
    ops.append(OpCost("a2a_dispatch", "comm", n * comm_in, n * comm_in, r * n * comm_in))
    ops.append(OpCost("a2a_combine", "comm", n * comm_out, n * comm_out, r * n * comm_out))
    ops.append(OpCost("experts", "compute", n * c_f, n * c_b, r * n * c_f))
    serial_exch = (2 + r) * n * (comm_in + comm_out) + n * (c_f + c_b + r * c_f)
    exch = fwd_t + bwd_t + r * fwd_t
    detail.update(exchange_serial=serial_exch, exchange_time=exch, exchange_rows=exch_rows)
    return _finish_moe(moe, ops, prim, tokens, remat, detail, drop, add,
                       saved=serial_exch - exch)


def _finish_moe(moe, ops, prim, tokens, remat, detail, drop, add, saved=0.0):
    if moe.num_shared_experts:
        sh = dense_ffn_cost(moe.d_model, moe.shared_hidden, moe.activation, tokens, prim,
                            remat, name="shared_experts")
        ops.extend(sh.ops)
    # Norm + residual around the FFN.
    b = dtype_bytes(prim.dtype)
    el = prim.mem(tokens * moe.d_model * b * 4, kernels=2)
    add("ffn_elementwise", "compute", el, 2 * el)
    total = sum(o.total for o in ops) - saved
    detail["drop_fraction"] = drop
    return LayerCost("moe", tuple(ops), total, drop, detail)


# --------------------------------------------------------------- the step --

@dataclasses.dataclass(frozen=True)
class Setting:
    """One candidate plan: the knobs the planner turns."""

    ep: int
    dispatch: str
    capacity_factor: float
    overlap_chunks: int
    a2a_hierarchy: int
    ep_recv_factor: float = 0.0
    grad_accum_steps: int = 1
    fsdp: bool = False  # config.mesh.fsdp: weights and Adam moments sharded over `data`


@dataclasses.dataclass
class StepCost:
    setting: Setting
    layers: dict  # name -> (LayerCost, count per micro-batch)
    micro_batches: int
    grad_sync: float
    grad_sync_exposed: float
    optimizer: float
    launch: float
    memory: dict
    drop_fraction: float

    def _sum(self, attr: str) -> float:
        return sum(getattr(lc, attr) * c for lc, c in self.layers.values())

    @property
    def compute(self) -> float:
        return self.micro_batches * self._sum("compute") + self.optimizer

    @property
    def comm(self) -> float:
        return self.micro_batches * self._sum("comm") + self.grad_sync

    @property
    def overlapped_comm(self) -> float:
        return (self.micro_batches * self._sum("hidden")
                + (self.grad_sync - self.grad_sync_exposed))

    @property
    def exposed_comm(self) -> float:
        return self.comm - self.overlapped_comm

    @property
    def a2a(self) -> float:
        return self.micro_batches * self._sum("a2a")

    @property
    def a2a_exposed(self) -> float:
        """All-to-all time not hidden under compute (hidden time is all-to-all)."""
        return self.a2a - self.micro_batches * self._sum("hidden")

    @property
    def time(self) -> float:
        return self.compute + self.exposed_comm + self.launch


def _param_split(gpt) -> tuple[float, float]:
    """(non-expert, routed-expert) parameter counts of the model."""
    from jmoe.model import param_count_formula

    total = param_count_formula(gpt)["total"]
    experts = 0
    if gpt.moe is not None:
        mats = 3 if gpt.moe.activation == "swiglu" else 2
        experts = (len(gpt.moe_layers) * gpt.moe.num_experts * mats * gpt.d_model
                   * gpt.moe.d_ff)
    return float(total - experts), float(experts)


def _ring_allreduce(nbytes: float, group: int, spans_nodes: bool, hw: Hardware) -> float:
    """A ring all-reduce of `nbytes` per device: a reduce-scatter and an all-gather."""
    return 2 * _ring_gather(nbytes, group, spans_nodes, hw)


def _ring_gather(nbytes: float, group: int, spans_nodes: bool, hw: Hardware) -> float:
    """A ring all-gather (or reduce-scatter) whose full result is `nbytes`."""
    if group <= 1 or nbytes <= 0:
        return 0.0
    bw = (hw.inter_bw if spans_nodes else hw.intra_bw) * hw.comm_eff
    alpha = hw.inter_alpha if spans_nodes else hw.intra_alpha
    return alpha * math.log2(group) + (group - 1) / group * nbytes / bw


def activation_bytes(gpt, tokens: int, moe_rows: float, recv_rows: float) -> float:
    """Rough bytes of activations kept for the backward of one micro-batch."""
    b = dtype_bytes(gpt.dtype)
    d, h, j, k = gpt.d_model, gpt.num_heads, gpt.kv_heads, gpt.head_size
    attn = tokens * b * (3 * d + 2 * h * k + 2 * j * k)
    if gpt.moe is not None and not gpt.dense:
        m = gpt.moe
        mats = 3 if m.activation == "swiglu" else 2
        ffn_moe = (tokens * b * 3 * d + moe_rows * b * (2 * d + (mats + 1) * m.d_ff)
                   + tokens * m.num_experts * 4 * 3)
    else:
        ffn_moe = 0.0
    ffn_dense = tokens * b * (3 * d + 3 * gpt.dense_hidden) if (
        gpt.dense or len(gpt.moe_layers) < gpt.num_layers) else 0.0
    per_layer = [attn + (ffn_moe if gpt.is_moe_layer(i) else ffn_dense)
                 for i in range(gpt.num_layers)]
    logits = tokens * gpt.vocab_size * 4 * 2  # fp32 logits and their gradient
    work = recv_rows * d * b * 3
    if gpt.remat == "full":
        return gpt.num_layers * tokens * d * b + max(per_layer) + logits + work
    if gpt.remat == "dots":
        saved = tokens * b * (2 * h * k + 2 * j * k + d)
        return gpt.num_layers * saved + max(per_layer) + logits + work
    return sum(per_layer) + logits + work


def step_cost(gpt, setting: Setting, *, seq_len: int, batch_size: int, devices: int,
              hw: Hardware, load=None, backend: str = "gpu") -> StepCost:
    """The predicted training step of `gpt` (a `jmoe.model.GPTConfig`)."""
    accum = setting.grad_accum_steps
    tokens = batch_size * seq_len // accum // devices  # per device per micro-batch
    prim = Prim(hw, gpt.dtype)
    layers = {}
    n_moe = len(gpt.moe_layers)
    n_dense = gpt.num_layers - n_moe
    layers["attention"] = (attention_cost(gpt.d_model, gpt.num_heads, gpt.kv_heads,
                                          gpt.head_size, tokens, seq_len, prim, gpt.remat),
                           gpt.num_layers)
    drop = 0.0
    moe_rows = recv_rows = 0.0
    if n_moe:
        m = gpt.moe.replace(dispatch=setting.dispatch, capacity_factor=setting.capacity_factor,
                            overlap_chunks=setting.overlap_chunks,
                            a2a_hierarchy=setting.a2a_hierarchy,
                            ep_recv_factor=setting.ep_recv_factor)
        load_E = load_distribution(load, m.num_experts)
        lc = moe_layer_cost(m, tokens, setting.ep, hw, load_E=load_E, remat=gpt.remat,
                            dtype=gpt.dtype, backend=backend)
        layers["moe"] = (lc, n_moe)
        drop = lc.drop_fraction
        moe_rows = lc.detail.get("exchange_rows", lc.detail.get("rows_per_device", 0.0))
        recv_rows = lc.detail.get("recv_rows", 0.0)
    if n_dense:
        layers["dense_ffn"] = (dense_ffn_cost(gpt.d_model, gpt.dense_hidden, gpt.activation,
                                              tokens, prim, gpt.remat), n_dense)
    # Embedding lookup, final norm, unembedding matmul, softmax cross-entropy.
    b = dtype_bytes(gpt.dtype)
    head = prim.matmul(2 * tokens * gpt.d_model * gpt.vocab_size,
                       (gpt.d_model * gpt.vocab_size + tokens * gpt.d_model) * b
                       + tokens * gpt.vocab_size * 4)
    xent = prim.mem(tokens * gpt.vocab_size * 4 * 4, kernels=3)
    emb = prim.gather(2 * tokens * gpt.d_model * b)
    layers["embed_head"] = (LayerCost("embed_head", (
        OpCost("head", "compute", head, 2 * head), OpCost("softmax_xent", "compute", xent, xent),
        OpCost("embed", "compute", emb, 2 * emb)), head * 3 + 2 * xent + 3 * emb), 1)
    # Gradient all-reduce (data parallel): non-expert weights over all devices,
    # expert shards over the data axis.
    non_exp, exp = _param_split(gpt)
    pb = dtype_bytes(gpt.param_dtype)
    g_node, _ = ep_layout(setting.ep, hw.devices_per_node)
    multi_node = devices > hw.devices_per_node
    dp = devices // setting.ep
    dp_nodes = multi_node and dp * g_node > hw.devices_per_node  # the data axis crosses nodes
    if not (setting.fsdp and dp > 1):
        sync = (_ring_allreduce(non_exp * pb, devices, multi_node, hw)
                + _ring_allreduce(exp / setting.ep * pb, dp, dp_nodes, hw))
        # Hidden under the backward pass of the last micro-batch.
        per_mb_bwd = sum(sum(o.bwd for o in lc.ops) * c for lc, c in layers.values())
        sync_exposed = max(0.0, sync - per_mb_bwd) if hw.async_collectives else sync
        params_dev = non_exp + exp / setting.ep
        gathered = 0.0
    else:
        # ZeRO-3 as config.mesh.fsdp does it: every micro-batch all-gathers
        # the weights over `data` in the forward and again in the backward,
        # and reduce-scatters the gradients; the non-expert shards are then
        # all-reduced over `expert`. Async collectives hide the gathers
        # under the micro-batch's compute, all but the first layer's.
        local = non_exp + exp / setting.ep  # one expert-parallel rank's weights
        gather = _ring_gather(local * pb, dp, dp_nodes, hw)
        sync = accum * (3 * gather + _ring_allreduce(non_exp / dp * pb, setting.ep,
                                                     multi_node and g_node < setting.ep, hw))
        per_mb = sum(lc.compute * c for lc, c in layers.values())
        first = gather / max(1, gpt.num_layers)
        sync_exposed = (max(accum * 2 * first, sync - accum * per_mb) if hw.async_collectives
                        else sync)
        params_dev = local / dp
        # One layer's weights gathered whole, and its gradient before the scatter.
        gathered = 2 * local / max(1, gpt.num_layers) * pb
    # AdamW: read param, grad, mu, nu; write param, mu, nu (param_dtype).
    opt = prim.mem(params_dev * pb * 7, kernels=8)
    state = params_dev * pb * (4 + (1 if accum > 1 else 0))
    act = activation_bytes(gpt, tokens, moe_rows, recv_rows) + gathered
    mem = {"state": state, "activations": act, "total": state + act,
           "capacity": hw.mem_bytes, "params_per_device": params_dev}
    return StepCost(setting, layers, accum, sync, sync_exposed, opt, hw.launch_overhead, mem,
                    drop)


# ------------------------------------------------------------- planning --

def _divisors(n: int) -> list:
    return [i for i in range(1, n + 1) if n % i == 0]


def candidate_settings(gpt, devices: int, hw: Hardware, batch_size: int, seq_len: int,
                       chunks: Iterable[int] = (1, 2, 4, 8),
                       capacity_factors: Iterable[float] = (1.0, 1.1, 1.25, 1.5, 2.0),
                       accum_options: Optional[Iterable[int]] = None,
                       fixed_ep: Optional[int] = None,
                       fsdp_options: Iterable[bool] = (False, True)) -> list:
    m = gpt.moe
    eps = [fixed_ep] if fixed_ep else [p for p in _divisors(devices)
                                       if m is not None and m.num_experts % p == 0]
    if accum_options is None:
        accum_options = [a for a in (1, 2, 4, 8, 16, 32, 64)
                         if batch_size % a == 0 and (batch_size // a) % devices == 0]
    out = []
    for a in accum_options:
        for ep in eps:
            g, _ = ep_layout(ep, hw.devices_per_node)
            hier = [0] + ([g] if 1 < g < ep and ep % g == 0 else [])
            for z in (fsdp_options if devices > ep else (False,)):
                for h in hier:
                    for n in (chunks if ep > 1 else (1,)):
                        for cf in capacity_factors:
                            out.append(Setting(ep, "capacity", cf, n, h, 0.0, a, z))
                        out.append(Setting(ep, "dropless", m.capacity_factor, n, h, 0.0, a, z))
                        if ep > 1:
                            for r in (1.25, 1.5, 2.0):
                                if r < ep:
                                    out.append(Setting(ep, "dropless", m.capacity_factor, n, h,
                                                       r, a, z))
    return out


def _changes(s: Setting, base: Setting) -> int:
    return sum(getattr(s, f.name) != getattr(base, f.name) for f in dataclasses.fields(Setting))


def plan(gpt, *, devices: int, hw: Hardware, batch_size: int, seq_len: int,
         current: Setting, load=None, drop_budget: float = 0.01, backend: str = "gpu",
         tolerance: float = 0.01, **kw) -> dict:
    """Costs every candidate; returns {"best", "current", "ranked", "notes"}.

    Feasible = expected drops <= `drop_budget` and the memory estimate fits
    (if nothing fits, memory is ignored and a note says so). FSDP settings
    count only when no replicated one fits, unless `current` uses FSDP. Among
    feasible settings within `tolerance` of the fastest, the one closest to
    `current` wins (fewest changed knobs), then the one with fewer chunks.
    """
    notes = []
    cands = candidate_settings(gpt, devices, hw, batch_size, seq_len, **kw)
    costs = [step_cost(gpt, s, seq_len=seq_len, batch_size=batch_size, devices=devices,
                       hw=hw, load=load, backend=backend) for s in cands]
    ok_drop = [c for c in costs if c.drop_fraction <= drop_budget]
    if not ok_drop:
        notes.append(f"no setting keeps expected drops under {drop_budget:.1%}; "
                     "showing the least-dropping ones")
        ok_drop = sorted(costs, key=lambda c: c.drop_fraction)[:max(1, len(costs) // 10)]
    fits = [c for c in ok_drop if c.memory["total"] <= hw.mem_bytes]
    # FSDP is a memory remedy here: its time rests on hiding every weight
    # gather under compute, an assumption no GPU measurement has checked, so
    # it is chosen only where nothing fits without it (or the config has it).
    if not current.fsdp and any(not c.setting.fsdp for c in fits):
        fits = [c for c in fits if not c.setting.fsdp]
    if not fits:
        need = min(c.memory["total"] for c in ok_drop)
        notes.append(f"nothing fits in {hw.mem_bytes / 1e9:.0f} GB per device by the memory "
                     f"estimate (the smallest needs {need / 1e9:.0f} GB): use "
                     "param_dtype='bfloat16', remat, or more devices; ranking the settings "
                     "within 10% of the smallest footprint")
        fits = [c for c in ok_drop if c.memory["total"] <= 1.1 * need]
    fastest = min(c.time for c in fits)
    near = [c for c in fits if c.time <= fastest * (1 + tolerance)]
    best = min(near, key=lambda c: (_changes(c.setting, current), c.setting.overlap_chunks,
                                    c.time))
    cur = step_cost(gpt, current, seq_len=seq_len, batch_size=batch_size, devices=devices,
                    hw=hw, load=load, backend=backend)
    ranked = sorted(fits, key=lambda c: c.time)
    return {"best": best, "current": cur, "ranked": ranked, "notes": notes}
