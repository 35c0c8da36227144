"""The cost model's FLOPs, bytes and memory against hand counts and XLA.

`jmoe.planner` prices every region as time on a roofline. Probe hardware
profiles turn those times back into counts: with a peak of 1 FLOP/s and
infinite bandwidths a region's time *is* its FLOPs; with a 1 B/s memory and
infinite peak it is the bytes it moves; with 1 B/s links and no latency an
all-to-all's time is the bytes that leave the device. Each count is then
compared with a formula written here from first principles (never with the
model's own helpers), on small shapes picked so that a factor-of-2 slip --
a forgotten backward, 2 instead of 3 SwiGLU matrices, fp32 instead of bf16,
ep instead of ep-1 peers, T*K rows instead of E*C -- fails.

The last tests compile a tiny train step and compare the planner's memory
prediction with XLA's own memory analysis, and its FLOPs with XLA's cost
analysis.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cfg_helpers import moe_config
from jmoe.model import GPT
from jmoe.model_config import GPTConfig, ModelExecution
from jmoe.planner import hardware
from jmoe.planner.layer_cost import attention_cost, dense_ffn_cost, moe_layer_cost
from jmoe.planner.primitives import Prim, all_to_all_time
from jmoe.planner.step_cost import Setting, step_cost

INF = float("inf")
H100 = hardware.PROFILES["h100"]
_NO_LATENCY = dict(intra_alpha=0.0, intra_peer=0.0, inter_alpha=0.0, inter_peer=0.0,
                   kernel_overhead=0.0, launch_overhead=0.0, async_collectives=False,
                   devices_per_node=64)
_UNIT_EFF = dict(mm_eff=1.0, gmm_eff=1.0, attn_eff=1.0, mem_eff=1.0, gather_eff=1.0,
                 scatter_eff=1.0, comm_eff=1.0)
# Seconds == FLOPs: 1 FLOP/s, everything else free.
FLOP_PROBE = H100.replace(peak_flops={"float32": 1.0, "bfloat16": 1.0}, mem_bw=INF,
                          intra_bw=INF, inter_bw=INF, **_UNIT_EFF, **_NO_LATENCY)
# Seconds == bytes through memory: 1 B/s, infinite FLOP/s and links.
BYTE_PROBE = H100.replace(peak_flops={"float32": INF, "bfloat16": INF}, mem_bw=1.0,
                          intra_bw=INF, inter_bw=INF, **_UNIT_EFF, **_NO_LATENCY)
# Seconds == bytes on the links: 1 B/s per link, memory and FLOPs free.
LINK_PROBE = H100.replace(peak_flops={"float32": INF, "bfloat16": INF}, mem_bw=INF,
                          intra_bw=1.0, inter_bw=1.0, **_UNIT_EFF, **_NO_LATENCY)
BYTES = {"float32": 4, "bfloat16": 2}

# A small MoE layer: T=40 tokens per device, E=8, K=2, cf=1.25 gives
# C = ceil(12.5) = 13 slots (floor would give 12; T*K/E = 10 is neither),
# so E*C = 104 buffer rows differ from the T*K = 80 assignments.
T, D, F, E, K, CF = 40, 64, 96, 8, 2, 1.25
C = 13
assert C == math.ceil(CF * T * K / E) and C > 4  # above min_capacity


def _moe(**kw):
    base = dict(d_model=D, d_ff=F, num_experts=E, top_k=K, capacity_factor=CF,
                dispatch="capacity", dtype="float32")
    base.update(kw)
    return moe_config(**base)  # execution fields (overlap_chunks, ep_buckets) -> Execution


def _op(layer, name):
    (op,) = [o for o in layer.ops if o.name == name]
    return op


# ------------------------------------------------------------------ FLOPs --

@pytest.mark.parametrize("activation,mats", [("swiglu", 3), ("gelu", 2)])
@pytest.mark.parametrize("ep,chunks", [(2, 1), (4, 2)])
@pytest.mark.parametrize("remat", ["none", "full"])
def test_capacity_layer_flops_match_hand_count(activation, mats, ep, chunks, remat):
    """Capacity path: the experts run on the whole [E, C, D] buffer (E*C rows
    per device after the exchange, padding included); backward = 2x forward;
    remat='full' runs the forward once more."""
    layer = moe_layer_cost(_moe(activation=activation, overlap_chunks=chunks), T, ep,
                           FLOP_PROBE, remat=remat)
    # Per expert row: x[D] @ W[D, F] for each input projection and h[F] @ W[F, D]
    # for the output one, 2 FLOPs per multiply-add: 2*D*F per matrix.
    experts_fwd = 2 * (E * C) * D * F * mats
    router_fwd = 2 * T * D * E  # x[T, D] @ w[D, E]
    experts = _op(layer, "experts")
    router = _op(layer, "router")
    assert experts.fwd == pytest.approx(experts_fwd, rel=1e-12)
    assert experts.bwd == pytest.approx(2 * experts_fwd, rel=1e-12)
    assert router.fwd == pytest.approx(router_fwd, rel=1e-12)
    assert router.bwd == pytest.approx(2 * router_fwd, rel=1e-12)
    again = 1 if remat == "full" else 0
    # Everything else in the layer is memory-bound (free on this probe).
    assert layer.compute == pytest.approx((3 + again) * (experts_fwd + router_fwd), rel=1e-12)
    assert layer.detail["capacity"] == C and layer.detail["buffer_rows"] == E * C


@pytest.mark.parametrize("activation,mats", [("swiglu", 3), ("gelu", 2)])
def test_dropless_and_shared_expert_flops_match_hand_count(activation, mats):
    # One device, group_align=1: exactly the T*K assignments, no padding.
    one = moe_layer_cost(_moe(dispatch="dropless", group_align=1, activation=activation),
                         T, 1, FLOP_PROBE)
    assert _op(one, "experts").fwd == pytest.approx(2 * T * K * D * F * mats, rel=1e-12)
    # group_align=16: each of the E groups is padded up to a multiple of 16,
    # (16 - 1) / 2 rows on average (uniform residues).
    pad = moe_layer_cost(_moe(dispatch="dropless", group_align=16, activation=activation),
                         T, 1, FLOP_PROBE)
    assert _op(pad, "experts").fwd == pytest.approx(
        2 * (T * K + E * 15 / 2) * D * F * mats, rel=1e-12)
    # ep=4 on GPU (native ragged exchange), uniform load: every device gets T*K
    # rows on average for its E/4 local experts, each padded by (16-1)/2.
    ep = moe_layer_cost(_moe(dispatch="dropless", group_align=16, activation=activation),
                        T, 4, FLOP_PROBE, backend="gpu")
    assert _op(ep, "experts").fwd == pytest.approx(
        2 * (T * K + (E // 4) * 15 / 2) * D * F * mats, rel=1e-12)
    assert _op(ep, "experts").bwd == pytest.approx(2 * _op(ep, "experts").fwd, rel=1e-12)
    # Two shared experts of hidden 48 see every token: a dense MLP of 2*48.
    sh = moe_layer_cost(_moe(num_shared_experts=2, shared_d_ff=48, activation=activation),
                        T, 2, FLOP_PROBE)
    shared_fwd = 2 * T * D * (2 * 48) * mats
    assert _op(sh, "shared_experts_matmul").fwd == pytest.approx(shared_fwd, rel=1e-12)
    assert _op(sh, "shared_experts_matmul").bwd == pytest.approx(2 * shared_fwd, rel=1e-12)


@pytest.mark.parametrize("causal_skip", [True, False])
def test_attention_flops_match_hand_count(causal_skip):
    """Grouped-query attention (H=4 query heads, J=2 key/value heads)."""
    d, h, j, k, s = 64, 4, 2, 16, 32
    t = 3 * s  # three sequences on this device
    hw = FLOP_PROBE.replace(causal_skip=causal_skip)
    a = attention_cost(d, h, j, k, t, s, Prim(hw, "float32"))
    # q = x W_q [D, H*K], k and v = x W [D, J*K] each, out = o W_o [H*K, D].
    proj = 2 * t * (d * h * k + 2 * d * j * k + h * k * d)
    # Per query: q.k over S keys and p.v over S values, H heads, K dims:
    # 2 matmuls * 2 FLOPs * S * H * K; a causal kernel that skips masked
    # blocks sees S/2 keys on average.
    core = 4 * t * s * h * k * (0.5 if causal_skip else 1.0)
    assert _op(a, "attn_proj").fwd == pytest.approx(proj, rel=1e-12)
    assert _op(a, "attn_proj").bwd == pytest.approx(2 * proj, rel=1e-12)
    assert _op(a, "attn_core").fwd == pytest.approx(core, rel=1e-12)
    # Flash-attention backward (documented): recompute q.k, then dV, dP, dQ,
    # dK: 5 matmuls against the forward's 2 -> 2.5x.
    assert _op(a, "attn_core").bwd == pytest.approx(2.5 * core, rel=1e-12)


def _gpt(remat="none", **kw):
    moe_kw = dict(d_ff=F, num_experts=E, top_k=K, capacity_factor=CF, dispatch="capacity",
                  group_align=8)
    moe_kw.update(kw.pop("moe", {}))
    base = dict(vocab_size=256, d_model=D, num_layers=3, num_heads=4, num_kv_heads=2,
                first_dense_layers=1, dtype="float32", param_dtype="float32")
    base.update(kw)
    gpt = GPTConfig(**base, execution=ModelExecution(remat=remat),
                    moe=moe_config(d_model=base["d_model"], dtype=base["dtype"],
                                   param_dtype=base["param_dtype"], **moe_kw))
    gpt.validate()
    return gpt


@pytest.mark.parametrize("remat", ["none", "full"])
def test_step_flops_match_hand_count(remat):
    """The whole step: 3 layers (1 dense FFN, 2 MoE), GQA, 2 micro-batches,
    ep=2 on 4 devices. 16 x 20 tokens / 2 micro-batches / 4 devices = 40
    tokens per device per micro-batch, so C = 13 as above."""
    gpt = _gpt(remat=remat)
    s, b, devices, accum = 20, 16, 4, 2
    t = b * s // accum // devices
    assert t == T
    sc = step_cost(gpt, Setting(2, "capacity", CF, 1, 0, 0.0, accum), seq_len=s,
                   batch_size=b, devices=devices, hw=FLOP_PROBE.replace(causal_skip=True))
    h, j, k, v = 4, 2, D // 4, 256
    proj = 2 * t * (2 * D * h * k + 2 * D * j * k)
    core = 4 * t * s * h * k / 2
    router = 2 * t * D * E
    experts = 2 * E * C * D * F * 3
    dense = 2 * t * D * (K * F) * 3  # dense hidden = top_k * d_ff (same active FFN)
    head = 2 * t * D * v
    fwd_blocks = 3 * (proj + core) + 2 * (router + experts) + dense
    per_micro = (3 * 3 * proj + 3 * (1 + 2.5) * core + 2 * 3 * (router + experts)
                 + 3 * dense + 3 * head)
    if remat == "full":
        per_micro += fwd_blocks  # the blocks' forward again; the head is not rematerialised
    # Optimizer and norms are memory-bound: free on this probe.
    assert sc.compute == pytest.approx(accum * per_micro, rel=1e-12)


# ------------------------------------------------------------------ bytes --

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("ep,chunks", [(2, 1), (8, 1), (4, 4)])
def test_capacity_all_to_all_bytes(dtype, ep, chunks):
    """Each device sends its [E, C, D] buffer in the compute dtype; 1/ep of it
    stays home, so (ep-1)/ep of it crosses a link, in each of the dispatch
    and combine exchanges, forward and backward alike."""
    layer = moe_layer_cost(_moe(dtype=dtype, overlap_chunks=chunks), T, ep, LINK_PROBE)
    buffer = E * C * D * BYTES[dtype]
    leaving = (ep - 1) / ep * buffer
    for name in ("a2a_dispatch", "a2a_combine"):
        op = _op(layer, name)
        assert op.fwd == pytest.approx(leaving, rel=1e-12), name
        assert op.bwd == pytest.approx(leaving, rel=1e-12), name
    assert layer.detail["a2a_bytes"] * chunks == pytest.approx(buffer, rel=1e-12)


def test_dropless_all_to_all_bytes():
    tk, ep, b = T * K, 4, 4
    gpu = moe_layer_cost(_moe(dispatch="dropless"), T, ep, LINK_PROBE, backend="gpu")
    # Native ragged exchange, uniform load: the T*K assignment rows, of
    # which (ep-1)/ep go to other devices.
    assert _op(gpu, "a2a_dispatch").fwd == pytest.approx((ep - 1) / ep * tk * D * b, rel=1e-12)
    # CPU dense emulation without buckets: every peer's slice travels in a
    # slot of T*K rows (one peer might get them all), ep slots per device.
    cpu = moe_layer_cost(_moe(dispatch="dropless", ep_buckets=()), T, ep, LINK_PROBE,
                         backend="cpu")
    assert _op(cpu, "a2a_dispatch").fwd == pytest.approx((ep - 1) * tk * D * b, rel=1e-12)
    # With buckets at a large balanced load the 1.5x bucket always holds the
    # busiest pair: 8192 assignments, 2048 per pair, sd ~ 39, slot 3072
    # (a multiple of 8) is 26 sd away.
    t = 4096
    bucket = moe_layer_cost(_moe(dispatch="dropless", ep_buckets=(1.5, 3.0)), t, ep,
                            LINK_PROBE, backend="cpu")
    slot = math.ceil(1.5 * t * K / ep / 8) * 8
    assert slot == 3072
    assert _op(bucket, "a2a_dispatch").fwd == pytest.approx((ep - 1) * slot * D * b, rel=1e-9)


def test_all_to_all_link_bytes_flat_and_two_level():
    """16 devices, 4 per node: a flat exchange sends 3/16 of the buffer over
    NVLink and 12/16 over InfiniBand; the two-level one (groups of 4) sends
    3/4 inside the node, the same 12/16 across nodes, and copies the buffer
    twice locally (read + write each)."""
    hw = BYTE_PROBE.replace(intra_bw=1.0, inter_bw=1.0, devices_per_node=4)
    n = 1.6e6
    flat = all_to_all_time(n, 16, hw)
    assert flat["intra"] == pytest.approx(3 / 16 * n, rel=1e-12)
    assert flat["inter"] == pytest.approx(12 / 16 * n, rel=1e-12)
    assert flat["time"] == pytest.approx(12 / 16 * n, rel=1e-12)  # both links at once
    two = all_to_all_time(n, 16, hw, hierarchy=4)
    assert two["intra"] == pytest.approx(3 / 4 * n, rel=1e-12)
    assert two["inter"] == pytest.approx(12 / 16 * n, rel=1e-12)
    assert two["time"] == pytest.approx(3 / 4 * n + 2 * 2 * n + 12 / 16 * n, rel=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weight_and_io_bytes(dtype):
    b = BYTES[dtype]
    # Expert weights: the forward reads every local expert's 3 matrices once;
    # the backward reads them again and writes their gradients (2x). Taken
    # as the part of the experts' bytes that does not grow with the rows
    # (the per-row part is left out: the model counts (mats+1)*F bytes per
    # row where first principles, and its dense FFN, give mats*F).
    def experts(t, part):
        layer = moe_layer_cost(_moe(dtype=dtype), t, 1, BYTE_PROBE)
        return getattr(_op(layer, "experts"), part), layer.detail["buffer_rows"]

    (fa, ra), (fb, rb) = experts(40, "fwd"), experts(120, "fwd")
    w = E * 3 * D * F * b
    assert (rb * fa - ra * fb) / (rb - ra) == pytest.approx(w, rel=1e-9)
    (ba, _), (bb, _) = experts(40, "bwd"), experts(120, "bwd")
    assert (rb * ba - ra * bb) / (rb - ra) == pytest.approx(2 * w, rel=1e-9)
    # Dense SwiGLU FFN matmuls: weights (3 matrices) + x read, y written, the
    # gate and up outputs written and their product read by the down matmul.
    prim = Prim(BYTE_PROBE, dtype)
    t, f = 40, 192
    mm = _op(dense_ffn_cost(D, f, "swiglu", t, prim), "dense_ffn_matmul")
    assert mm.fwd == pytest.approx((3 * D * f + t * (2 * D + 3 * f)) * b, rel=1e-12)
    # Attention projections: W_q, W_k, W_v, W_o; x read, q/k/v written, the
    # attention output read, the projection written.
    h, j, k = 4, 2, 16
    a = _op(attention_cost(D, h, j, k, t, 20, prim), "attn_proj")
    assert a.fwd == pytest.approx(
        (D * (2 * h * k + 2 * j * k) + t * (2 * D + 2 * h * k + 2 * j * k)) * b, rel=1e-12)


# ----------------------------------------------------------- parameters --

def _param_leaves(gpt):
    """[(is routed expert, element count)] of the real model's parameters."""
    _, params, _ = jax.eval_shape(lambda: nnx.split(GPT(gpt, rngs=nnx.Rngs(0)), nnx.Param, ...))
    return [(any(getattr(k, "key", None) == "experts" for k in path), int(np.prod(leaf.shape)))
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]]


def _param_counts(gpt):
    """(non-expert, routed-expert) parameter counts of the real model."""
    leaves = _param_leaves(gpt)
    return (sum(n for is_exp, n in leaves if not is_exp),
            sum(n for is_exp, n in leaves if is_exp))


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_gradient_sync_and_optimizer_bytes(param_dtype):
    """Data parallel, 8 devices = 4 data x 2 expert: non-expert gradients are
    all-reduced over all 8, expert gradients (1/ep of them per device) over
    the 4 data replicas; a ring all-reduce sends 2*(n-1)/n of the buffer.
    AdamW reads param, grad, mu, nu and writes param, mu, nu: 7 passes."""
    gpt = _gpt(param_dtype=param_dtype)
    non_exp, exp = _param_counts(gpt)
    pb, ep, devices = BYTES[param_dtype], 2, 8
    dp = devices // ep
    s = Setting(ep, "capacity", CF, 1, 0)
    link = step_cost(gpt, s, seq_len=20, batch_size=16, devices=devices, hw=LINK_PROBE)
    assert link.grad_sync == pytest.approx(
        2 * (devices - 1) / devices * non_exp * pb + 2 * (dp - 1) / dp * exp / ep * pb,
        rel=1e-12)
    mem = step_cost(gpt, s, seq_len=20, batch_size=16, devices=devices, hw=BYTE_PROBE)
    assert mem.optimizer == pytest.approx(7 * (non_exp + exp / ep) * pb, rel=1e-12)
    # ZeRO-3 (fsdp): per micro-batch, gather one expert-parallel rank's
    # weights in the forward and again in the backward and reduce-scatter
    # their gradients, (dp-1)/dp of the buffer each; then the non-expert
    # gradient shards are all-reduced over the expert axis.
    accum = 2
    z = step_cost(gpt, Setting(ep, "capacity", CF, 1, 0, 0.0, accum, True), seq_len=20,
                  batch_size=16, devices=devices, hw=LINK_PROBE)
    local = (non_exp + exp / ep) * pb
    assert z.grad_sync == pytest.approx(
        accum * (3 * (dp - 1) / dp * local + 2 * (ep - 1) / ep * non_exp / dp * pb), rel=1e-12)


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_state_memory_matches_hand_count(param_dtype):
    """Per device: weights, gradients, Adam mu and nu, all in param_dtype
    (4 copies); a fifth, the gradient accumulator, with grad_accum_steps > 1.
    Expert weights split over ep; with FSDP everything splits over data."""
    gpt = _gpt(param_dtype=param_dtype)
    non_exp, exp = _param_counts(gpt)
    pb = BYTES[param_dtype]
    kw = dict(seq_len=20, batch_size=16, devices=8, hw=H100)
    for ep, accum, fsdp in [(1, 1, False), (2, 1, False), (4, 2, False), (2, 1, True)]:
        mem = step_cost(gpt, Setting(ep, "capacity", CF, 1, 0, 0.0, accum, fsdp), **kw).memory
        per_dev = (non_exp + exp / ep) / (8 // ep if fsdp else 1)
        assert mem["params_per_device"] == pytest.approx(per_dev, rel=1e-12)
        copies = 4 + (accum > 1)
        assert mem["state"] == pytest.approx(copies * per_dev * pb, rel=1e-12), (ep, accum)


# --------------------------------------------------- against compiled XLA --

def _compile_train_step(gpt, data, ep, fsdp, batch_size, seq_len):
    """The trainer's jitted step, lowered for a data x expert mesh and compiled."""
    from jmoe.sharding import make_mesh
    from jmoe.train import cli, mesh as mesh_lib, step as step_lib

    config = cli.load_config("configs/gpt_moe.py")
    tx = step_lib.make_optimizer(config.opt, config.total_steps)
    sched = step_lib.make_schedule(config.opt, config.total_steps)
    mesh = make_mesh(data=data, expert=ep, devices=jax.devices()[:data * ep])
    abstract = jax.eval_shape(step_lib.make_init(gpt, tx, 0))
    shard = mesh_lib.state_shardings(mesh, abstract, fsdp=fsdp)
    bsh = mesh_lib.batch_sharding(mesh)
    scfg = step_lib.step_config(config)
    with jax.set_mesh(mesh):
        train, _ = step_lib.jit_steps(shard, bsh, step_lib.graphdef_of(gpt), tx, sched, scfg)
        state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             abstract, shard)
        batch = jax.ShapeDtypeStruct((batch_size, seq_len + 1), jnp.int32, sharding=bsh)
        return train.lower(state, batch).compile()


# (name, GPT overrides, data, ep, fsdp, seq_len, rows per device). The
# memory prediction is checked on configs where each of its items is a large
# share of the step: the [B, H, S, S] attention scores (seq 256, 4 heads),
# the expert buffers' static rows (64 tokens: on one device the capacity
# path packs T*K = 128 rows, but the buffer holds E*(group_align-1) more,
# 2304 rows at group_align=256), remat as XLA:CPU keeps it, a dense layer
# beside MoE ones, depth, expert parallelism and FSDP.
XLA_CASES = [
    ("ep2_fp32", dict(), 1, 2, False, 16, 32),
    ("fsdp2_ep2_bf16", dict(param_dtype="bfloat16"), 2, 2, True, 16, 32),
    ("seq256_4_heads_remat_full", dict(remat="full", num_heads=4), 1, 1, False, 256, 4),
    ("dense_mix_3_layers_padded_dots", dict(remat="dots", num_layers=3, first_dense_layers=1,
                                            moe=dict(d_ff=256, group_align=256)),
     1, 1, False, 16, 4),
]


# The two longer steps: 45 s each on the shared 2-core CPU under load.
SLOW_XLA_CASES = ("seq256_4_heads_remat_full", "dense_mix_3_layers_padded_dots")


@pytest.mark.parametrize("name,kw,data,ep,fsdp,s,b_dev", [
    pytest.param(*c, id=c[0], marks=[pytest.mark.slow] if c[0] in SLOW_XLA_CASES else [])
    for c in XLA_CASES])
def test_predicted_memory_and_flops_match_xla(name, kw, data, ep, fsdp, s, b_dev):
    devices = data * ep
    base = dict(d_model=128, num_layers=2, num_heads=2, num_kv_heads=0, first_dense_layers=0,
                moe=dict(d_ff=256))
    gpt = _gpt(**{**base, **kw})
    compiled = _compile_train_step(gpt, data, ep, fsdp, b_dev * devices, s)
    ma = compiled.memory_analysis()
    setting = Setting(ep, "capacity", CF, 1, 0, 0.0, 1, fsdp)
    mem = step_cost(gpt, setting, seq_len=s, batch_size=b_dev * devices, devices=devices,
                    hw=H100, backend="cpu").memory
    pb = BYTES[gpt.param_dtype]
    # Arguments = weights + Adam mu + nu (3 of the 4 predicted state copies;
    # the gradients are XLA temporaries) + this device's int32 batch rows +
    # a few scalars (step, Adam count: 76 bytes measured).
    expected = 0.75 * mem["state"] + b_dev * (s + 1) * 4
    if fsdp:
        # Leaves under specs.FSDP_MIN_SIZE elements (norm scales, routers)
        # stay whole on every device; the model's params/dp splits them too.
        # Counted here: the 1 - 1/data of them that the model leaves out.
        small = sum(n for _, n in _param_leaves(gpt) if n < 2 ** 14)
        assert small == 2 * 2 * 128 + 128 + 2 * 128 * E  # norms, final norm, routers
        expected += 3 * pb * small * (1 - 1 / data)
    assert ma.argument_size_in_bytes == pytest.approx(expected, abs=256)
    # The whole step (issue 17's target: within 20%): XLA's peak is the
    # arguments, the outputs that do not reuse a donated buffer, and the
    # temporaries (gradients, what the backward keeps, scratch). Measured
    # (jax 0.10.2, XLA:CPU with jmoe's CPU flags): 1.10 (ep2_fp32), 0.99
    # (fsdp2_ep2_bf16: FSDP gathers the bf16 weights whole and casts them to
    # fp32 copies), 1.03 (seq256_4_heads_remat_full), 0.90
    # (dense_mix_3_layers_padded_dots); the activations alone 1.18, 0.99,
    # 1.04, 0.85. Tried (with three score buffers a layer, as counted then):
    # flash attention's memory (no scores) gives 0.78 at seq 256;
    # expert buffers of the average real rows (T*K + E*(align-1)/2) instead
    # of the static ones 0.64 in the padded case; remat's saving taken as
    # kept (as on a GPU) 0.74 at seq 256.
    peak = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
            + ma.temp_size_in_bytes)
    assert 0.8 < mem["total"] / peak < 1.2, (mem["total"] / peak, mem["activation_items"])
    # The activations alone (temporaries less the gradients) are the hard
    # part of the estimate: held to the same band where they are most of
    # the step (no FSDP: its gathered copies are not itemised).
    grads = mem["state"] / 4
    if not fsdp:
        ratio = mem["activations"] / (ma.temp_size_in_bytes - grads)
        assert 0.8 < ratio < 1.2, ratio
    # FLOPs: XLA counts 2 per multiply-add of every dot plus 1 per
    # elementwise op; the model counts matmuls only, so XLA is a little above
    # (measured 1.019 for ep2_fp32, 1.027 with FSDP). Non-causal cores:
    # jax.nn.dot_product_attention computes the full S x S scores. Dropping
    # the backward or a SwiGLU matrix of the experts (tried) gives 1.35.
    # Not with remat: XLA:CPU drops the recomputed forward (measured 0.60
    # of the model's count with remat='full', 0.85 with 'dots'), as it
    # drops remat's memory saving above.
    if gpt.execution.remat != "none":
        return
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = step_cost(gpt, setting, seq_len=s, batch_size=b_dev * devices, devices=devices,
                      hw=FLOP_PROBE.replace(causal_skip=False), backend="cpu").compute
    assert 1.0 < cost["flops"] / flops < 1.06, cost["flops"] / flops
