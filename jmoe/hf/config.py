"""`HFConfig`: what jmoe reads from an HF `config.json`, checked up front.

Every option the importer does not implement stops here, with the key, its
value and what is supported, before a tensor is read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Optional

from jmoe.config import MoEConfig

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v3")


class UnsupportedCheckpoint(ValueError):
    """A checkpoint (config or tensors) that jmoe.hf cannot import as it is."""


@dataclasses.dataclass(frozen=True)
class HFConfig:
    """One HF MoE decoder (Mixtral / Qwen2-MoE / Qwen3-MoE / GPT-OSS), in jmoe's names.

    Shapes: D = `d_model`, H = `num_heads`, J = `num_kv_heads`, Q = `head_dim`,
    V = `vocab_size`, F = `d_ff` (dense layers), `moe_d_ff` (one expert).
    `moe_layers[i]` says whether layer i is an MoE layer (else a dense MLP).
    """

    model_type: str
    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_ff: int
    moe_d_ff: int
    num_experts: int
    top_k: int
    norm_topk_prob: bool
    moe_layers: tuple[bool, ...]
    shared_d_ff: int = 0           # 0: no shared expert
    shared_gate: bool = False      # sigmoid gate on the shared expert (Qwen2-MoE)
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sliding_window: int = 0        # 0: full causal attention
    sliding_layers: tuple[bool, ...] = ()  # which layers use the window (empty: all)
    attn_sinks: bool = False       # GPT-OSS: a learned per-head logit in each softmax
    # YaRN RoPE (factor, beta_fast, beta_slow, original_max_positions, truncate,
    # attention_factor or 0 to derive it); empty: plain RoPE.
    rope_yarn: tuple = ()
    router: str = "softmax_topk"   # GPT-OSS: "topk_softmax" with router and expert biases
    router_bias: bool = False
    expert_bias: bool = False
    activation: str = "swiglu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # DeepSeek-V3: sigmoid routing with groups and scaling (jmoe's sigmoid_topk) and
    # multi-head latent attention: (q_lora_rank or 0, kv_lora_rank, qk_nope_head_dim,
    # qk_rope_head_dim, v_head_dim); empty: ordinary attention.
    n_group: int = 0
    topk_group: int = 0
    routed_scaling_factor: float = 1.0
    mla: tuple = ()
    rope_interleave: bool = False  # RoPE pairs are (x0, x1), (x2, x3), ... (DeepSeek)
    softmax_scale: float = 0.0     # 0: head_dim ** -0.5
    max_positions: int = 4096
    eos_token_id: Optional[int] = None
    dtype: str = "float32"         # activations; parameters are imported as `param_dtype`
    param_dtype: str = "float32"
    group_align: int = 8           # the MoE layer's dropless group alignment

    def moe_config(self, *, decode: bool = False) -> MoEConfig:
        """The MoE layer of this model. `decode` aligns expert groups to one row:
        a decode step has only B tokens, and padding each expert's few rows
        to `group_align` would multiply its expert work."""
        return MoEConfig(
            d_model=self.d_model, d_ff=self.moe_d_ff, num_experts=self.num_experts,
            top_k=self.top_k, router=self.router,
            renormalize=self.norm_topk_prob and self.router != "topk_softmax",
            n_group=self.n_group, topk_group=self.topk_group,
            routed_scaling_factor=self.routed_scaling_factor,
            dispatch="dropless", group_align=1 if decode else self.group_align,
            num_shared_experts=1 if self.shared_d_ff else 0, shared_d_ff=self.shared_d_ff,
            shared_gate=self.shared_gate, router_bias=self.router_bias,
            expert_bias=self.expert_bias, activation=self.activation,
            swiglu_alpha=self.swiglu_alpha, swiglu_limit=self.swiglu_limit,
            dtype=self.dtype, param_dtype=self.param_dtype)

    def window(self, layer: int) -> int:
        """Layer `layer`'s sliding window (0: full attention)."""
        if self.sliding_layers and not self.sliding_layers[layer]:
            return 0
        return self.sliding_window

    def replace(self, **kw) -> "HFConfig":
        return dataclasses.replace(self, **kw)


def _fail(key: str, value: Any, supported: str) -> None:
    raise UnsupportedCheckpoint(f"config.json {key}={value!r} is not supported: {supported}")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def rope(raw: Mapping[str, Any]) -> tuple[float, tuple, float]:
    """(RoPE base, YaRN parameters or (), softmax scale multiplier); plain RoPE
    and YaRN are implemented, any other scaling kind stops here."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    yarn: tuple = ()
    softmax_mult = 1.0
    for key, d in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = d.get("rope_type", d.get("type", "default"))
        if kind == "yarn":
            if d.get("partial_rotary_factor", 1.0) != 1.0:
                _fail(f"{key}.partial_rotary_factor", d["partial_rotary_factor"],
                      "YaRN on part of the head is not implemented.")
            orig = d.get("original_max_position_embeddings")
            factor = d.get("factor") or raw["max_position_embeddings"] / orig
            ms, ms_all = d.get("mscale"), d.get("mscale_all_dim")
            att = d.get("attention_factor") or (
                yarn_mscale(factor, ms) / yarn_mscale(factor, ms_all) if ms and ms_all
                else yarn_mscale(factor))
            if ms_all and raw.get("model_type") == "deepseek_v3":
                # DeepSeek also scales the attention logits by mscale(mscale_all_dim)^2.
                softmax_mult = yarn_mscale(factor, ms_all) ** 2
            yarn = (float(factor), float(d.get("beta_fast") or 32), float(d.get("beta_slow") or 1),
                    int(orig), bool(d.get("truncate", True)), float(att))
        elif kind != "default":
            _fail(f"{key}.rope_type", kind, "jmoe.hf implements plain RoPE ('default') and "
                  "'yarn'; linear/dynamic/llama3/longrope scaling are not implemented.")
    return float(params.get("rope_theta", raw.get("rope_theta", 10000.0))), yarn, softmax_mult


def from_dict(raw: Mapping[str, Any], **overrides) -> HFConfig:
    """An `HFConfig` from a parsed config.json (overrides: dtype, param_dtype, group_align)."""
    mt = raw.get("model_type")
    if mt not in FAMILIES:
        _fail("model_type", mt, f"jmoe.hf imports full models of {FAMILIES}.")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        _fail("hidden_act", act, "the experts are SwiGLU: only 'silu' is implemented.")
    d, heads = raw["hidden_size"], raw["num_attention_heads"]
    n = raw["num_hidden_layers"]
    head_dim = raw.get("head_dim") or d // heads
    extra: dict = {}
    if mt == "deepseek_v3":
        for key, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
            if raw.get(key) not in (None, want):
                _fail(key, raw[key], f"the DeepSeek-V3 router implements {want!r}.")
        if raw.get("attention_bias"):
            _fail("attention_bias", True, "DeepSeek-V3's attention has no biases in jmoe.hf.")
        e = raw["n_routed_experts"]
        first = raw.get("first_k_dense_replace", 0)
        moe_layers = tuple(i >= first for i in range(n))
        moe_d_ff = raw["moe_intermediate_size"]
        norm = bool(raw.get("norm_topk_prob", True))
        shared = moe_d_ff * (raw.get("n_shared_experts") or 0)
        window, qkv_bias, o_bias, qk_norm = 0, False, False, False
        nope, rot = raw["qk_nope_head_dim"], raw["qk_rope_head_dim"]
        head_dim = nope + rot
        extra = dict(router="sigmoid_topk", n_group=raw.get("n_group") or 0,
                     topk_group=raw.get("topk_group") or 0,
                     routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
                     mla=(raw.get("q_lora_rank") or 0, raw["kv_lora_rank"], nope, rot,
                          raw["v_head_dim"]),
                     rope_interleave=bool(raw.get("rope_interleave", True)))
    elif mt == "gpt_oss":
        e = raw["num_local_experts"]
        moe_layers = (True,) * n
        moe_d_ff = raw["intermediate_size"]
        norm, shared, window = False, 0, raw.get("sliding_window") or 0
        qkv_bias = o_bias = bool(raw.get("attention_bias", True))
        qk_norm = False
        types = raw.get("layer_types") or [
            "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
        for t in types:
            if t not in ("sliding_attention", "full_attention"):
                _fail("layer_types", t, "gpt_oss layers are 'sliding_attention' or "
                      "'full_attention'.")
        extra = dict(sliding_layers=tuple(t == "sliding_attention" for t in types),
                     attn_sinks=True, router="topk_softmax", router_bias=True,
                     expert_bias=True, activation="swiglu_clamped",
                     swiglu_alpha=float(raw.get("swiglu_alpha", 1.702)),
                     swiglu_limit=float(raw.get("swiglu_limit", 7.0)))
    elif mt == "mixtral":
        e = raw["num_local_experts"]
        moe_layers = (True,) * n
        moe_d_ff = raw["intermediate_size"]
        norm, shared, window = True, 0, raw.get("sliding_window") or 0
        qkv_bias = o_bias = qk_norm = False
    else:
        e = raw.get("num_experts", raw.get("num_local_experts"))
        step = raw.get("decoder_sparse_step", 1)
        only = set(raw.get("mlp_only_layers") or ())
        moe_layers = tuple(i not in only and e > 0 and (i + 1) % step == 0 for i in range(n))
        moe_d_ff = raw["moe_intermediate_size"]
        norm = bool(raw.get("norm_topk_prob", mt == "qwen3_moe"))
        if raw.get("use_sliding_window"):
            _fail("use_sliding_window", True, "Qwen's per-layer sliding window (max_window_layers) "
                  "is not implemented; set it false for full attention.")
        window = 0
        if mt == "qwen2_moe":
            shared = raw.get("shared_expert_intermediate_size", 0)
            qkv_bias, o_bias, qk_norm = bool(raw.get("qkv_bias", True)), False, False
        else:
            shared = 0
            qkv_bias = o_bias = bool(raw.get("attention_bias", False))
            qk_norm = True
    k = raw["num_experts_per_tok"]
    theta, yarn, softmax_mult = rope(raw)
    if "mla" in extra:
        extra["softmax_scale"] = head_dim ** -0.5 * softmax_mult
    if k == 1 and norm:
        _fail("num_experts_per_tok", k, "top-1 with norm_topk_prob (weight always 1) is not "
              "implemented; use top_k >= 2 or norm_topk_prob=false.")
    eos = raw.get("eos_token_id")
    cfg = HFConfig(
        model_type=mt, vocab_size=raw["vocab_size"], d_model=d, num_layers=n, num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads, head_dim=head_dim,
        d_ff=raw.get("intermediate_size", 0), moe_d_ff=moe_d_ff, num_experts=e, top_k=k,
        norm_topk_prob=norm, moe_layers=moe_layers, shared_d_ff=shared,
        shared_gate=bool(shared) and mt == "qwen2_moe", rope_theta=theta, rope_yarn=yarn,
        rms_eps=raw["rms_norm_eps"],
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)), qkv_bias=qkv_bias,
        o_bias=o_bias, qk_norm=qk_norm, sliding_window=int(window),
        max_positions=raw.get("max_position_embeddings", 4096),
        eos_token_id=eos[0] if isinstance(eos, list) else eos, **extra)
    if heads % cfg.num_kv_heads:
        _fail("num_key_value_heads", cfg.num_kv_heads,
              f"must divide num_attention_heads={heads} (grouped-query attention).")
    return cfg.replace(**overrides)


def load_config(path: str, **overrides) -> tuple[HFConfig, dict]:
    """(HFConfig, the raw dict) from `path/config.json`."""
    fpath = os.path.join(path, "config.json")
    if not os.path.exists(fpath):
        raise FileNotFoundError(f"{path} has no config.json: point jmoe.hf at a directory "
                                "written by save_pretrained.")
    with open(fpath) as f:
        raw = json.load(f)
    return from_dict(raw, **overrides), raw
