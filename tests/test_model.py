"""The GPT-MoE model (jmoe/model.py) and the shapes of configs/gpt_moe.py."""

import dataclasses
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jmoe import model as M
from jmoe import model_config
from jmoe.model_config import ModelExecution
from cfg_helpers import gpt_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_gpt_moe_config(arg=None):
    spec = importlib.util.spec_from_file_location("gpt_moe", os.path.join(ROOT, "configs",
                                                                          "gpt_moe.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def tiny(**kw):
    m = dict(vocab_size=64, d_model=32, num_layers=3, num_heads=4, d_ff=16, num_experts=4,
             top_k=2, group_align=1)
    m.update(kw)
    return gpt_config(m)


def apply(model, tokens, train=False):
    """The model's forward pass, jitted (eager dispatch of every op is slow)."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, t: nnx.merge(graphdef, s)(t, train=train))(state, tokens)


def n_params(cfg):
    graphdef_params = jax.eval_shape(lambda: nnx.state(M.GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    return M.count_params(graphdef_params)


def test_forward_shapes_and_aux():
    cfg = tiny(moe_every=2, num_kv_heads=2, num_shared_experts=1)
    assert cfg.moe_layers == (1,)
    model = M.init_model(cfg, 0)
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 64)
    logits, aux = apply(model, tokens, train=True)
    assert logits.shape == (2, 12, 64) and logits.dtype == jnp.float32
    assert aux.expert_load.shape == (1, 4) and aux.load_balance_loss.shape == (1,)
    np.testing.assert_allclose(aux.expert_load.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_causal(dispatch):
    # Capacity factor high enough that nothing is dropped: with drops, a later
    # token can take an earlier token's slot (inherent to capacity routing).
    cfg = tiny(dispatch=dispatch, capacity_factor=4.0)
    model = M.init_model(cfg, 1)
    t1 = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    t2 = t1.at[:, 9:].set((t1[:, 9:] + 5) % 64)
    l1, _ = apply(model, t1)
    l2, _ = apply(model, t2)
    np.testing.assert_allclose(l1[:, :9], l2[:, :9], atol=1e-5)
    assert np.abs(l1[:, 9:] - l2[:, 9:]).max() > 1e-3


def test_dense_switch_has_equal_active_params():
    for kw in [dict(), dict(num_shared_experts=2, shared_d_ff=8), dict(activation="gelu"),
               dict(moe_every=2, first_dense_layers=1)]:
        moe = tiny(**kw)
        dense = dataclasses.replace(moe, dense=True)
        assert dense.moe_layers == ()
        c_moe, c_dense = model_config.param_count_formula(moe), model_config.param_count_formula(dense)
        assert n_params(moe) == c_moe["total"] and n_params(dense) == c_dense["total"]
        router = len(moe.moe_layers) * moe.d_model * moe.moe.num_experts
        # Same active weights; the dense model just has no router.
        assert c_dense["active"] == c_moe["active"] - router
        assert c_dense["total"] == c_dense["active"] < c_moe["total"]
        assert model_config.flops_per_token(dense, 64) < model_config.flops_per_token(moe, 64)


def test_remat_and_dtypes_keep_the_function():
    cfg = tiny(num_layers=1)
    tokens = jax.random.randint(jax.random.key(2), (2, 8), 0, 64)

    def loss(c):
        model = M.init_model(c, 0)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def f(p):
            logits, _ = nnx.merge(graphdef, p, rest)(tokens)
            return jnp.mean(logits ** 2)

        return jax.jit(jax.value_and_grad(f))(params)

    v0, g0 = loss(cfg)
    for remat in ("full", "dots"):  # same function, same gradients
        v1, g1 = loss(dataclasses.replace(cfg, execution=ModelExecution(remat=remat)))
        np.testing.assert_allclose(v0, v1, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)
    bf = gpt_config(dict(vocab_size=64, d_model=32, num_layers=1, num_heads=4, d_ff=16,
                            num_experts=4, top_k=2, group_align=1, dtype="bfloat16"))
    model = M.init_model(bf, 0)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    logits, _ = apply(model, tokens)
    ref, _ = apply(M.init_model(cfg, 0), tokens)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, ref, atol=0.15)


@pytest.mark.parametrize("kw,field", [
    (dict(num_heads=5), "config.model.num_heads"),
    (dict(num_kv_heads=3), "config.model.num_kv_heads"),
    (dict(remat="some"), "config.execution.remat"),
    (dict(top_k=9), "top_k"),
    (dict(router="hash"), "router"),
    (dict(d_modle=8), "config.model.d_modle is not a field of config.model: did you mean 'd_model'"),
])
def test_bad_model_config_raises_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        tiny(**kw)


# Published sizes: Mixtral-8x7B 46.7B total / 12.9B active; DeepSeekMoE-16B
# 16.4B total / 2.8B active.
@pytest.mark.parametrize("variant,total,active", [
    ("default", None, None), ("small", None, None), ("medium", None, None),
    ("mixtral_8x7b", 46.7e9, 12.9e9), ("deepseek", 16.4e9, 2.8e9),
    ("small,dense", None, None)])
def test_config_variants_eval_shape_param_counts(variant, total, active):
    config = load_gpt_moe_config(variant)
    cfg = model_config.from_config(config.model, config.execution)
    counts = model_config.param_count_formula(cfg)
    assert n_params(cfg) == counts["total"]
    if total is not None:
        assert abs(counts["total"] - total) / total < 0.01
        assert abs(counts["active"] - active) / active < 0.02
    if "dense" in variant:
        moe = model_config.param_count_formula(model_config.from_config(load_gpt_moe_config("small").model))
        router = sum(cfg.d_model * config.model.num_experts for _ in range(cfg.num_layers))
        assert counts["active"] == moe["active"] - router


def test_unknown_variant_raises():
    with pytest.raises(ValueError, match="unknown variant"):
        load_gpt_moe_config("huge")
