"""`jmoe.moefy` on third-party-style Flax models (issue 19): models written
as in the Flax examples, without jmoe internals, have every second MLP
swapped for an MoE layer; they train with their own loop, and an upcycled
model computes exactly what the dense one did."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jmoe
from cfg_helpers import moe_config

V, D, F, HEADS, LAYERS = 32, 16, 32, 2, 4
B, T = 2, 8


def _cfg(**kw):
    # Sizes are a template: upcycling reads D and F from the dense MLP.
    base = dict(d_model=D, d_ff=F, num_experts=4, top_k=2, group_align=4,
                activation="geglu", dispatch="dropless")
    base.update(kw)
    return moe_config(**base)


def _close(a, b, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def _tokens(seed=0):
    return jax.random.randint(jax.random.key(seed), (B, T + 1), 0, V)


def _ce(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


# ------------------------------------------------- an NNX model (Flax style) ----

class MLP(nnx.Module):
    """Gemma-style gated GELU MLP."""

    def __init__(self, d, f, *, rngs):
        self.gate = nnx.Linear(d, f, use_bias=False, rngs=rngs)
        self.up = nnx.Linear(d, f, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(f, d, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.gelu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    def __init__(self, d, f, heads, *, rngs):
        self.norm1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(d, rngs=rngs)
        self.mlp = MLP(d, f, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x), mask=nnx.make_causal_mask(x[..., 0]))
        return x + self.mlp(self.norm2(x))


class LM(nnx.Module):
    def __init__(self, *, rngs):
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.blocks = nnx.List([Block(D, F, HEADS, rngs=rngs) for _ in range(LAYERS)])
        self.out = nnx.Linear(D, V, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.out(x)


def _mlp_weights(mlp: MLP) -> dict:
    return {"w_gate_DF": mlp.gate.kernel[...], "w_up_DF": mlp.up.kernel[...],
            "w_down_FD": mlp.down.kernel[...]}


def test_nnx_moefy_every_second_layer_trains_with_the_models_own_loop():
    model = LM(rngs=nnx.Rngs(0))
    paths = jmoe.moefy(model, _cfg(), mlp=MLP, where=r"blocks/[13]/mlp",
                       rngs=nnx.Rngs(params=1))
    assert paths == ["blocks/1/mlp", "blocks/3/mlp"]
    assert isinstance(model.blocks[0].mlp, MLP) and isinstance(model.blocks[1].mlp, jmoe.MoE)
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    tokens = _tokens()

    @nnx.jit
    def step(model, opt, tokens):
        def loss_fn(model):
            logits, sown = nnx.capture(model, nnx.Intermediate)(tokens[:, :-1])
            aux, per_layer = jmoe.aux_loss(sown, {"load_balance_loss": 1e-2, "z_loss": 1e-3})
            return _ce(logits, tokens[:, 1:]) + aux, per_layer
        (loss, per_layer), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        return loss, per_layer, grads

    loss0, per_layer, grads = step(model, opt, tokens)
    assert sorted(per_layer) == ["blocks/1/mlp/aux/0", "blocks/3/mlp/aux/0"]
    for i in (1, 3):
        assert float(jnp.abs(grads.blocks[i].mlp.router.w_DE[...]).sum()) > 0
        assert float(jnp.abs(grads.blocks[i].mlp.experts.w_gate_EDF[...]).sum()) > 0
    for _ in range(3):
        loss, _, _ = step(model, opt, tokens)
    assert float(loss) < float(loss0)


def test_nnx_upcycled_model_equals_the_dense_model():
    model = LM(rngs=nnx.Rngs(0))
    tokens = _tokens()[:, :-1]
    dense = model(tokens)
    mlp1 = _mlp_weights(model.blocks[1].mlp)
    # A template config of other sizes: upcycling takes D, F from the MLP.
    jmoe.moefy(model, _cfg(d_model=4, d_ff=4), mlp=MLP,
               where=lambda path: int(path.split("/")[1]) % 2 == 1,
               rngs=nnx.Rngs(params=1), upcycle=_mlp_weights)
    layer = model.blocks[1].mlp
    assert layer.cfg.d_model == D and layer.cfg.d_ff == F
    assert float(jnp.abs(layer.router.w_DE[...]).max()) == 0.0
    for e in range(layer.cfg.num_experts):
        _close(layer.experts.w_gate_EDF[...][e], mlp1["w_gate_DF"], 0, 0)
    _close(model(tokens), dense)
    # Called outside nnx.capture the sown aux is dropped, not left as state.
    assert not jax.tree.leaves(nnx.state(model, nnx.Intermediate))

    noisy = LM(rngs=nnx.Rngs(0))
    jmoe.moefy(noisy, _cfg(), mlp=MLP, where=r"blocks/1/mlp", rngs=nnx.Rngs(params=1),
               upcycle=_mlp_weights, noise=0.1, router_std=0.02, key=jax.random.key(5))
    w = noisy.blocks[1].mlp.experts.w_up_EDF[...]
    assert float(jnp.abs(w[0] - w[1]).max()) > 1e-3  # noise took effect, per expert
    assert float(jnp.abs(noisy.blocks[1].mlp.router.w_DE[...]).max()) > 0
    with pytest.raises(ValueError, match="needs exactly"):
        jmoe.moefy(LM(rngs=nnx.Rngs(0)), _cfg(activation="gelu"), mlp=MLP,
                   rngs=nnx.Rngs(params=1), upcycle=_mlp_weights)


# ----------------------------------------------- a Linen model (Flax style) ----

class MlpBlock(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x):
        gate = nn.Dense(self.hidden, use_bias=False, name="gate")(x)
        up = nn.Dense(self.hidden, use_bias=False, name="up")(x)
        return nn.Dense(x.shape[-1], use_bias=False, name="down")(nn.gelu(gate) * up)


class DecoderBlock(nn.Module):
    hidden: int
    heads: int

    @nn.compact
    def __call__(self, x):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(x),
                                                                       mask=mask)
        return x + MlpBlock(self.hidden, name="mlp")(nn.LayerNorm()(x))


class Decoder(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(V, D)(tokens)
        for i in range(LAYERS):
            x = DecoderBlock(F, HEADS, name=f"layers_{i}")(x)
        return nn.Dense(V)(nn.LayerNorm()(x))


EVERY_SECOND = r"layers_[13]/mlp"


def _linen_mlp_weights(tree) -> dict:
    return {"w_gate_DF": tree["gate"]["kernel"], "w_up_DF": tree["up"]["kernel"],
            "w_down_FD": tree["down"]["kernel"]}


def test_linen_moefy_every_second_layer_trains_with_the_models_own_loop():
    MoEDecoder = jmoe.moefy(Decoder, _cfg(), mlp=MlpBlock, where=EVERY_SECOND)
    tokens = _tokens()
    model = MoEDecoder()
    params = nn.unbox(model.init(jax.random.key(0), tokens[:, :-1]))["params"]
    assert set(params["layers_1"]["mlp"]) == {"router", "experts"}
    assert set(params["layers_0"]["mlp"]) == {"gate", "up", "down"}
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, tokens):
        def loss_fn(p):
            logits, state = model.apply({"params": p}, tokens[:, :-1],
                                        mutable=["intermediates"])
            aux, per_layer = jmoe.aux_loss(state["intermediates"], {"load_balance_loss": 1e-2})
            return _ce(logits, tokens[:, 1:]) + aux, per_layer
        (loss, per_layer), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        upd, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, loss, per_layer, g

    params, opt_state, loss0, per_layer, g = step(params, opt_state, tokens)
    assert sorted(per_layer) == ["layers_1/mlp/aux/0", "layers_3/mlp/aux/0"]
    for i in (1, 3):
        assert float(jnp.abs(g[f"layers_{i}"]["mlp"]["router"]["w_DE"]).sum()) > 0
    for _ in range(3):
        params, opt_state, loss, _, _ = step(params, opt_state, tokens)
    assert float(loss) < float(loss0)


def test_linen_upcycled_params_equal_the_dense_model():
    cfg = _cfg()
    tokens = _tokens()[:, :-1]
    dense_vars = Decoder().init(jax.random.key(0), tokens)
    dense = Decoder().apply(dense_vars, tokens)
    MoEDecoder = jmoe.moefy(Decoder, cfg, mlp=MlpBlock, where=EVERY_SECOND)
    params = jmoe.upcycle_params(dense_vars["params"], cfg, where=EVERY_SECOND,
                                 dense_weights=_linen_mlp_weights, key=jax.random.key(1))
    fresh = MoEDecoder().init(jax.random.key(0), tokens)["params"]
    assert jax.tree.map(jnp.shape, nn.unbox(fresh)) == jax.tree.map(jnp.shape, params)
    _close(MoEDecoder().apply({"params": params}, tokens), dense)
    # The MoE layers ran (a perturbed router changes nothing, perturbed experts do).
    w = params["layers_1"]["mlp"]["experts"]["w_up_EDF"]
    params["layers_1"]["mlp"]["experts"]["w_up_EDF"] = w.at[:].multiply(1.5)
    assert float(jnp.abs(MoEDecoder().apply({"params": params}, tokens) - dense).max()) > 1e-3
    with pytest.raises(ValueError, match="matched no path"):
        jmoe.upcycle_params(dense_vars["params"], cfg, where="blocks/1/mlp",
                            dense_weights=_linen_mlp_weights, key=jax.random.key(1))


def test_moefy_refuses_what_it_cannot_replace_faithfully():
    with pytest.raises(ValueError, match="neither it would replace every submodule"):
        jmoe.moefy(LM(rngs=nnx.Rngs(0)), _cfg(), rngs=nnx.Rngs(params=1))

    class Gated(nn.Module):
        @nn.compact
        def __call__(self, x, *, decode=False):
            return nn.Dense(x.shape[-1])(x)

    class Host(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Gated(name="mlp")(x, decode=True)

    with pytest.raises(TypeError, match=r"called with \['decode'\]"):
        jmoe.moefy(Host, _cfg(), mlp=Gated)().init(jax.random.key(0), jnp.ones((2, D)))
    with pytest.raises(ValueError, match="needs mlp="):
        jmoe.moefy(Host, _cfg())
