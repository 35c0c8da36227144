"""The single-device MoE layer against the per-token reference."""

import dataclasses
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

import jmoe
from cfg_helpers import moe_config
import jmoe.linen
from moe_reference import reference_moe

D, F = 8, 16


def _cfg(**kw):
    base = dict(d_model=D, d_ff=F, num_experts=4, top_k=2, group_align=4)
    base.update(kw)
    return moe_config(**base)


def _close(a, b, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def _check_against_reference(cfg, t=12, seed=0, bias=None):
    params = jmoe.init_params(jax.random.key(seed), cfg)
    x = jax.random.normal(jax.random.key(seed + 1), (t, cfg.d_model))
    ct = jax.random.normal(jax.random.key(seed + 2), (t, cfg.d_model))
    f = lambda p, x: jmoe.moe_apply(p, x, cfg, bias=bias)[0]
    y, vjp = jax.vjp(jax.jit(f), params, x)
    y_ref, vjp_ref = jax.vjp(
        lambda p, xx: reference_moe(p, xx, cfg, bias, concrete=(params, x))[0], params, x)
    _close(y, y_ref)
    for g, g_ref in zip(jax.tree.leaves(vjp(ct)), jax.tree.leaves(vjp_ref(ct))):
        _close(g, g_ref, rtol=1e-4, atol=1e-5)
    return params, x


ROUTERS = [
    dict(router="softmax_topk", renormalize=True),
    dict(router="softmax_topk", renormalize=False, routed_scaling_factor=2.0),
    dict(router="sigmoid_topk", renormalize=True, routed_scaling_factor=2.5),
    dict(router="sigmoid_topk", renormalize=False, n_group=2, topk_group=1),
    dict(router="switch", top_k=1),
]
DISPATCHES = [
    dict(dispatch="dropless"),
    dict(dispatch="capacity", capacity_factor=8.0),
    dict(dispatch="capacity", capacity_factor=0.5, min_capacity=1, drop_policy="position"),
    dict(dispatch="capacity", capacity_factor=0.5, min_capacity=1, drop_policy="probability"),
]


@pytest.mark.parametrize("router,disp", list(itertools.product(ROUTERS, DISPATCHES)))
def test_matches_reference(router, disp):
    _check_against_reference(_cfg(**router, **disp))


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_expert_choice_matches_reference(activation):
    _check_against_reference(_cfg(router="expert_choice", dispatch="capacity",
                                  capacity_factor=0.75, activation=activation))


def test_shared_experts_and_bias_match_reference():
    cfg = _cfg(router="sigmoid_topk", num_shared_experts=2, shared_d_ff=8, shared_gate=True)
    _check_against_reference(cfg, bias=jnp.array([0.3, -0.2, 0.0, 0.1]))
    _check_against_reference(_cfg(activation="gelu", num_shared_experts=1))


def test_large_capacity_equals_dropless():
    x = jax.random.normal(jax.random.key(3), (64, D))
    cfg = _cfg(num_experts=8, top_k=2)
    params = jmoe.init_params(jax.random.key(0), cfg)
    y_dl, aux_dl = jmoe.moe_apply(params, x, cfg)
    y_cap, aux_cap = jmoe.moe_apply(params, x, cfg.replace(dispatch="capacity",
                                                           capacity_factor=8.0))
    _close(y_dl, y_cap)
    assert float(aux_cap.dropped_fraction) == 0.0 == float(aux_dl.dropped_fraction)


@pytest.mark.parametrize("policy", ["position", "probability"])
def test_tiny_capacity_drops_exactly_what_the_policy_names(policy):
    cfg = _cfg(dispatch="capacity", capacity_factor=0.3, min_capacity=1, drop_policy=policy)
    params = jmoe.init_params(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (20, D))
    y, aux = jmoe.moe_apply(params, x, cfg)
    y_ref, kept = reference_moe(params, x, cfg)
    _close(y, y_ref)
    assert kept.sum() == cfg.num_experts * cfg.capacity(20) or kept.all()
    assert float(aux.dropped_fraction) == pytest.approx(1.0 - kept.mean())
    assert float(aux.dropped_fraction) > 0


@settings(max_examples=8, deadline=None)
@given(t=st.integers(1, 24), e=st.integers(1, 9), k=st.integers(1, 3),
       skew=st.booleans(), seed=st.integers(0, 1000))
def test_dropless_fuzzed(t, e, k, skew, seed):
    k = min(k, e)
    # Top-1 softmax with renormalisation is rejected (constant weights).
    cfg = _cfg(num_experts=e, top_k=k, group_align=1 + seed % 4, renormalize=k > 1)
    params = jmoe.init_params(jax.random.key(seed), cfg)
    if skew:  # most experts get no tokens at all
        params["router"]["w_DE"] = params["router"]["w_DE"].at[:, 0].add(5.0)
    x = jax.random.normal(jax.random.key(seed + 1), (t, D))
    y, aux = jax.jit(lambda p, x: jmoe.moe_apply(p, x, cfg))(params, x)
    y_ref, kept = reference_moe(params, x, cfg)
    assert kept.all()
    _close(y, y_ref)
    assert float(aux.dropped_fraction) == 0.0
    assert float(jnp.sum(aux.expert_load)) == pytest.approx(1.0)


def test_load_balance_and_z_loss_formulas():
    logits = jnp.log(jnp.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]]))
    r = jmoe.routing.softmax_topk(logits, 1, renormalize=False)
    # f = [1/2, 1/2, 0]; P = [0.4, 0.4, 0.2]; loss = 3 * (0.2 + 0.2) = 1.2
    stats = jmoe.stats.finalize(jmoe.stats.router_sums(r, 3))
    assert float(stats.load_balance_loss) == pytest.approx(1.2)
    z = jnp.array([[1.0, 2.0], [0.0, 0.0]])
    expect = (np.log(np.e + np.e ** 2) ** 2 + np.log(2.0) ** 2) / 2
    zr = jmoe.routing.softmax_topk(z, 1, renormalize=False)
    assert float(jmoe.stats.finalize(jmoe.stats.router_sums(zr, 2)).z_loss) == pytest.approx(
        expect, rel=1e-6)
    # The layer's aux reports the same numbers, computed here in NumPy.
    cfg = _cfg(num_experts=3, top_k=1, router="softmax_topk", renormalize=False)
    params = jmoe.init_params(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (16, D))
    _, aux = jax.jit(lambda p, x: jmoe.moe_apply(p, x, cfg))(params, x)
    lg = np.asarray(x @ params["router"]["w_DE"], np.float64)
    p = np.exp(lg - lg.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    f = np.bincount(p.argmax(-1), minlength=3) / 16
    assert float(aux.load_balance_loss) == pytest.approx(3 * np.sum(f * p.mean(0)), rel=1e-5)
    lse = np.log(np.exp(lg).sum(-1))
    assert float(aux.z_loss) == pytest.approx(np.mean(lse ** 2), rel=1e-5)


def test_aux_loss_free_bias_balances_a_skewed_router():
    cfg = _cfg(num_experts=8, top_k=2, router="sigmoid_topk", bias_update_rate=0.02)
    params = jmoe.init_params(jax.random.key(0), cfg)
    # Inputs with a positive mean and a router leaning to high expert ids.
    params["router"]["w_DE"] = params["router"]["w_DE"] + jnp.linspace(0, 0.3, 8)[None, :]
    x = jax.random.normal(jax.random.key(1), (256, D)) + 1.0
    step = jax.jit(lambda b: jmoe.moe_apply(params, x, cfg, bias=b)[1].expert_load)
    bias = jmoe.init_bias(cfg)
    before = step(bias)
    for _ in range(150):
        bias = jmoe.routing.update_bias(bias, step(bias), cfg.bias_update_rate)
    after = step(bias)
    assert float(jnp.max(before)) > 0.3  # skewed: balanced is 1/8
    assert float(jnp.max(after)) < 0.2
    assert float(jnp.std(after)) < 0.3 * float(jnp.std(before))


def test_jitter_needs_rng_and_changes_routing_only_in_training():
    cfg = _cfg(jitter_eps=0.5)
    params = jmoe.init_params(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (32, D))
    with pytest.raises(ValueError, match="jitter_eps"):
        jmoe.moe_apply(params, x, cfg, train=True)
    y_eval, _ = jmoe.moe_apply(params, x, cfg)
    y_eval2, _ = jmoe.moe_apply(params, x, cfg.replace(jitter_eps=0.0))
    _close(y_eval, y_eval2)
    y_tr, _ = jmoe.moe_apply(params, x, cfg, train=True, rng=jax.random.key(5))
    assert not np.allclose(np.asarray(y_tr), np.asarray(y_eval))


def test_nnx_module_equals_moe_apply_and_trains():
    cfg = _cfg(router="sigmoid_topk", num_shared_experts=1)

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.inp = nnx.Linear(4, D, rngs=rngs)
            self.moe = jmoe.MoE(cfg, rngs=rngs)
            self.out = nnx.Linear(D, 1, rngs=rngs)

        def __call__(self, x):
            y, aux = self.moe(self.inp(x))
            return self.out(y), aux

    model = Tiny(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 6, 4))
    h = model.inp(x)
    y_mod, _ = model.moe(h)
    y_fn, _ = jmoe.moe_apply(model.moe.params_dict(), h, cfg, bias=model.moe.router.bias[...])
    _close(y_mod, y_fn)

    target = jnp.ones((2, 6, 1))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        def loss_fn(m):
            y, aux = m(x)
            return jnp.mean((y - target) ** 2) + 0.01 * aux.load_balance_loss, aux
        (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        model.moe.update_bias(aux)
        return loss

    l0 = step(model, opt)
    for _ in range(5):
        l1 = step(model, opt)
    assert float(l1) < float(l0)
    assert float(jnp.abs(model.moe.router.bias[...]).sum()) > 0  # updated outside the optimizer


def test_linen_adapter_equals_moe_apply_and_trains():
    cfg = _cfg()

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x):
            y, aux = jmoe.linen.MoE(cfg)(nn.Dense(D)(x))
            return nn.Dense(1)(y), aux

    x = jax.random.normal(jax.random.key(1), (2, 6, 4))
    model = Tiny()
    variables = model.init(jax.random.key(0), x)
    moe_params = nn.unbox(variables["params"]["MoE_0"])  # init_params' layout
    h = nn.Dense(D).apply({"params": variables["params"]["Dense_0"]}, x)
    y_lin, _ = jmoe.linen.MoE(cfg).apply({"params": moe_params}, h)
    _close(y_lin, jmoe.moe_apply(moe_params, h, cfg)[0])

    tx = optax.adam(1e-2)
    params = nn.unbox(variables["params"])
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        def loss_fn(p):
            y, aux = model.apply({"params": p}, x)
            return jnp.mean((y - 1.0) ** 2) + 0.01 * aux.load_balance_loss
        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, state = tx.update(g, state, params)
        return optax.apply_updates(params, upd), state, loss

    params, state, l0 = step(params, state)
    for _ in range(5):
        params, state, l1 = step(params, state)
    assert float(l1) < float(l0)


@pytest.mark.parametrize("kw,field", [
    (dict(top_k=5), "top_k"),
    # 0 and -x are dynamic capacities (tests/test_dynamic_capacity.py);
    # expert choice needs a fixed one, and no capacity is NaN.
    (dict(router="expert_choice", dispatch="capacity", capacity_factor=0.0), "capacity_factor"),
    (dict(dispatch="capacity", capacity_factor=float("nan")), "capacity_factor"),
    (dict(router="topk"), "router"),
    (dict(dispatch="sparse"), "dispatch"),
    (dict(activation="relu"), "activation"),
    (dict(drop_policy="random"), "drop_policy"),
    (dict(gmm_backend="cuda"), "gmm_backend"),  # Execution's, below
    (dict(router="switch", top_k=2), "top_k"),
    (dict(router="expert_choice", dispatch="dropless"), "dispatch"),
    (dict(router="sigmoid_topk", n_group=3, topk_group=1), "n_group"),
    (dict(router="softmax_topk", n_group=2, topk_group=1), "n_group"),
    (dict(router="sigmoid_topk", n_group=2, topk_group=3), "topk_group"),
    (dict(d_model=0), "d_model"),
    (dict(group_align=0), "group_align"),
])
def test_bad_config_raises_naming_the_field(kw, field):
    owner = "Execution" if field in {f.name for f in dataclasses.fields(jmoe.Execution)} else \
        "MoEConfig"
    with pytest.raises(ValueError, match=rf"{owner}\.{field}="):
        _cfg(**kw)


def test_shape_mismatch_raises_before_compile():
    cfg = _cfg()
    params = jmoe.init_params(jax.random.key(0), cfg)
    with pytest.raises(ValueError, match="d_model"):
        jax.jit(lambda x: jmoe.moe_apply(params, x, cfg)).trace(jnp.zeros((4, D + 1)))


def test_combine_aux_of_token_chunks_equals_whole():
    cfg = _cfg(num_experts=8)
    params = jmoe.init_params(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (32, D))
    y, aux = jmoe.moe_apply(params, x, cfg)
    parts = [jmoe.moe_apply(params, c, cfg) for c in jnp.split(x, 4)]
    _close(jnp.concatenate([p[0] for p in parts]), y)
    merged = jmoe.stats.combine_aux([p[1] for p in parts], [8] * 4, cfg.top_k)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(aux)):
        _close(a, b)


def test_a_bias_the_router_cannot_use_raises():
    """`bias=` with a router that has no selection bias, or of the wrong
    shape, is a mistake: it used to be ignored or broadcast silently."""
    cfg = _cfg(router="softmax_topk")
    params = jmoe.init_params(jax.random.key(0), cfg)
    x = jnp.zeros((8, D))
    with pytest.raises(ValueError, match=r"router='softmax_topk' has no selection bias.*drop "
                                         r"bias=, or set router='sigmoid_topk'"):
        jmoe.moe_apply(params, x, cfg, bias=jnp.zeros((4,)))
    sig = _cfg(router="sigmoid_topk")
    with pytest.raises(ValueError, match=r"bias has shape \(1,\) but MoEConfig.num_experts=4"):
        jmoe.moe_apply(jmoe.init_params(jax.random.key(0), sig), x, sig, bias=jnp.zeros((1,)))
    # The modules keep a bias for every router and pass it only where it is read.
    y, _ = jmoe.MoE(cfg, rngs=nnx.Rngs(params=0))(x)
    assert y.shape == x.shape


@pytest.mark.parametrize("given", [jnp.bfloat16, np.dtype("bfloat16"), "bfloat16"])
def test_dtypes_may_be_given_as_flax_code_passes_them(given):
    """Flax code passes `jnp.bfloat16`; the config stores the name, and the
    layer then computes in bf16 (the option takes effect)."""
    cfg = _cfg(dtype=given, param_dtype=given)
    assert cfg.dtype == cfg.param_dtype == "bfloat16"
    params = jmoe.init_params(jax.random.key(0), cfg)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    x = jnp.ones((8, D), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda p, x: jmoe.moe_apply(p, x, cfg)[0])(params, x)
    assert "bf16[" in str(jaxpr)
    with pytest.raises(ValueError, match=r"MoEConfig.dtype='int' is invalid"):
        _cfg(dtype=int)


def test_dtype_none_computes_in_the_input_dtype():
    """`MoEConfig(dtype=None)` follows the input: bf16 in gives exactly the
    dtype='bfloat16' layer, f32 in exactly the dtype='float32' one (and the
    two differ, so the dtype took effect)."""
    base = dict(d_model=16, d_ff=32, num_experts=4, top_k=2, group_align=4)
    params = jmoe.init_params(jax.random.key(0), jmoe.MoEConfig(**base))
    x = jax.random.normal(jax.random.key(1), (32, 16))
    follow = jmoe.MoEConfig(**base, dtype=None)
    for dt in ("bfloat16", "float32"):
        xi = x.astype(dt)
        want = jmoe.moe_apply(params, xi, jmoe.MoEConfig(**base, dtype=dt))[0]
        got = jmoe.moe_apply(params, xi, follow)[0]
        assert got.dtype == jnp.dtype(dt)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    bf = jmoe.moe_apply(params, x.astype("bfloat16"), follow)[0].astype(jnp.float32)
    f32 = jmoe.moe_apply(params, x, follow)[0]
    assert float(jnp.max(jnp.abs(bf - f32))) > 1e-4
