"""jmoe's layers inside other people's Flax models (issue 19): the Linen and
NNX modules behave like Flax layers (one param per weight with partitioning
metadata, Flax RNG streams, `deterministic`, sown aux), `jmoe.aux_loss`,
`mesh=False`, and GeGLU experts."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jmoe
import jmoe.linen
from cfg_helpers import moe_config
from jmoe import experts
from jmoe.sharding import expert_parallel, make_mesh
from jmoe.sharding.specs import EXPERT_SPECS
from moe_reference import reference_moe

D, F, E = 8, 16, 4


def _cfg(**kw):
    base = dict(d_model=D, d_ff=F, num_experts=E, top_k=2, group_align=4)
    base.update(kw)
    return moe_config(**base)


def _close(a, b, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=rtol, atol=atol)


def _x(shape=(2, 6, D), seed=1):
    return jax.random.normal(jax.random.key(seed), shape)


# ------------------------------------------------------------- Linen ----

def test_linen_declares_one_param_per_weight_with_logical_axes():
    """`variables["params"]` is `init_params`' tree, one leaf per weight, each
    with logical axis names; it runs the layer the per-token reference runs."""
    cfg = _cfg(num_shared_experts=1, shared_gate=True)
    x = _x()
    variables = jmoe.linen.MoE(cfg).init(jax.random.key(0), x)
    assert set(variables) == {"params"}  # softmax_topk: no router_bias collection
    params = nn.unbox(variables["params"])
    want = jax.eval_shape(lambda: jmoe.init_params(jax.random.key(0), cfg))
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, want)
    specs = nn.get_partition_spec(variables)["params"]
    assert specs["experts"]["w_up_EDF"] == P("expert", "embed", "mlp")
    assert specs["experts"]["w_down_EFD"] == P("expert", "mlp", "embed")
    assert specs["router"]["w_DE"] == P("embed", None)
    assert specs["shared"]["w_down_FD"] == P("mlp", "embed")
    # Each weight drew its own key (not one tree from one key): no two equal.
    flat = [np.asarray(v).ravel()[:4] for v in jax.tree.leaves(params)]
    assert len({tuple(v) for v in flat}) == len(flat)
    y, _ = jmoe.linen.MoE(cfg).apply(variables, x)
    y_ref, _ = reference_moe(params, x.reshape(-1, D), cfg)
    _close(y.reshape(-1, D), y_ref)


def test_default_axis_rules_resolve_to_jmoes_own_expert_specs():
    """`jmoe.axis_rules` maps the logical names onto the mesh exactly as
    `jmoe.sharding.specs` places expert weights (and drops absent axes)."""
    rules = jmoe.axis_rules()
    for name, spec in EXPERT_SPECS.items():
        assert nn.logical_to_mesh_axes(jmoe.logical.LOGICAL_AXES[name], rules) == spec
    mesh = make_mesh(data=2, expert=4)
    assert nn.logical_to_mesh_axes(jmoe.logical.LOGICAL_AXES["w_up_EDF"],
                                   jmoe.axis_rules(jax.sharding.AbstractMesh(
                                       (2, 4), ("data", "expert")))) == P("expert", None, None)
    assert nn.logical_to_mesh_axes(("embed", None), jmoe.axis_rules(mesh)) == P(None, None)


def _gemma_style_param(monkeypatch, dtype):
    """nn.Module.param wrapped the way gemma.gm wraps it process-wide
    (gemma/gm/utils/_dtype_params.py): `shape` is a required positional
    argument, and during init the dtype is replaced by the policy's."""
    original = nn.Module.param

    def param(self, name, init_fn, shape, dtype_arg=None, **kwargs):
        if self.is_initializing():
            return original(self, name, init_fn, shape, **kwargs, dtype=dtype)
        return original(self, name, init_fn, shape, dtype_arg, **kwargs)

    monkeypatch.setattr(nn.Module, "param", param)


def test_linen_inside_a_model_whose_param_is_wrapped_like_gemma(monkeypatch):
    _gemma_style_param(monkeypatch, jnp.bfloat16)

    class Host(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(D)(x)
            y, aux = jmoe.linen.MoE(_cfg())(h)
            return h + y, aux

    x = _x()
    variables = Host().init(jax.random.key(0), x)
    moe = variables["params"]["MoE_0"]
    # The dtype policy reached every weight: they are the wrapper's params.
    assert {v.dtype for v in jax.tree.leaves(nn.unbox(moe))} == {jnp.dtype(jnp.bfloat16)}
    y, aux = jax.jit(Host().apply)(variables, x)
    assert y.shape == x.shape and np.isfinite(np.asarray(y, np.float32)).all()


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_topk", "switch", "expert_choice"])
def test_apply_with_params_only_works_for_every_router(router):
    kw = {"switch": dict(top_k=1), "expert_choice": dict(dispatch="capacity")}.get(router, {})
    cfg = _cfg(router=router, **kw)
    x = _x()
    variables = jmoe.linen.MoE(cfg).init(jax.random.key(0), x)
    if router == "sigmoid_topk":
        assert set(variables) == {"params", "router_bias"}
        assert variables["router_bias"]["router"]["bias"].shape == (E,)
    else:
        assert set(variables) == {"params"}
    y, _ = jmoe.linen.MoE(cfg).apply({"params": variables["params"]}, x) \
        if router != "sigmoid_topk" else jmoe.linen.MoE(cfg).apply(variables, x)
    assert y.shape == x.shape


def test_linen_selection_bias_takes_effect_and_has_the_nnx_name():
    cfg = _cfg(router="sigmoid_topk")
    x = _x()
    layer = jmoe.linen.MoE(cfg)
    variables = layer.init(jax.random.key(0), x)
    biased = {"params": variables["params"],
              "router_bias": {"router": {"bias": jnp.array([100.0, 100.0, 0.0, 0.0])}}}
    _, aux = layer.apply(biased, x)
    _close(aux.expert_load, [0.5, 0.5, 0.0, 0.0])  # top-2 always experts 0 and 1
    # One name in both frameworks: the collection is the NNX type's name, and
    # the NNX module holds the bias at the same path.
    assert nnx.variable_name_from_type(jmoe.RouterBias) == "router_bias"
    state = nnx.state(jmoe.MoE(cfg, rngs=nnx.Rngs(params=0)), jmoe.RouterBias)
    assert state["router"]["bias"][...].shape == (E,)


def test_jnp_dtypes_reach_the_linen_weights_and_compute():
    cfg = _cfg(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    x = _x().astype(jnp.bfloat16)
    variables = jmoe.linen.MoE(cfg).init(jax.random.key(0), x)
    assert {v.dtype for v in jax.tree.leaves(nn.unbox(variables))} == {jnp.dtype(jnp.bfloat16)}
    y, _ = jmoe.linen.MoE(cfg).apply(variables, x)
    assert y.dtype == jnp.bfloat16


# -------------------------------------------------------- randomness ----

def test_linen_jitter_follows_deterministic_and_the_dropout_stream():
    cfg = _cfg(jitter_eps=0.5)
    x = _x()
    layer = jmoe.linen.MoE(cfg)
    variables = layer.init(jax.random.key(0), x)
    params = nn.unbox(variables["params"])
    clean = jmoe.moe_apply(params, x, cfg)[0]
    _close(layer.apply(variables, x)[0], clean)  # default: no jitter
    _close(layer.apply(variables, x, deterministic=True)[0], clean)
    a = layer.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(3)})[0]
    b = layer.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(3)})[0]
    c = layer.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(4)})[0]
    _close(a, b)
    assert float(jnp.max(jnp.abs(a - clean))) > 1e-3
    assert float(jnp.max(jnp.abs(a - c))) > 1e-3
    # The attribute form, as nn.Dropout(deterministic=...).
    _close(jmoe.linen.MoE(cfg, deterministic=False).apply(
        variables, x, rngs={"dropout": jax.random.key(3)})[0], a)
    with pytest.raises(ValueError, match="'dropout' RNG"):
        layer.apply(variables, x, deterministic=False)
    # The explicit path is unchanged.
    k = jax.random.key(7)
    _close(layer.apply(variables, x, train=True, rng=k)[0],
           jmoe.moe_apply(params, x, cfg, train=True, rng=k)[0])


def test_nnx_jitter_follows_train_eval_and_the_rngs_stream():
    cfg = _cfg(jitter_eps=0.5)
    x = _x()
    layer = jmoe.MoE(cfg, rngs=nnx.Rngs(params=0, dropout=5))
    clean = jmoe.moe_apply(layer.params_dict(), x, cfg)[0]
    _close(layer(x)[0], clean)  # built deterministic
    layer.train()
    a, b = layer(x)[0], layer(x)[0]
    assert float(jnp.max(jnp.abs(a - clean))) > 1e-3
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3  # the stream advances
    _close(layer(x, deterministic=True)[0], clean)
    layer.eval()
    _close(layer(x)[0], clean)
    k = jax.random.key(7)
    _close(layer(x, train=True, rng=k)[0], jmoe.moe_apply(layer.params_dict(), x, cfg,
                                                          train=True, rng=k)[0])
    # A params-only Rngs adds no RNG state (the GPT's variables are unchanged).
    plain = jmoe.MoE(cfg, rngs=nnx.Rngs(params=0))
    assert not jax.tree.leaves(nnx.state(plain, nnx.RngState))
    with pytest.raises(ValueError, match="no 'dropout' RNG stream"):
        plain(x, deterministic=False)
    c = plain(x, deterministic=False, rngs=nnx.Rngs(dropout=5))[0]
    _close(plain(x, deterministic=False, rngs=nnx.Rngs(dropout=5))[0], c)
    assert float(jnp.max(jnp.abs(c - clean))) > 1e-3


def test_nnx_weights_carry_logical_axes_that_flax_places_on_a_mesh(monkeypatch):
    cfg = _cfg(num_experts=8)
    layer = jmoe.MoE(cfg, rngs=nnx.Rngs(params=0))
    specs = nnx.get_partition_spec(nnx.state(layer, nnx.Param))
    assert specs["experts"]["w_gate_EDF"].get_value() == P("expert", "embed", "mlp")
    assert specs["router"]["w_DE"].get_value() == P("embed", None)
    x = _x((2, 8, D))
    local = layer(x)[0]
    mesh = jax.make_mesh((2, 4), ("data", "expert"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    state = nnx.state(layer)
    shardings = nn.logical_to_mesh_sharding(nnx.get_partition_spec(state), mesh,
                                            jmoe.axis_rules(mesh))
    nnx.update(layer, jax.device_put(state, shardings))
    assert layer.experts.w_down_EFD[...].sharding.spec == P("expert", None, None)
    calls = _spy_ep(monkeypatch)
    with jax.set_mesh(mesh):
        _close(nnx.jit(lambda m, x: m(x)[0])(layer, x), local)
    assert calls, "the layer did not run expert-parallel"


# ------------------------------------------------- aux the Flax way ----

class _LinenTwoLayers(nn.Module):
    cfg: object
    return_aux: bool

    @nn.compact
    def __call__(self, x):
        auxes = []
        for i in range(2):
            out = jmoe.linen.MoE(self.cfg, return_aux=self.return_aux, name=f"moe{i}")(x)
            y, aux = out if self.return_aux else (out, None)
            x, auxes = x + y, auxes + [aux]
        return (x, auxes) if self.return_aux else x


def test_linen_return_aux_false_sows_and_aux_loss_weights_the_layer_mean():
    cfg = _cfg(dispatch="capacity", capacity_factor=1.0)
    x = _x()
    sown = _LinenTwoLayers(cfg, False)
    variables = sown.init(jax.random.key(0), x)
    y, state = sown.apply(variables, x, mutable=["intermediates"])
    y_ref, auxes = _LinenTwoLayers(cfg, True).apply(variables, x)
    _close(y, y_ref)
    total, per_layer = jmoe.aux_loss(state["intermediates"],
                                     {"load_balance_loss": 0.3, "z_loss": 0.05})
    assert sorted(per_layer) == ["moe0/aux/0", "moe1/aux/0"]
    want = sum(w * (getattr(auxes[0], f) + getattr(auxes[1], f)) / 2
               for f, w in (("load_balance_loss", 0.3), ("z_loss", 0.05)))
    _close(total, want)
    _close(per_layer["moe1/aux/0"].dropped_fraction, auxes[1].dropped_fraction)
    with pytest.raises(ValueError, match="weights\\['balance'\\]"):
        jmoe.aux_loss(state["intermediates"], {"balance": 1.0})


def test_nnx_return_aux_false_sows_an_intermediate_that_trains():
    cfg = _cfg()
    x = _x()

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([jmoe.MoE(cfg, rngs=rngs, return_aux=False)
                                    for _ in range(2)])

        def __call__(self, x):
            for layer in self.layers:
                x = x + layer(x)
            return x

    net = Net(nnx.Rngs(params=0))
    auxes, h = [], x
    for layer in net.layers:  # the same layers returning aux: the reference
        y, aux = jmoe.moe_apply(layer.params_dict(), h, cfg)
        h, auxes = h + y, auxes + [aux]

    def loss_fn(model):
        y, sown = nnx.capture(model, nnx.Intermediate)(x)
        total, per_layer = jmoe.aux_loss(sown, {"load_balance_loss": 1.0})
        return jnp.mean(y ** 2) + total, (total, per_layer)

    grads, (total, per_layer) = nnx.jit(nnx.grad(loss_fn, has_aux=True))(net)
    assert sorted(per_layer) == ["layers/0/aux/0", "layers/1/aux/0"]
    _close(total, (auxes[0].load_balance_loss + auxes[1].load_balance_loss) / 2)
    assert not jax.tree.leaves(nnx.state(net, nnx.Intermediate))  # captured: nothing left over
    assert float(jnp.abs(grads.layers[0].router.w_DE[...]).sum()) > 0


def test_aux_loss_reads_a_stacked_moeaux_as_layers():
    aux = jmoe.MoEAux(load_balance_loss=jnp.array([1.0, 3.0]), z_loss=jnp.zeros(2),
                      dropped_fraction=jnp.zeros(2), router_entropy=jnp.zeros(2),
                      expert_load=jnp.zeros((2, E)), expert_prob=jnp.zeros((2, E)))
    total, per_layer = jmoe.aux_loss(aux, {"load_balance_loss": 0.5})
    _close(total, 1.0)
    assert list(per_layer) == [""]


# ------------------------------------------------------------- meshes ----

class _TookTheMesh(Exception):
    pass


def _spy_ep(monkeypatch, run=True):
    """Records calls of the expert-parallel entry; with run=False it stops
    there (proves the route without compiling the expert-parallel layer)."""
    calls = []
    real = expert_parallel.moe_apply_ep

    def spy(*a, **kw):
        calls.append(1)
        if not run:
            raise _TookTheMesh
        return real(*a, **kw)

    monkeypatch.setattr(expert_parallel, "moe_apply_ep", spy)
    return calls


def test_mesh_false_runs_the_local_path_inside_an_ambient_mesh(monkeypatch):
    cfg = _cfg()
    x = _x((16, D))
    params = jmoe.init_params(jax.random.key(0), cfg)
    local = jmoe.moe_apply(params, x, cfg)[0]
    calls = _spy_ep(monkeypatch, run=False)
    nnx_layer = jmoe.MoE(cfg, rngs=nnx.Rngs(params=0), mesh=False)
    lin_layer = jmoe.linen.MoE(cfg, mesh=False)
    with jax.set_mesh(make_mesh(data=2, expert=4)):
        with pytest.raises(_TookTheMesh):
            jmoe.moe_apply(params, x, cfg)  # the ambient mesh is taken by default
        _close(jmoe.moe_apply(params, x, cfg, mesh=False)[0], local)
        _close(nnx_layer(x)[0], jmoe.moe_apply(nnx_layer.params_dict(), x, cfg, mesh=False)[0])
        _close(lin_layer.apply({"params": params}, x)[0], local)
        # A token count the mesh cannot split: mesh=False is the way out
        # (dropless tokens are independent, so 6 of them give local[:6]).
        _close(jmoe.moe_apply(params, x[:6], cfg, mesh=False)[0], local[:6])
        assert len(calls) == 1
    monkeypatch.undo()
    with jax.set_mesh(make_mesh(data=2, expert=4)):
        with pytest.raises(ValueError, match="6 tokens do not split over data\\*expert=8"):
            jmoe.moe_apply(params, x[:6], cfg)  # without it, today's error


def test_flax_partition_specs_place_experts_and_the_step_equals_one_device(monkeypatch):
    """Linen weights placed with Flax's own functions on a (2, 4) mesh: the
    experts land over `expert`, and a jitted train step equals the same step
    on one device (dropless)."""
    cfg = _cfg(num_experts=8, top_k=2)
    x = _x((4, 8, D))
    layer = jmoe.linen.MoE(cfg)
    variables = layer.init(jax.random.key(0), x)
    mesh = jax.make_mesh((2, 4), ("data", "expert"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(variables), mesh,
                                            jmoe.axis_rules(mesh))
    assert shardings["params"]["experts"]["w_up_EDF"].spec == P("expert", None, None)
    assert shardings["params"]["router"]["w_DE"].spec == P(None, None)
    params = nn.unbox(variables)["params"]

    def step(p, x):
        def loss(p):
            y, aux = layer.apply({"params": p}, x)
            return jnp.mean(y ** 2) + 0.1 * aux.load_balance_loss
        l, g = jax.value_and_grad(loss)(p)
        return l, jax.tree.map(lambda w, d: w - 0.1 * d, p, g)

    l1, p1 = jax.jit(step)(params, x)
    placed = jax.device_put(params, shardings["params"])
    assert placed["experts"]["w_down_EFD"].sharding.spec == P("expert", None, None)
    calls = _spy_ep(monkeypatch)
    with jax.set_mesh(mesh):
        l8, p8 = jax.jit(step)(placed, x)
    assert calls, "the step did not run expert-parallel"
    _close(l8, l1)
    for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
        _close(a, b, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------- GeGLU ----

def _gelu_tanh(g):
    return 0.5 * g * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g ** 3)))


def test_geglu_experts_match_the_gated_gelu_formula():
    """Gemma's gated GELU, tanh approximation: gelu_tanh(x Wg) * (x Wu) Wd, on
    both expert layouts and the dense MLP, against NumPy."""
    cfg = _cfg(activation="geglu")
    p = jmoe.init_params(jax.random.key(0), cfg)
    assert set(p["experts"]) == {"w_gate_EDF", "w_up_EDF", "w_down_EFD"}
    w = {k: np.asarray(v, np.float64) for k, v in p["experts"].items()}
    x_ECD = np.asarray(jax.random.normal(jax.random.key(1), (E, 3, D)) * 2.0)

    def mlp(e, x_CD):
        h = _gelu_tanh(x_CD @ w["w_gate_EDF"][e]) * (x_CD @ w["w_up_EDF"][e])
        return h @ w["w_down_EFD"][e]

    want_ECD = np.stack([mlp(e, x_ECD[e]) for e in range(E)])
    _close(experts.batched_mlp(jnp.asarray(x_ECD, jnp.float32), p["experts"], "geglu"),
           want_ECD)
    sizes = jnp.array([3, 3, 3, 3], jnp.int32)
    _close(experts.grouped_mlp(jnp.asarray(x_ECD.reshape(-1, D), jnp.float32), p["experts"],
                               sizes, "geglu", "xla"), want_ECD.reshape(-1, D))
    dense = {"w_gate_DF": p["experts"]["w_gate_EDF"][0], "w_up_DF": p["experts"]["w_up_EDF"][0],
             "w_down_FD": p["experts"]["w_down_EFD"][0]}
    _close(experts.dense_mlp(jnp.asarray(x_ECD[0], jnp.float32), dense, "geglu"), want_ECD[0])
    with pytest.raises(ValueError, match="activation='GeGLU'"):
        _cfg(activation="GeGLU")
