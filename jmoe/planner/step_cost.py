"""A whole training step on one device: every layer's forward and backward
(`layer_cost`) for each micro-batch, the embedding and head, the gradient
all-reduce (or FSDP's gathers and reduce-scatters), the optimizer update,
and a memory estimate."""

from __future__ import annotations

import dataclasses

from jmoe.config import MoEConfig, mlp_matrices
from jmoe.dispatch import dropless_rows
from jmoe.model_config import GPTConfig, param_count_formula
from jmoe.planner.hardware import Hardware
from jmoe.planner.layer_cost import (LayerCost, OpCost, attention_cost, dense_ffn_cost,
                                     moe_layer_cost)
from jmoe.planner.load import load_distribution
from jmoe.planner.primitives import Prim, dtype_bytes, ep_layout, ring_allreduce, ring_gather


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

    def layer(self, moe: MoEConfig) -> MoEConfig:
        """`moe` with this setting's maths and execution knobs. Options of
        `moe` that the setting rules out follow it: a batch-wide capacity
        scope on the dropless path (it has no capacity), and an explicit
        packed capacity layout with overlap chunks (packed rows have no
        chunks; the chunked plan exchanges dense buffers, which keep the
        same rows)."""
        scope = moe.capacity_scope if self.dispatch == "capacity" else "shard"
        ex = dict(overlap_chunks=self.overlap_chunks, a2a_hierarchy=self.a2a_hierarchy)
        if self.overlap_chunks > 1 and moe.execution.capacity_layout == "packed":
            ex["capacity_layout"] = "auto"
        return moe.replace(dispatch=self.dispatch, capacity_factor=self.capacity_factor,
                           ep_recv_factor=self.ep_recv_factor,
                           capacity_scope=scope).with_execution(**ex)


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


def param_split(gpt: GPTConfig) -> tuple[float, float]:
    """(non-expert, routed-expert) parameter counts of the model."""
    total = param_count_formula(gpt)["total"]
    experts = 0
    if gpt.moe is not None:
        experts = (len(gpt.moe_layers) * gpt.moe.num_experts * gpt.moe.expert_matrices
                   * gpt.d_model * gpt.moe.d_ff)
    return float(total - experts), float(experts)


ATTENTION_IMPLS = ("xla", "flash")


def expert_buffer_rows(moe: MoEConfig, tokens: int, ep: int, detail: dict) -> float:
    """Static rows of one MoE layer's expert buffers on one device (what the
    compiled step allocates, padding included, not the rows that carry tokens).

    One device: the kept assignments packed by expert, each group padded to
    `group_align` (`jmoe.dispatch.dropless_rows`; capacity keeps at most E*C
    of the T*K). Expert parallel: the dense capacity layout's [E, C, D]
    buffers, the dropless path's (and the packed capacity layout's) receive buffers of every bucket branch (`recv_rows`)
    regrouped by local expert.
    """
    if ep == 1:
        a = tokens * moe.top_k
        if moe.dispatch == "capacity":
            a = min(a, moe.num_experts * moe.capacity(tokens))
        return float(dropless_rows(a, moe.num_experts, moe.group_align))
    if moe.dispatch == "capacity" and not moe.packed_capacity:
        return float(detail["buffer_rows"])
    # Dropless, and the packed capacity layout (its kept rows travel through
    # the dropless exchange): the receive buffers.
    return float(detail["recv_rows"]) + (moe.num_experts // ep + 1) * (moe.group_align - 1)


def _layer_params(gpt: GPTConfig, i: int, ep: int) -> float:
    """Parameters of layer `i` on one device (routed experts split over ep)."""
    d, h, j, k = gpt.d_model, gpt.num_heads, gpt.kv_heads, gpt.head_size
    mats = mlp_matrices(gpt.activation)
    n = d * h * k + 2 * d * j * k + h * k * d + 2 * d  # attention and the two norms
    if not gpt.is_moe_layer(i):
        return n + mats * d * gpt.dense_hidden
    m = gpt.moe
    n += d * m.num_experts + m.num_experts * mats * d * m.d_ff / ep
    n += mats * d * m.shared_hidden * (1 if m.num_shared_experts else 0)
    return n + (mats * d * m.d_ff if gpt.scmoe else 0)


def scan_bytes(gpt: GPTConfig, ep: int = 1) -> float:
    """What `scan_layers` adds to a step's memory: for each group of layers
    one `lax.scan` runs (the groups of `jmoe.model.scan_groups`: the first
    dense layers, the periods of `moe_every`, the dense layers left at the
    top) with 2 or more repeats, one repeat's weights sliced out of the
    stacks and one repeat's gradient before it is written into the stacked
    gradient: 2 x one period's parameters (measured on XLA:CPU: 7 single-layer
    [E, D, F] buffers in a scanned 2-layer step, none unrolled; docs/scale.md).
    """
    if not gpt.scan_layers:
        return 0.0
    n, f = gpt.num_layers, min(gpt.first_dense_layers, gpt.num_layers)
    if not gpt.moe_layers:
        groups = [(0, 1, n)]
    else:
        periods = (n - f) // gpt.moe_every
        tail = f + periods * gpt.moe_every
        groups = [(0, 1, f), (f, gpt.moe_every, periods), (tail, 1, n - tail)]
    pb = dtype_bytes(gpt.param_dtype)
    return sum(2 * pb * sum(_layer_params(gpt, a + j, ep) for j in range(p))
               for a, p, r in groups if r >= 2)


def activation_items(gpt: GPTConfig, *, tokens: int, seq_len: int, expert_rows: float,
                     batched_experts: bool = False, attention: str = "xla",
                     backend: str = "gpu") -> dict:
    """Bytes one device keeps for the backward of one micro-batch, item by item
    (name -> bytes), and their sum under "total".

    Each item is a count of buffers of a shape, from what `jax.vjp` saves for
    the model's forward (`jax.ad_checkpoint.print_saved_residuals`) as XLA
    keeps it (measured on XLA:CPU, jax 0.10.2: docs/scale.md):

      attention      per layer: the two norm outputs and the residual sum
                     [T, D], q before and after rope and the output [T, H*K],
                     rotated k and v [T, J*K].
      scores         per layer, `attention="xla"` (what jmoe.model calls:
                     jax.nn.dot_product_attention's XLA path, on every
                     backend in jax 0.10): two float32 [B, H, S, S] buffers
                     (the exp of the masked logits, the probabilities),
                     whatever the compute dtype -- three without the CPU
                     flag jmoe sets (`--xla_cpu_experimental_ynn_fusion_type=
                     individual_dot`, jmoe.runtime.xla_flags), which keeps
                     the masked logits too; `"flash"`: the float32 [B, H, S]
                     log-sum-exp.
      moe            per MoE layer: the FFN norm, the layer's input and
                     output [T, D], the un-permuted [T, K, D] rows, three
                     float32 [T, E] router buffers; and on the expert buffers
                     of R static rows (`expert_buffer_rows`): the permuted
                     input, the down projection's output and its cotangent's
                     slot [R, D], and 2 * mats [R, F] (the gmm outputs, the
                     activation's intermediates, the hidden layer), or, for
                     `batched_experts` (the expert-parallel capacity path's
                     [E, C, D] einsums), mats + 1 [R, F] as a dense FFN.
      dense_ffn      per dense layer: [T, D] x 3 and (mats + 1) [T, F].
      shared         per MoE layer with shared experts: the same on their F.
      head           the embedding, final norm and its input [T, D], float32
                     logits and log-probabilities [T, V].

    remat (`gpt.execution.remat`) on a compiler that keeps jax.checkpoint's
    saving (`backend` "gpu"/"tpu"): "full" keeps each block's input [T, D]
    and one block's items, live while its backward runs; "dots" keeps what
    the policy saves (the outputs of the projections, the router and the
    expert gmms) and one block's items. XLA:CPU (`backend="cpu"`) keeps no
    saving (measured, docs/scale.md): with "full" its cost analysis counts
    no recomputed FLOPs and it keeps what "none" keeps; with "dots" it
    keeps the policy's saved dot outputs on top of that.
    """
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"Hardware.attention={attention!r} is unknown: use one of "
                         f"{ATTENTION_IMPLS} (--set attention=flash where the model runs a "
                         "flash-attention kernel).")
    b = dtype_bytes(gpt.dtype)
    t, d, h, j, k, v = tokens, gpt.d_model, gpt.num_heads, gpt.kv_heads, gpt.head_size, gpt.vocab_size
    s = seq_len
    n_moe = len(gpt.moe_layers) if (gpt.moe is not None and not gpt.dense) else 0
    n_dense = gpt.num_layers - n_moe
    attn = t * b * (3 * d + 3 * h * k + 2 * j * k)
    scores = 2 * t * h * s * 4 if attention == "xla" else t * h * 4
    moe_tok = moe_rows = shared = dots_moe = 0.0
    if n_moe:
        m = gpt.moe
        mats = m.expert_matrices
        moe_tok = t * b * (3 * d + m.top_k * d) + 3 * t * m.num_experts * 4
        f_bufs = mats + 1 if batched_experts else 2 * mats
        moe_rows = expert_rows * b * (3 * d + f_bufs * m.d_ff)
        if m.num_shared_experts:
            shared = t * b * (3 * d + (mats + 1) * m.shared_hidden)
        dots_moe = (expert_rows * b * ((mats - 1) * m.d_ff + d) + t * m.num_experts * 4
                    + (t * b * ((mats - 1) * m.shared_hidden + d) if shared else 0.0))
    dense = t * b * (3 * d + (mlp_matrices(gpt.activation) + 1) * gpt.dense_hidden)
    dots_dense = t * b * ((mlp_matrices(gpt.activation) - 1) * gpt.dense_hidden + d)
    dots_attn = t * b * (h * k + 2 * j * k + d)  # q, k, v and output projections
    head = t * d * b * 3 + t * v * 4 * 2
    items = {"attention": gpt.num_layers * attn, "scores": gpt.num_layers * scores,
             "moe": n_moe * (moe_tok + moe_rows + shared), "dense_ffn": n_dense * dense,
             "head": head}
    remat = gpt.execution.remat
    if remat != "none":
        dots = (gpt.num_layers * dots_attn + n_moe * dots_moe + n_dense * dots_dense
                if remat == "dots" else 0.0)
        if backend == "cpu":
            items["remat_saved"] = dots
        else:
            block = attn + scores + max(moe_tok + moe_rows + shared if n_moe else 0.0,
                                        dense if n_dense else 0.0)
            items = {"block_inputs": gpt.num_layers * t * d * b, "remat_saved": dots,
                     "one_block": block, "head": head}
    items["total"] = sum(items.values())
    return items


def _embed_head_cost(gpt: GPTConfig, tokens: int, prim: Prim) -> LayerCost:
    """Embedding lookup, final norm, unembedding matmul, softmax cross-entropy."""
    b = dtype_bytes(gpt.dtype)
    head = prim.matmul(2 * tokens * gpt.d_model * gpt.vocab_size,
                       (gpt.d_model * gpt.vocab_size + tokens * gpt.d_model) * b
                       + tokens * gpt.vocab_size * 4)
    xent = prim.mem(tokens * gpt.vocab_size * 4 * 4, kernels=3)
    emb = prim.gather(2 * tokens * gpt.d_model * b)
    return LayerCost("embed_head", (
        OpCost("head", "compute", head, 2 * head), OpCost("softmax_xent", "compute", xent, xent),
        OpCost("embed", "compute", emb, 2 * emb)), head * 3 + 2 * xent + 3 * emb)


@dataclasses.dataclass(frozen=True)
class _Sync:
    """Gradient synchronisation of one step and the weights it leaves per device."""

    time: float
    exposed: float
    params_per_device: float
    gathered_bytes: float  # FSDP: one layer's weights gathered whole, and its gradient


def _gradient_sync(gpt: GPTConfig, setting: Setting, devices: int, layers: dict,
                   hw: Hardware) -> _Sync:
    """Data parallel: non-expert weights all-reduced over all devices, expert
    shards over the data axis, hidden under the last micro-batch's backward.
    FSDP (ZeRO-3, as config.mesh.fsdp does it): every micro-batch all-gathers
    the weights over `data` in the forward and again in the backward, and
    reduce-scatters the gradients; the non-expert shards are then all-reduced
    over `expert`. Async collectives hide the gathers under the micro-batch's
    compute, all but the first layer's."""
    accum, ep = setting.grad_accum_steps, setting.ep
    non_exp, exp = param_split(gpt)
    pb = dtype_bytes(gpt.param_dtype)
    g_node, _ = ep_layout(ep, hw.devices_per_node)
    multi_node = devices > hw.devices_per_node
    dp = devices // ep
    dp_nodes = multi_node and dp * g_node > hw.devices_per_node  # the data axis crosses nodes
    if not (setting.fsdp and dp > 1):
        sync = (ring_allreduce(non_exp * pb, devices, multi_node, hw)
                + ring_allreduce(exp / ep * pb, dp, dp_nodes, hw))
        per_mb_bwd = sum(sum(o.bwd for o in lc.ops) * c for lc, c in layers.values())
        exposed = max(0.0, sync - per_mb_bwd) if hw.async_collectives else sync
        return _Sync(sync, exposed, non_exp + exp / ep, 0.0)
    local = non_exp + exp / ep  # one expert-parallel rank's weights
    gather = ring_gather(local * pb, dp, dp_nodes, hw)
    sync = accum * (3 * gather + ring_allreduce(non_exp / dp * pb, ep,
                                                multi_node and g_node < ep, hw))
    per_mb = sum(lc.compute * c for lc, c in layers.values())
    first = gather / max(1, gpt.num_layers)
    exposed = (max(accum * 2 * first, sync - accum * per_mb) if hw.async_collectives
               else sync)
    return _Sync(sync, exposed, local / dp, 2 * local / max(1, gpt.num_layers) * pb)


def step_cost(gpt: GPTConfig, setting: Setting, *, seq_len: int, batch_size: int, devices: int,
              hw: Hardware, load=None, backend: str = "gpu") -> StepCost:
    """The predicted training step of `gpt` under `setting`."""
    accum = setting.grad_accum_steps
    tokens = batch_size * seq_len // accum // devices  # per device per micro-batch
    prim = Prim(hw, gpt.dtype)
    remat = gpt.execution.remat
    layers = {}
    n_moe = len(gpt.moe_layers)
    n_dense = gpt.num_layers - n_moe
    layers["attention"] = (attention_cost(gpt.d_model, gpt.num_heads, gpt.kv_heads,
                                          gpt.head_size, tokens, seq_len, prim, remat),
                           gpt.num_layers)
    drop = 0.0
    expert_rows = 0.0
    if n_moe:
        m = setting.layer(gpt.moe)
        load_E = load_distribution(load, m.num_experts)
        lc = moe_layer_cost(m, tokens, setting.ep, hw, load_E=load_E, remat=remat,
                            dtype=gpt.dtype, backend=backend)
        layers["moe"] = (lc, n_moe)
        drop = lc.drop_fraction
        expert_rows = expert_buffer_rows(m, tokens, setting.ep, lc.detail)
    if n_dense:
        layers["dense_ffn"] = (dense_ffn_cost(gpt.d_model, gpt.dense_hidden, gpt.activation,
                                              tokens, prim, remat), n_dense)
    layers["embed_head"] = (_embed_head_cost(gpt, tokens, prim), 1)
    sync = _gradient_sync(gpt, setting, devices, layers, hw)
    pb = dtype_bytes(gpt.param_dtype)
    # AdamW: read param, grad, mu, nu; write param, mu, nu (param_dtype).
    opt = prim.mem(sync.params_per_device * pb * 7, kernels=8)
    state = sync.params_per_device * pb * (4 + (1 if accum > 1 else 0))
    batched = n_moe > 0 and setting.ep > 1 and setting.dispatch == "capacity"
    items = activation_items(gpt, tokens=tokens, seq_len=seq_len, expert_rows=expert_rows,
                             batched_experts=batched, attention=hw.attention, backend=backend)
    items["fsdp_gathered"] = sync.gathered_bytes
    items["scan"] = scan_bytes(gpt, setting.ep)
    act = items.pop("total") + items["fsdp_gathered"] + items["scan"]
    mem = {"state": state, "activations": act, "total": state + act,
           "capacity": hw.mem_bytes, "params_per_device": sync.params_per_device,
           "activation_items": items}
    return StepCost(setting, layers, accum, sync.time, sync.exposed, opt, hw.launch_overhead,
                    mem, drop)
