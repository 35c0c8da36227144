"""A whole training step on one device: every layer's forward and backward
(`layer_cost`) for each micro-batch, the embedding and head, the gradient
all-reduce (or FSDP's gathers and reduce-scatters), the optimizer update,
and a memory estimate."""

from __future__ import annotations

import dataclasses

from jmoe.config import MoEConfig
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
        """`moe` with this setting's maths and execution knobs."""
        return moe.replace(dispatch=self.dispatch, capacity_factor=self.capacity_factor,
                           ep_recv_factor=self.ep_recv_factor).with_execution(
            overlap_chunks=self.overlap_chunks, a2a_hierarchy=self.a2a_hierarchy)


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


def activation_bytes(gpt: GPTConfig, tokens: int, moe_rows: float, recv_rows: float) -> float:
    """Rough bytes of activations kept for the backward of one micro-batch."""
    b = dtype_bytes(gpt.dtype)
    d, h, j, k = gpt.d_model, gpt.num_heads, gpt.kv_heads, gpt.head_size
    attn = tokens * b * (3 * d + 2 * h * k + 2 * j * k)
    if gpt.moe is not None and not gpt.dense:
        m = gpt.moe
        ffn_moe = (tokens * b * 3 * d + moe_rows * b * (2 * d + (m.expert_matrices + 1) * m.d_ff)
                   + tokens * m.num_experts * 4 * 3)
    else:
        ffn_moe = 0.0
    ffn_dense = tokens * b * (3 * d + 3 * gpt.dense_hidden) if (
        gpt.dense or len(gpt.moe_layers) < gpt.num_layers) else 0.0
    per_layer = [attn + (ffn_moe if gpt.is_moe_layer(i) else ffn_dense)
                 for i in range(gpt.num_layers)]
    logits = tokens * gpt.vocab_size * 4 * 2  # fp32 logits and their gradient
    work = recv_rows * d * b * 3
    remat = gpt.execution.remat
    if remat == "full":
        return gpt.num_layers * tokens * d * b + max(per_layer) + logits + work
    if remat == "dots":
        saved = tokens * b * (2 * h * k + 2 * j * k + d)
        return gpt.num_layers * saved + max(per_layer) + logits + work
    return sum(per_layer) + logits + work


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
    moe_rows = recv_rows = 0.0
    if n_moe:
        m = setting.layer(gpt.moe)
        load_E = load_distribution(load, m.num_experts)
        lc = moe_layer_cost(m, tokens, setting.ep, hw, load_E=load_E, remat=remat,
                            dtype=gpt.dtype, backend=backend)
        layers["moe"] = (lc, n_moe)
        drop = lc.drop_fraction
        moe_rows = lc.detail.get("exchange_rows", lc.detail.get("rows_per_device", 0.0))
        recv_rows = lc.detail.get("recv_rows", 0.0)
    if n_dense:
        layers["dense_ffn"] = (dense_ffn_cost(gpt.d_model, gpt.dense_hidden, gpt.activation,
                                              tokens, prim, remat), n_dense)
    layers["embed_head"] = (_embed_head_cost(gpt, tokens, prim), 1)
    sync = _gradient_sync(gpt, setting, devices, layers, hw)
    pb = dtype_bytes(gpt.param_dtype)
    # AdamW: read param, grad, mu, nu; write param, mu, nu (param_dtype).
    opt = prim.mem(sync.params_per_device * pb * 7, kernels=8)
    state = sync.params_per_device * pb * (4 + (1 if accum > 1 else 0))
    act = activation_bytes(gpt, tokens, moe_rows, recv_rows) + sync.gathered_bytes
    mem = {"state": state, "activations": act, "total": state + act,
           "capacity": hw.mem_bytes, "params_per_device": sync.params_per_device}
    return StepCost(setting, layers, accum, sync.time, sync.exposed, opt, hw.launch_overhead,
                    mem, drop)
