"""The HF MoE decoders (Mixtral, Qwen2-MoE, Qwen3-MoE, GPT-OSS, DeepSeek-V3) as pure JAX.

A separate model from `jmoe.model.GPT` because these families differ from it
in ways a GPT option would only blur (per-head q/k norms, qkv biases, RMSNorm
scales, rotate-half RoPE, dense layers between MoE ones). The MoE block is
jmoe's own layer (`jmoe.moe.moe_apply`), so expert parallelism, dropless
dispatch and the grouped matmul work as for the GPT.

Parameters (a pytree of arrays; `jmoe.hf.load` fills them from a checkpoint):

    {"embed": {"w_VD"}, "final_norm": {"scale_D"}, "lm_head": {"w_DV"} (untied only),
     "layers": [{"attn_norm": {"scale_D"}, "mlp_norm": {"scale_D"},
                 "attn": {"w_q_DHQ", "w_k_DJQ", "w_v_DJQ", "w_o_HQD",
                          ["b_q_HQ", "b_k_JQ", "b_v_JQ"], ["b_o_D"], ["q_norm_Q", "k_norm_Q"],
                          ["sinks_H"]}
                         | MLA: {["w_qa_DL", "q_a_norm_L", "w_qb_LHN"] | ["w_q_DHN"],
                                 "w_kva_DC", "kv_a_norm_C", "w_kvb_CHN", "w_o_HUD"},
                 "moe": <jmoe.init_params layout> | "mlp": {"w_gate_DF", "w_up_DF", "w_down_FD"},
                 ["moe_bias": {"bias_E"}]},   # DeepSeek-V3's selection bias
                ...]}

A KV cache (`init_cache`) is a list over layers of {"k_BSJQ", "v_BSJQ"}
(MLA: the latent and the rotary key, {"ckv_BSC", "krot_BSR"}) with S slots
fixed up front: prefill writes positions 0..T-1, each decode
step writes one position per row, so both jit once.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jmoe import experts
from jmoe.hf.config import HFConfig
from jmoe.moe import moe_apply
from jmoe.sharding.specs import TOKEN_AXES

Params = Any


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """HF RMSNorm: normalise in float32, scale after casting back."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * y.astype(x.dtype)


def rope_frequencies(q: int, theta: float, yarn: tuple = ()) -> tuple[np.ndarray, float]:
    """(inverse frequencies [Q/2], cos/sin scale): plain RoPE, or YaRN (Peng et al.;
    transformers' `_compute_yarn_parameters`): low frequencies interpolated by
    `factor`, high ones kept, a linear ramp between, and an attention factor."""
    pos_freqs = theta ** (np.arange(0, q, 2, dtype=np.float32) / q)
    if not yarn:
        return (1.0 / pos_freqs).astype(np.float32), 1.0
    factor, beta_fast, beta_slow, orig, truncate, attention_factor = yarn
    if not attention_factor:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

    def correction_dim(rotations):
        return q * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, q - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(q // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate
    inv = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv.astype(np.float32), float(attention_factor)


def rope(x_BTNQ: jax.Array, positions_BT: jax.Array, theta: float, yarn: tuple = ()) -> jax.Array:
    """Rotate-half RoPE (HF's layout: the two halves of each head are the pairs)."""
    q = x_BTNQ.shape[-1]
    inv_freq, scale = rope_frequencies(q, theta, yarn)
    ang_BTq = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    ang_BTQ = jnp.concatenate([ang_BTq, ang_BTq], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(ang_BTQ) * scale, jnp.sin(ang_BTQ) * scale
    x1, x2 = jnp.split(x_BTNQ.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x_BTNQ * cos + rotated * sin).astype(x_BTNQ.dtype)


def attention(p: Params, x_BTD: jax.Array, positions_BT: jax.Array, cfg: HFConfig,
              cache: Optional[dict], window: int = 0) -> tuple[jax.Array, Optional[dict]]:
    """Grouped-query causal attention (within `window` positions when > 0, with
    GPT-OSS's sinks when configured); with `cache`, over its S slots."""
    dt = x_BTD.dtype
    w = lambda name: p[name].astype(dt)
    q_BTHQ = jnp.einsum("btd,dhq->bthq", x_BTD, w("w_q_DHQ"))
    k_BTJQ = jnp.einsum("btd,djq->btjq", x_BTD, w("w_k_DJQ"))
    v_BTJQ = jnp.einsum("btd,djq->btjq", x_BTD, w("w_v_DJQ"))
    if cfg.qkv_bias:
        q_BTHQ, k_BTJQ, v_BTJQ = q_BTHQ + w("b_q_HQ"), k_BTJQ + w("b_k_JQ"), v_BTJQ + w("b_v_JQ")
    if cfg.qk_norm:
        q_BTHQ = rms_norm(q_BTHQ, p["q_norm_Q"], cfg.rms_eps)
        k_BTJQ = rms_norm(k_BTJQ, p["k_norm_Q"], cfg.rms_eps)
    q_BTHQ = rope(q_BTHQ, positions_BT, cfg.rope_theta, cfg.rope_yarn)
    k_BTJQ = rope(k_BTJQ, positions_BT, cfg.rope_theta, cfg.rope_yarn)
    if cache is None:
        k_BSJQ, v_BSJQ, kpos_BS = k_BTJQ, v_BTJQ, positions_BT
    else:
        # Each row writes its own positions (rows of a batch may be at different ones).
        b_B1 = jnp.arange(x_BTD.shape[0])[:, None]
        k_BSJQ = cache["k_BSJQ"].at[b_B1, positions_BT].set(k_BTJQ.astype(cache["k_BSJQ"].dtype))
        v_BSJQ = cache["v_BSJQ"].at[b_B1, positions_BT].set(v_BTJQ.astype(cache["v_BSJQ"].dtype))
        cache = {"k_BSJQ": k_BSJQ, "v_BSJQ": v_BSJQ}
        kpos_BS = jnp.broadcast_to(jnp.arange(k_BSJQ.shape[1]), (x_BTD.shape[0], k_BSJQ.shape[1]))
    b, t, h, q = q_BTHQ.shape
    j = cfg.num_kv_heads
    # Query head h reads key/value head h // (H/J) (HF's repeat_kv).
    q_BTJRQ = q_BTHQ.reshape(b, t, j, h // j, q)
    s_BJRTS = jnp.einsum("btjrq,bsjq->bjrts", q_BTJRQ, k_BSJQ.astype(dt),
                         preferred_element_type=jnp.float32) / math.sqrt(q)
    qpos, kpos = positions_BT[:, None, None, :, None], kpos_BS[:, None, None, None, :]
    ok = kpos <= qpos
    if window:
        ok &= qpos - kpos < window
    s_BJRTS = jnp.where(ok, s_BJRTS, -jnp.inf)
    if cfg.attn_sinks:
        # A per-head logit that joins every softmax and takes its share of the
        # mass, but contributes no value (GPT-OSS).
        sink_11JR1 = p["sinks_H"].astype(jnp.float32).reshape(1, j, h // j, 1, 1)
        sink_BJRT1 = jnp.broadcast_to(sink_11JR1, s_BJRTS.shape[:-1] + (1,))
        a_BJRTS = jax.nn.softmax(jnp.concatenate([s_BJRTS, sink_BJRT1], -1), -1)[..., :-1]
        a_BJRTS = a_BJRTS.astype(dt)
    else:
        a_BJRTS = jax.nn.softmax(s_BJRTS, axis=-1).astype(dt)
    o_BTJRQ = jnp.einsum("bjrts,bsjq->btjrq", a_BJRTS, v_BSJQ.astype(dt))
    out_BTD = jnp.einsum("bthq,hqd->btd", o_BTJRQ.reshape(b, t, h, q), w("w_o_HQD"))
    if cfg.o_bias:
        out_BTD = out_BTD + w("b_o_D")
    return out_BTD, cache


def _deinterleave(x: jax.Array) -> jax.Array:
    """(x0, x1), (x2, x3), ... pairs -> rotate-half's halves (x0, x2, ..., x1, x3, ...).
    Queries and keys are permuted alike, so their dot products are unchanged."""
    return jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def attention_mla(p: Params, x_BTD: jax.Array, positions_BT: jax.Array, cfg: HFConfig,
                  cache: Optional[dict]) -> tuple[jax.Array, Optional[dict]]:
    """DeepSeek's multi-head latent attention. Keys and values come from a
    compressed latent (kv_lora_rank wide, RMS-normed) plus one rotary key shared
    by all heads; the cache holds only those two ({"ckv_BSC", "krot_BSR"})."""
    dt = x_BTD.dtype
    w = lambda name: p[name].astype(dt)
    ql, kl, nope, rot, vd = cfg.mla
    if ql:
        c_BTL = rms_norm(x_BTD @ w("w_qa_DL"), p["q_a_norm_L"], cfg.rms_eps)
        q_BTHN = jnp.einsum("btl,lhn->bthn", c_BTL, w("w_qb_LHN"))
    else:
        q_BTHN = jnp.einsum("btd,dhn->bthn", x_BTD, w("w_q_DHN"))
    kv_BTC = x_BTD @ w("w_kva_DC")
    ckv_BTC = rms_norm(kv_BTC[..., :kl], p["kv_a_norm_C"], cfg.rms_eps)
    krot_BTR = kv_BTC[..., kl:]
    q_rot = q_BTHN[..., nope:]
    if cfg.rope_interleave:
        q_rot, krot_BTR = _deinterleave(q_rot), _deinterleave(krot_BTR)
    q_rot = rope(q_rot, positions_BT, cfg.rope_theta, cfg.rope_yarn)
    krot_BTR = rope(krot_BTR[:, :, None], positions_BT, cfg.rope_theta, cfg.rope_yarn)[:, :, 0]
    q_BTHN = jnp.concatenate([q_BTHN[..., :nope], q_rot], axis=-1)
    if cache is None:
        ckv_BSC, krot_BSR, kpos_BS = ckv_BTC, krot_BTR, positions_BT
    else:
        b_B1 = jnp.arange(x_BTD.shape[0])[:, None]
        ckv_BSC = cache["ckv_BSC"].at[b_B1, positions_BT].set(
            ckv_BTC.astype(cache["ckv_BSC"].dtype))
        krot_BSR = cache["krot_BSR"].at[b_B1, positions_BT].set(
            krot_BTR.astype(cache["krot_BSR"].dtype))
        cache = {"ckv_BSC": ckv_BSC, "krot_BSR": krot_BSR}
        kpos_BS = jnp.broadcast_to(jnp.arange(ckv_BSC.shape[1]), ckv_BSC.shape[:2])
    kv_BSHN = jnp.einsum("bsc,chn->bshn", ckv_BSC.astype(dt), w("w_kvb_CHN"))
    k_nope_BSHN, v_BSHU = kv_BSHN[..., :nope], kv_BSHN[..., nope:]
    s_BHTS = (jnp.einsum("bthn,bshn->bhts", q_BTHN[..., :nope], k_nope_BSHN,
                         preferred_element_type=jnp.float32)
              + jnp.einsum("bthr,bsr->bhts", q_BTHN[..., nope:], krot_BSR.astype(dt),
                           preferred_element_type=jnp.float32)) * cfg.softmax_scale
    ok = kpos_BS[:, None, None, :] <= positions_BT[:, None, :, None]
    a_BHTS = jax.nn.softmax(jnp.where(ok, s_BHTS, -jnp.inf), axis=-1).astype(dt)
    o_BTHU = jnp.einsum("bhts,bshu->bthu", a_BHTS, v_BSHU)
    return jnp.einsum("bthu,hud->btd", o_BTHU, w("w_o_HUD")), cache


def _moe_mesh(num_tokens: int):
    """None (the active mesh, expert-parallel) when the tokens split evenly over
    its token shards, else False: a decode step of B rows runs the local layer
    (GSPMD partitions it) rather than fail the expert-parallel split."""
    m = jax.sharding.get_abstract_mesh()
    if m is None or not m.axis_names:
        return None
    shards = math.prod(m.shape[a] for a in TOKEN_AXES if a in m.axis_names)
    return None if num_tokens % shards == 0 else False


def forward(params: Params, ids_BT: jax.Array, cfg: HFConfig, *,
            positions_BT: Optional[jax.Array] = None, cache: Optional[list] = None,
            decode: bool = False) -> tuple[jax.Array, Optional[list], list]:
    """Token ids [B, T] -> (float32 logits [B, T, V], updated cache, per-MoE-layer MoEAux).

    positions_BT: absolute positions (default 0..T-1); with a cache they are
    also the slots written. `decode` uses the MoE layer's decode alignment.
    """
    b, t = ids_BT.shape
    dt = jnp.dtype(cfg.dtype)
    if positions_BT is None:
        positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x_BTD = jnp.take(params["embed"]["w_VD"], ids_BT, axis=0).astype(dt)
    moe_cfg = cfg.moe_config(decode=decode)
    new_cache, auxes = [] if cache is not None else None, []
    for i, lp in enumerate(params["layers"]):
        with jax.named_scope(f"layer{i}"):
            h_BTD = rms_norm(x_BTD, lp["attn_norm"]["scale_D"], cfg.rms_eps)
            layer_cache = None if cache is None else cache[i]
            if cfg.mla:
                a_BTD, c = attention_mla(lp["attn"], h_BTD, positions_BT, cfg, layer_cache)
            else:
                a_BTD, c = attention(lp["attn"], h_BTD, positions_BT, cfg, layer_cache,
                                     cfg.window(i))
            if cache is not None:
                new_cache.append(c)
            x_BTD = x_BTD + a_BTD
            h_BTD = rms_norm(x_BTD, lp["mlp_norm"]["scale_D"], cfg.rms_eps)
            if "moe" in lp:
                mesh = _moe_mesh(b * t)
                bias_E = lp["moe_bias"]["bias_E"] if "moe_bias" in lp else None
                y_BTD, aux = moe_apply(lp["moe"], h_BTD, moe_cfg, bias=bias_E, mesh=mesh)
                auxes.append(aux)
            else:
                y_BTD = experts.dense_mlp(h_BTD, lp["mlp"], "swiglu")
            x_BTD = x_BTD + y_BTD
    x_BTD = rms_norm(x_BTD, params["final_norm"]["scale_D"], cfg.rms_eps)
    if cfg.tie_embeddings:
        logits_BTV = jnp.einsum("btd,vd->btv", x_BTD, params["embed"]["w_VD"].astype(dt),
                                preferred_element_type=jnp.float32)
    else:
        logits_BTV = jnp.einsum("btd,dv->btv", x_BTD, params["lm_head"]["w_DV"].astype(dt),
                                preferred_element_type=jnp.float32)
    return logits_BTV, new_cache, auxes


def init_cache(cfg: HFConfig, batch: int, max_len: int, dtype=None) -> list:
    """A zero KV cache of `max_len` slots per row: [{"k_BSJQ", "v_BSJQ"}] per layer."""
    dt = jnp.dtype(dtype or cfg.dtype)
    if cfg.mla:
        _, kl, _, rot, _ = cfg.mla
        return [{"ckv_BSC": jnp.zeros((batch, max_len, kl), dt),
                 "krot_BSR": jnp.zeros((batch, max_len, rot), dt)}
                for _ in range(cfg.num_layers)]
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return [{"k_BSJQ": jnp.zeros(shape, dt), "v_BSJQ": jnp.zeros(shape, dt)}
            for _ in range(cfg.num_layers)]
