"""Dynamic capacity (issue 18, Tutel's rule): `capacity_factor = 0` sizes each
call's buffers to what it needs (nothing drops), `-x` to what it needs up to
x; the size comes from a few precompiled buckets chosen at run time, so a
new need never recompiles; the capacity used is reported."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe
from cfg_helpers import moe_config
from checks import assert_tree_close
from jmoe.sharding import make_mesh

D, F, E, T, K = 16, 32, 8, 128, 2
ALL_TO_ONE = jnp.zeros((E,)).at[3].set(5.0)  # every token's first choice is expert 3
SKEWED = jnp.zeros((E,)).at[0].set(0.1)  # expert 0 takes ~2x the mean


def _cfg(**kw):
    base = dict(d_model=D, d_ff=F, num_experts=E, top_k=K, group_align=4,
                router="sigmoid_topk")
    base.update(kw)
    return moe_config(**base)


def _inputs():
    params = jmoe.init_params(jax.random.key(0), _cfg())
    x = jax.random.normal(jax.random.key(1), (T, D))
    return params, x, jax.random.normal(jax.random.key(2), x.shape)


def _fwd_bwd(cfg, params, x, ct, bias, mesh):
    def run(p, x, ct):
        f = lambda p, x: jmoe.moe_apply(p, x, cfg, bias=bias, mesh=mesh)
        (y, aux), vjp = jax.vjp(f, p, x)
        return y, aux, vjp((ct, jax.tree.map(jnp.zeros_like, aux)))
    return jax.jit(run)(params, x, ct)


@pytest.fixture
def exchanges(monkeypatch):
    """Counts traces of the dense [E, C] capacity exchange (to see which
    capacity layout ran)."""
    from jmoe.sharding import expert_parallel
    calls = []
    inner = expert_parallel.capacity_exchange

    def spy(*a, **kw):
        calls.append(1)
        return inner(*a, **kw)
    monkeypatch.setattr(expert_parallel, "capacity_exchange", spy)
    return calls


def _took_layout(mesh, layout, calls):
    """The dense layout exchanged [E, C] buffers; the packed one did not."""
    if mesh is not None:
        assert bool(calls) == (layout == "dense"), (layout, len(calls))


@pytest.mark.parametrize("mesh,layout", [(None, "auto"), ((2, 4), "dense"), ((2, 4), "auto")])
def test_capacity_zero_drops_nothing_and_equals_dropless(mesh, layout, exchanges):
    """Every token sends its first choice to one expert (the worst case a
    fixed capacity drops most of): capacity 0 drops nothing, and the output
    and every gradient equal the dropless layer's; on a mesh with [E, C]
    buffers sized by the buckets (dense) and with only the kept rows
    exchanged (packed, what `auto` picks for a dynamic capacity)."""
    params, x, ct = _inputs()
    m = make_mesh(data=mesh[0], expert=mesh[1]) if mesh else None
    y0, _, g0 = _fwd_bwd(_cfg(), params, x, ct, ALL_TO_ONE, m)
    # One bucket below the largest on the mesh: fewer branches to compile.
    buckets = dict(capacity_buckets=(1.5,)) if mesh else {}
    y1, aux, g1 = _fwd_bwd(_cfg(dispatch="capacity", capacity_factor=0.0,
                                capacity_layout=layout, **buckets), params,
                           x, ct, ALL_TO_ONE, m)
    _took_layout(mesh, "packed" if layout == "auto" else layout, exchanges)
    assert float(aux.dropped_fraction) == 0.0
    # The whole shard went to one expert: its capacity was every token of the shard.
    shards = mesh[0] * mesh[1] if mesh else 1
    t_local = T // shards
    assert float(aux.capacity_factor) == pytest.approx(t_local * E / (t_local * K))
    assert_tree_close((y1, g1), (y0, g0))


@pytest.mark.parametrize("mesh", [None, (2, 4)])
def test_packed_capacity_zero_runs_the_dropless_plan(mesh):
    """Packed, capacity 0 keeps every row, so it runs the dropless plan
    itself (rows in token order, not the capacity's top-1-first order):
    under a skewed router, where an expert gets first and second choices
    mixed, the output and gradients equal the dropless layer's bit for bit."""
    params, x, ct = _inputs()
    m = make_mesh(data=mesh[0], expert=mesh[1]) if mesh else None
    want = _fwd_bwd(_cfg(), params, x, ct, SKEWED, m)
    got = _fwd_bwd(_cfg(dispatch="capacity", capacity_factor=0.0, capacity_layout="packed"),
                   params, x, ct, SKEWED, m)
    for a, b in zip(jax.tree.leaves((got[0], got[2])), jax.tree.leaves((want[0], want[2]))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mesh,layout", [(None, "auto"), ((1, 8), "dense"),
                                         ((1, 8), "packed")])
def test_negative_capacity_drops_like_the_fixed_capacity_it_is_bounded_by(mesh, layout,
                                                                          exchanges):
    """-x with a need above x: the same drops, output and gradients as the
    fixed capacity factor x (dense [E, C] buffers); with a need below x,
    nothing drops."""
    params, x, ct = _inputs()
    m = make_mesh(data=mesh[0], expert=mesh[1]) if mesh else None
    y_fix, a_fix, g_fix = _fwd_bwd(_cfg(dispatch="capacity", capacity_factor=1.5), params, x,
                                   ct, ALL_TO_ONE, m)
    exchanges.clear()
    y_dyn, a_dyn, g_dyn = _fwd_bwd(_cfg(dispatch="capacity", capacity_factor=-1.5,
                                        capacity_buckets=(1.25,), capacity_layout=layout),
                                   params, x, ct, ALL_TO_ONE, m)
    _took_layout(mesh, layout, exchanges)
    assert float(a_fix.dropped_fraction) > 0.2
    assert float(a_dyn.dropped_fraction) == float(a_fix.dropped_fraction)
    assert float(a_dyn.capacity_factor) == float(a_fix.capacity_factor)
    assert_tree_close((y_dyn, g_dyn), (y_fix, g_fix))
    # A need below the bound: the smallest bucket that holds it, no drops.
    _, a_low, _ = _fwd_bwd(_cfg(dispatch="capacity", capacity_factor=-3.0,
                                capacity_buckets=(1.5,), capacity_layout=layout),
                           params, x, ct, jnp.zeros((E,)), m)
    assert float(a_low.dropped_fraction) == 0.0
    # One device (128 tokens) needs the 1.5x bucket; a 16-token shard may need the bound.
    assert float(a_low.capacity_factor) <= 3.0
    if mesh is None:
        assert float(a_low.capacity_factor) == 1.5


@pytest.mark.parametrize("layout", ["dense", "packed"])
def test_on_a_mesh_the_capacity_reported_holds_the_busiest_shard(layout, exchanges):
    """8 token shards of 16 tokens, a skewed router: both layouts report the
    smallest choice that holds the busiest shard's need, counted here per
    shard from the routing (the packed layout finds it in the statistics'
    all-reduce, the dense one in the max that picks its buffers)."""
    params, x, ct = _inputs()
    cfg = _cfg(dispatch="capacity", capacity_factor=0.0, capacity_layout=layout)
    t_local = T // 8
    choices = cfg.capacity_choices(t_local, E)
    r = jmoe.routing.route(jmoe.routing.router_logits(x, params["router"]["w_DE"]), cfg, SKEWED)
    experts = np.asarray(r.experts_TK).reshape(8, -1)
    level = [min(i for i, c in enumerate(choices)
                 if c >= np.bincount(s, minlength=E).max()) for s in experts]
    # The shards need different levels: a mean or any one shard's would differ.
    assert min(level) < max(level), level
    _, aux, _ = _fwd_bwd(cfg, params, x, ct, SKEWED, make_mesh(data=2, expert=4))
    _took_layout((2, 4), layout, exchanges)
    assert float(aux.capacity_factor) == pytest.approx(choices[max(level)] * E / (t_local * K))
    assert float(aux.dropped_fraction) == 0.0


def test_the_smallest_bucket_that_holds_the_need_is_used():
    """On one device, against the need counted here from the routing: the
    capacity used is the smallest of the choices (buckets 1.25x, 1.5x, 2x,
    3x of T*K/E, then every token) that holds the busiest expert."""
    params, x, ct = _inputs()
    cfg = _cfg(dispatch="capacity", capacity_factor=0.0)
    assert cfg.capacity_choices(T, E) == [40, 48, 64, 96, 128]
    r = jmoe.routing.route(jmoe.routing.router_logits(x, params["router"]["w_DE"]), cfg, SKEWED)
    need = int(np.bincount(np.asarray(r.experts_TK).reshape(-1), minlength=E).max())
    want = min(c for c in cfg.capacity_choices(T, E) if c >= need)
    _, aux, _ = _fwd_bwd(cfg, params, x, ct, SKEWED, None)
    assert float(aux.capacity_factor) == pytest.approx(want * E / (T * K))
    assert float(aux.dropped_fraction) == 0.0
    assert 40 < want < 128  # the router is skewed, but not to the worst case


def test_a_new_need_never_recompiles():
    """Needs that take different buckets run in one compiled program."""
    params, x, _ = _inputs()
    cfg = _cfg(dispatch="capacity", capacity_factor=0.0)
    traces = []

    @jax.jit
    def layer(p, x, bias):
        traces.append(1)
        return jmoe.moe_apply(p, x, cfg, bias=bias)[1].capacity_factor

    used = [float(layer(params, x, b)) for b in (jnp.zeros((E,)), SKEWED, ALL_TO_ONE)]
    assert len(set(used)) == 3 and len(traces) == 1
    assert layer._cache_size() == 1


@pytest.mark.parametrize("kw,match", [
    (dict(router="expert_choice", dispatch="capacity", capacity_factor=0.0),
     "expert_choice fills a fixed capacity"),
    (dict(dispatch="capacity", capacity_factor=math.nan), "must be a finite number"),
    (dict(dispatch="capacity", capacity_factor=0.0, capacity_buckets=(2.0, 1.5)),
     "increasing factors > 0"),
    (dict(dispatch="capacity", capacity_factor=0.0, capacity_layout="ragged"),
     "capacity_layout"),
    (dict(dispatch="capacity", capacity_factor=0.0, capacity_layout="packed",
          overlap_chunks=2), "overlap_chunks=1"),
])
def test_bad_capacity_settings_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**kw)


def test_the_planner_prices_the_packed_layout_as_the_dropless_exchange():
    """The cost model follows `capacity_layout`: packed capacity 0 costs the
    dropless layer (the same rows move and compute), dense capacity 0 its
    largest [E, C] buffer; a packed bound reports the drops of that bound."""
    from jmoe.planner import hardware, layer_cost
    hw = hardware.get("h100")
    base = jmoe.MoEConfig(d_model=1024, d_ff=2048, num_experts=16, top_k=2)
    load = np.array([3.0] + [1.0] * 15)
    load = (load / load.sum()).tolist()

    def cost(cfg):
        return layer_cost.moe_layer_cost(cfg, 4096, 8, hw, load_E=load)
    dropless = cost(base)
    dense = cost(base.replace(dispatch="capacity", capacity_factor=0.0)
                 .with_execution(capacity_layout="dense"))
    packed = cost(base.replace(dispatch="capacity", capacity_factor=0.0))
    assert packed.time == pytest.approx(dropless.time) and packed.drop_fraction == 0.0
    assert dense.time > 1.5 * packed.time
    bounded = cost(base.replace(dispatch="capacity", capacity_factor=-1.25))
    fixed = cost(base.replace(dispatch="capacity", capacity_factor=1.25))
    assert fixed.drop_fraction > 0.05
    assert bounded.drop_fraction == pytest.approx(fixed.drop_fraction)


@pytest.mark.parametrize("overrides", [
    {"model.capacity_factor": 0.0},              # dynamic: auto packs
    {"execution.capacity_layout": "packed"},     # explicit packed, fixed cf
    {"model.capacity_scope": "batch"},           # batch-wide: auto packs
])
def test_the_planner_and_the_adaptive_shortlist_take_the_packed_capacity(overrides, capsys):
    """`jmoe.plan` ranks its candidates (dropless and chunked ones too) for a
    config whose capacity layer packs, and the trainer's adaptive shortlist
    builds valid plans from it: chunked plans exchange dense buffers (the
    same rows kept); a dropless candidate drops the batch scope. Before
    this, the memory estimate read the dense layout's buffer (KeyError) and
    a candidate could build an invalid config."""
    from jmoe.planner import cli
    from jmoe.sharding import make_mesh
    from jmoe.train import loop, plans
    from test_train import CONFIG_FILE, tiny_config
    out = cli.run(["plan", f"--config={CONFIG_FILE}:mixtral_8x7b", "--hardware=h100",
                   "--nodes=1", "--config.model.dispatch=capacity",
                   *(f"--config.{k}={v}" for k, v in overrides.items())])
    assert out["ranked"] and "Predicted" in capsys.readouterr().out
    config = tiny_config(**{"model.dispatch": "capacity", **overrides})
    gpt = loop.validate_config(config)
    assert gpt.moe.packed_capacity
    shortlist = plans.shortlist(plans.AdaptiveConfig(plans=4), gpt, config,
                                make_mesh(config.mesh, owner="config.mesh"))
    assert len(shortlist) == 4
    assert "chunks=1 flat capacity_layout=dense" in shortlist  # the other layout is a plan
    for name, g in shortlist.items():
        dense = g.moe.execution.overlap_chunks > 1 or name.endswith("capacity_layout=dense")
        assert g.moe.packed_capacity == (not dense), name
        assert g.moe.maths() == gpt.moe.maths(), name  # the same function
