"""`HFConfig`: what jmoe reads from an HF `config.json`, checked up front.

Every option the importer does not implement stops here, with the key, its
value and what is supported, before a tensor is read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional

from jmoe.config import MoEConfig

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")


class UnsupportedCheckpoint(ValueError):
    """A checkpoint (config or tensors) that jmoe.hf cannot import as it is."""


@dataclasses.dataclass(frozen=True)
class HFConfig:
    """One HF MoE decoder (Mixtral / Qwen2-MoE / Qwen3-MoE), in jmoe's names.

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
            top_k=self.top_k, router="softmax_topk", renormalize=self.norm_topk_prob,
            dispatch="dropless", group_align=1 if decode else self.group_align,
            num_shared_experts=1 if self.shared_d_ff else 0, shared_d_ff=self.shared_d_ff,
            shared_gate=self.shared_gate, dtype=self.dtype, param_dtype=self.param_dtype)

    def replace(self, **kw) -> "HFConfig":
        return dataclasses.replace(self, **kw)


def _fail(key: str, value: Any, supported: str) -> None:
    raise UnsupportedCheckpoint(f"config.json {key}={value!r} is not supported: {supported}")


def rope_theta(raw: Mapping[str, Any]) -> float:
    """RoPE base; only plain RoPE ('default') is implemented, any scaling kind stops here."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    for key, d in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = d.get("rope_type", d.get("type", "default"))
        if kind != "default":
            _fail(f"{key}.rope_type", kind, "jmoe.hf implements plain RoPE ('default') only; "
                  "yarn/linear/dynamic/llama3 scaling are not implemented.")
    return float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))


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
    if mt == "mixtral":
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
    if k == 1 and norm:
        _fail("num_experts_per_tok", k, "top-1 with norm_topk_prob (weight always 1) is not "
              "implemented; use top_k >= 2 or norm_topk_prob=false.")
    eos = raw.get("eos_token_id")
    cfg = HFConfig(
        model_type=mt, vocab_size=raw["vocab_size"], d_model=d, num_layers=n, num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads, head_dim=head_dim,
        d_ff=raw.get("intermediate_size", 0), moe_d_ff=moe_d_ff, num_experts=e, top_k=k,
        norm_topk_prob=norm, moe_layers=moe_layers, shared_d_ff=shared,
        shared_gate=bool(shared), rope_theta=rope_theta(raw), rms_eps=raw["rms_norm_eps"],
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)), qkv_bias=qkv_bias,
        o_bias=o_bias, qk_norm=qk_norm, sliding_window=int(window),
        max_positions=raw.get("max_position_embeddings", 4096),
        eos_token_id=eos[0] if isinstance(eos, list) else eos)
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
