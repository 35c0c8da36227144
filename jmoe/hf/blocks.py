"""The MoE blocks of DeepSeek-V3 and GPT-OSS as jmoe layers.

    cfg, params, bias_E = jmoe.hf.blocks.load_moe_block("dir", prefix="model.layers.3.mlp")
    y_BTD, aux = jmoe.moe_apply(params, x_BTD, cfg, bias=bias_E)

`dir` holds the model's config.json and safetensors. The block maps onto
`MoEConfig` options, each the family's formula:

* DeepSeek-V3: `sigmoid_topk` (sigmoid affinities, `e_score_correction_bias`
  for selection only, group-limited top-k, `routed_scaling_factor`,
  `norm_topk_prob`) plus `n_shared_experts` always-on experts. The bias is
  returned apart: it is state (`jmoe.RouterBias`), not a trained weight.
* GPT-OSS: `topk_softmax` with a learned router bias, expert biases and the
  clamped SwiGLU (`swiglu_alpha`, `swiglu_limit`); its fused `gate_up_proj`
  interleaves gate and up columns.

Both the fused `[E, ...]` layout (transformers' in-memory one) and the
per-expert one (`experts.{e}.gate_proj.weight`, ...) are read. The full
GPT-OSS model is `jmoe.hf.load`; the full DeepSeek-V3 (MLA attention) is not
implemented.
"""

from __future__ import annotations

import json
import os


from jmoe.config import MoEConfig
from jmoe.hf import config as config_lib
from jmoe.hf.config import UnsupportedCheckpoint
from jmoe.hf.convert import (_copy, _experts, _fused, _interleaved, _interleaved_bias, _linear,
                              _vector, check, place)
from jmoe.hf.safetensors import Checkpoint

BLOCK_FAMILIES = ("deepseek_v3", "gpt_oss")


def _deepseek(raw, pre, keys):
    for key, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
        if raw.get(key) not in (None, want):
            config_lib._fail(key, raw[key], f"the DeepSeek-V3 block implements {want!r}.")
    d, f, e = raw["hidden_size"], raw["moe_intermediate_size"], raw["n_routed_experts"]
    ns = raw.get("n_shared_experts") or 0
    cfg = MoEConfig(d_model=d, d_ff=f, num_experts=e, top_k=raw["num_experts_per_tok"],
                    router="sigmoid_topk", renormalize=bool(raw.get("norm_topk_prob", True)),
                    n_group=raw.get("n_group") or 0, topk_group=raw.get("topk_group") or 0,
                    routed_scaling_factor=raw.get("routed_scaling_factor", 1.0),
                    num_shared_experts=1 if ns else 0, shared_d_ff=f * ns,
                    dispatch="dropless", group_align=8)
    table = [_linear(("router", "w_DE"), f"{pre}.gate.weight", (e, d), (d, e)),
             _copy(("bias", "bias_E"), f"{pre}.gate.e_score_correction_bias", (e,))]
    fused = f"{pre}.experts.gate_up_proj"
    if fused in keys:
        table += [_fused(("experts", "w_gate_EDF"), fused, (e, 2 * f, d), slice(0, f), e, d, f),
                  _fused(("experts", "w_up_EDF"), fused, (e, 2 * f, d), slice(f, 2 * f), e, d, f),
                  _fused(("experts", "w_down_EFD"), f"{pre}.experts.down_proj", (e, d, f),
                         slice(None), e, f, d)]
    else:
        k = lambda n: [f"{pre}.experts.{x}.{n}.weight" for x in range(e)]
        table += [_experts(("experts", "w_gate_EDF"), k("gate_proj"), (f, d)),
                  _experts(("experts", "w_up_EDF"), k("up_proj"), (f, d)),
                  _experts(("experts", "w_down_EFD"), k("down_proj"), (d, f))]
    if ns:
        fs, sp = f * ns, f"{pre}.shared_experts"
        table += [_linear(("shared", "w_gate_DF"), f"{sp}.gate_proj.weight", (fs, d), (d, fs)),
                  _linear(("shared", "w_up_DF"), f"{sp}.up_proj.weight", (fs, d), (d, fs)),
                  _linear(("shared", "w_down_FD"), f"{sp}.down_proj.weight", (d, fs), (fs, d))]
    return cfg, table


def _gpt_oss(raw, pre, keys):
    d, f, e = raw["hidden_size"], raw["intermediate_size"], raw["num_local_experts"]
    cfg = MoEConfig(d_model=d, d_ff=f, num_experts=e, top_k=raw["num_experts_per_tok"],
                    router="topk_softmax", renormalize=False, router_bias=True,
                    expert_bias=True, activation="swiglu_clamped",
                    swiglu_alpha=raw.get("swiglu_alpha", 1.702),
                    swiglu_limit=raw.get("swiglu_limit", 7.0), dispatch="dropless",
                    group_align=8)
    gu, gub = f"{pre}.experts.gate_up_proj", f"{pre}.experts.gate_up_proj_bias"
    table = [_linear(("router", "w_DE"), f"{pre}.router.weight", (e, d), (d, e)),
             _vector(("router", "b_E"), f"{pre}.router.bias", (e,)),
             _interleaved(("experts", "w_gate_EDF"), gu, e, d, f, 0),
             _interleaved(("experts", "w_up_EDF"), gu, e, d, f, 1),
             _interleaved_bias(("experts", "b_gate_EF"), gub, e, f, 0),
             _interleaved_bias(("experts", "b_up_EF"), gub, e, f, 1),
             _copy(("experts", "w_down_EFD"), f"{pre}.experts.down_proj", (e, f, d)),
             _copy(("experts", "b_down_ED"), f"{pre}.experts.down_proj_bias", (e, d))]
    table[-2].expert = True
    return cfg, table


def load_moe_block(path: str, prefix: str = "mlp", *, param_dtype: str = "float32",
                   mesh=None):
    """(MoEConfig, params for `jmoe.moe_apply`, selection bias or None) of the
    MoE block stored under `prefix` in an HF directory."""
    with open(os.path.join(path, "config.json")) as fh:
        raw = json.load(fh)
    mt = raw.get("model_type")
    ck = Checkpoint(path)
    keys = {k for k in ck if k.startswith(prefix + ".")}
    if mt == "deepseek_v3":
        cfg, table = _deepseek(raw, prefix, keys)
    elif mt == "gpt_oss":
        cfg, table = _gpt_oss(raw, prefix, keys)
    else:
        raise UnsupportedCheckpoint(
            f"config.json model_type={mt!r} is not supported by load_moe_block: it reads the "
            f"MoE blocks of {BLOCK_FAMILIES} (full models: jmoe.hf.load).")
    cfg = cfg.replace(param_dtype=param_dtype, dtype=param_dtype)
    # Only this block's tensors are checked for leftovers.
    sub = _Subset(ck, keys)
    check(table, sub, mt)
    params = place(table, sub, mesh, param_dtype)
    bias = params.pop("bias", {}).get("bias_E")
    return cfg, params, bias


class _Subset(Checkpoint):
    """The tensors of `ck` whose names are in `keys`."""

    def __init__(self, ck: Checkpoint, keys):  # shares ck's parsed headers and maps
        self.__dict__.update(ck.__dict__)
        self._entries = {k: v for k, v in ck._entries.items() if k in keys}
