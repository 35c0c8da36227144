"""The DeepSeek-V3 and GPT-OSS MoE blocks, and the layer options GPT-OSS needs.

Block parity: against the block's output as transformers computed it
(scripts/make_hf_fixtures.py). Options: against a per-token NumPy loop that
writes each formula out (router bias, top-k-then-softmax, expert biases,
clamped SwiGLU).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe
from jmoe import experts, routing
from jmoe.config import MoEConfig
from jmoe.hf.blocks import load_moe_block
from jmoe.sharding.mesh import make_mesh

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "hf")


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def test_deepseek_v3_block_matches_transformers():
    cfg, params, bias = load_moe_block(os.path.join(FIX, "deepseek_v3_moe"))
    exp = np.load(os.path.join(FIX, "deepseek_v3_moe", "expected.npz"))
    run = jax.jit(lambda p, x, b: jmoe.moe_apply(p, x, cfg, bias=b)[0])
    y = run(params, exp["x"], bias)
    assert _rel(y, exp["y"]) < 1e-4
    # The fixture exercises groups, scaling, shared experts and the selection bias.
    assert cfg.n_group == 4 and cfg.topk_group == 2 and cfg.routed_scaling_factor == 2.5
    assert cfg.num_shared_experts == 1 and float(jnp.max(jnp.abs(bias))) > 0
    y0 = run(params, exp["x"], jnp.zeros_like(bias))
    assert _rel(y0, exp["y"]) > 1e-3  # without the bias some tokens pick other experts


def test_gpt_oss_block_matches_transformers():
    cfg, params, bias = load_moe_block(os.path.join(FIX, "gpt_oss_moe"))
    exp = np.load(os.path.join(FIX, "gpt_oss_moe", "expected.npz"))
    assert bias is None and cfg.router == "topk_softmax" and cfg.swiglu_limit == 1.5
    y, _ = jax.jit(lambda p, x: jmoe.moe_apply(p, x, cfg))(params, exp["x"])
    assert _rel(y, exp["y"]) < 1e-4
    # The clamp bites on these inputs (else the limit would go untested).
    x = exp["x"].reshape(-1, cfg.d_model)
    gate = np.einsum("td,edf->tef", x, np.asarray(params["experts"]["w_gate_EDF"]))
    assert (gate + np.asarray(params["experts"]["b_gate_EF"])[None] > cfg.swiglu_limit).any()


# ---------------------------------------------------- layer options ----

def _ref_layer(p, x_TD, cfg):
    """Per token: logits + b, top-k, softmax over the k, each expert's biased clamped SwiGLU."""
    p = jax.tree.map(np.asarray, p)
    w = p["experts"]
    out = np.zeros_like(x_TD)
    for t, x in enumerate(x_TD):
        logits = x @ p["router"]["w_DE"] + p["router"].get("b_E", 0)
        top = np.argsort(-logits)[:cfg.top_k]
        wts = np.exp(logits[top] - logits[top].max())
        wts /= wts.sum()
        for e, a in zip(top, wts):
            g = x @ w["w_gate_EDF"][e] + w.get("b_gate_EF", np.zeros((9, 1)))[e]
            u = x @ w["w_up_EDF"][e] + w.get("b_up_EF", np.zeros((9, 1)))[e]
            if cfg.activation == "swiglu_clamped":
                g = np.minimum(g, cfg.swiglu_limit)
                h = (np.clip(u, -cfg.swiglu_limit, cfg.swiglu_limit) + 1) * g / (
                    1 + np.exp(-cfg.swiglu_alpha * g))
            else:
                h = g / (1 + np.exp(-g)) * u
            out[t] += a * (h @ w["w_down_EFD"][e] + w.get("b_down_ED", np.zeros((9, 1)))[e])
    return out


def _gpt_oss_cfg(**kw):
    base = dict(d_model=16, d_ff=12, num_experts=4, top_k=2, router="topk_softmax",
                renormalize=False, router_bias=True, expert_bias=True,
                activation="swiglu_clamped", swiglu_alpha=1.3, swiglu_limit=0.8, group_align=4)
    base.update(kw)
    return MoEConfig(**base)


def _random_params(cfg, seed=0):
    p = jmoe.init_params(jax.random.key(seed), cfg)
    ks = iter(jax.random.split(jax.random.key(seed + 1), 8))
    # Biases start at zero; random ones show whether each is applied.
    p = jax.tree.map(lambda a: a, p)
    for name in ("b_gate_EF", "b_up_EF", "b_down_ED"):
        if name in p["experts"]:
            p["experts"][name] = jax.random.normal(next(ks), p["experts"][name].shape)
    if "b_E" in p["router"]:
        p["router"]["b_E"] = jax.random.normal(next(ks), p["router"]["b_E"].shape)
    return p


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_gpt_oss_options_equal_the_formulas(dispatch):
    cfg = _gpt_oss_cfg(dispatch=dispatch, capacity_factor=4.0)
    p = _random_params(cfg)
    x = 2.0 * np.asarray(jax.random.normal(jax.random.key(5), (24, 16)))
    y, aux = jax.jit(lambda p, x: jmoe.moe_apply(p, x, cfg))(p, x)
    assert float(aux.dropped_fraction) == 0.0
    np.testing.assert_allclose(np.asarray(y), _ref_layer(p, x, cfg), rtol=1e-5, atol=1e-5)
    if dispatch != "dropless":
        return
    # Each option took effect: dropping it changes the output.
    for off in (dict(router_bias=False), dict(expert_bias=False), dict(activation="swiglu")):
        cfg_off = cfg.replace(**off)
        p_off = jmoe.init_params(jax.random.key(0), cfg_off)
        p_off = {"router": {"w_DE": p["router"]["w_DE"], **(
                     {"b_E": p["router"]["b_E"]} if cfg_off.router_bias else {})},
                 "experts": {k: v for k, v in p["experts"].items() if k in p_off["experts"]}}
        y_off, _ = jax.jit(lambda p, x: jmoe.moe_apply(p, x, cfg_off))(p_off, x)
        assert np.max(np.abs(np.asarray(y_off) - np.asarray(y))) > 1e-2, off


def test_batched_experts_apply_the_biases():
    """The [E, C, D] capacity-buffer path (expert choice, expert parallel) adds the same biases."""
    cfg = _gpt_oss_cfg()
    w = _random_params(cfg)["experts"]
    x_ECD = np.asarray(jax.random.normal(jax.random.key(2), (4, 3, 16)))
    y = experts.batched_mlp(x_ECD, w, cfg.activation, cfg.swiglu_alpha, cfg.swiglu_limit)
    wn = jax.tree.map(np.asarray, w)
    for e in range(4):
        g = np.minimum(x_ECD[e] @ wn["w_gate_EDF"][e] + wn["b_gate_EF"][e], 0.8)
        u = np.clip(x_ECD[e] @ wn["w_up_EDF"][e] + wn["b_up_EF"][e], -0.8, 0.8)
        ref = ((u + 1) * g / (1 + np.exp(-1.3 * g))) @ wn["w_down_EFD"][e] + wn["b_down_ED"][e]
        np.testing.assert_allclose(np.asarray(y[e]), ref, rtol=1e-5, atol=1e-5)


def test_topk_softmax_router_formula():
    logits = np.array([[0.1, 2.0, -1.0, 1.5], [3.0, -2.0, 0.0, 0.5]], np.float32)
    b = np.array([0.0, -1.0, 0.0, 0.0], np.float32)
    r = routing.topk_softmax(jnp.asarray(logits), 2, jnp.asarray(b))
    z = logits + b
    for t in range(2):
        top = np.argsort(-z[t])[:2]
        np.testing.assert_array_equal(np.asarray(r.experts_TK[t]), top)
        np.testing.assert_allclose(np.asarray(r.weights_TK[t]),
                                   np.exp(z[t, top]) / np.exp(z[t, top]).sum(), rtol=1e-6)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_gpt_oss_options_run_expert_parallel(dispatch):
    """Router bias, expert biases and the clamped SwiGLU on a (2, 4) mesh:
    forward and every gradient equal the one-device layer's (which equals
    the formulas above)."""
    cfg = _gpt_oss_cfg(dispatch=dispatch, capacity_factor=8.0)
    p = _random_params(cfg)
    x = 2.0 * jax.random.normal(jax.random.key(5), (32, 16))
    ct = jax.random.normal(jax.random.key(6), x.shape)

    def fwd_bwd(mesh):
        f = lambda p, x: jmoe.moe_apply(p, x, cfg, mesh=mesh)[0]
        y, vjp = jax.vjp(f, p, x)
        return y, vjp(ct)
    want = jax.jit(lambda: fwd_bwd(False))()
    got = jax.jit(lambda: fwd_bwd(make_mesh(data=2, expert=4)))()
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5,
                                   atol=1e-5 * float(np.max(np.abs(np.asarray(w)))))


def test_expert_biases_refuse_a_tensor_axis():
    cfg = _gpt_oss_cfg()
    with pytest.raises(ValueError, match="expert biases cannot run with a tensor axis of size 2"):
        jmoe.moe_apply(_random_params(cfg), jnp.zeros((8, 16)), cfg,
                       mesh=make_mesh(data=1, expert=4, tensor=2))


def test_option_errors_name_the_field():
    with pytest.raises(ValueError, match="router_bias"):
        MoEConfig(d_model=8, d_ff=8, router_bias=True)
    with pytest.raises(ValueError, match="swiglu_limit"):
        _gpt_oss_cfg(swiglu_limit=0.0)
