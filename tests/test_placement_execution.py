"""The layer under a placement (experts plus redundant replicas on P*S slots)
computes the static layer's function, forward and every gradient, on one
device and expert-parallel; the placement takes effect (rows go where it
says) and is data (another placement of the same sizes does not recompile)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jmoe
from cfg_helpers import moe_config
from checks import assert_tree_close
from jmoe import placement as pl
from jmoe.balance import balance
from jmoe.sharding import exchange, make_mesh
from moe_reference import reference_moe

D, F, E, T = 16, 32, 8, 128
# A skewed router: expert 0 takes ~3x and expert 7 ~2x the mean (selection
# bias of sigmoid routing, so the weights stay those of the plain layer).
BIAS = jnp.zeros((E,)).at[0].set(0.35).at[7].set(0.2)
LOAD = np.array([6.0, 1, 1, 1, 1, 1, 1, 4])


def _cfg(**kw):
    base = dict(d_model=D, d_ff=F, num_experts=E, top_k=2, group_align=4, capacity_factor=8.0,
                router="sigmoid_topk")
    base.update(kw)
    return moe_config(**base)


def _fwd_bwd(cfg, params, x, ct, mesh, placement):
    def run(p, x, ct, arrays):
        f = lambda p, x: jmoe.moe_apply(p, x, cfg, bias=BIAS, mesh=mesh, placement=arrays)
        (y, aux), vjp = jax.vjp(f, p, x)
        return y, aux, vjp((ct, jax.tree.map(jnp.zeros_like, aux)))
    arrays = None if placement is None else placement.as_arrays()
    return jax.jit(run)(params, x, ct, arrays)


def _inputs(cfg):
    params = jmoe.init_params(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (T, D))
    return params, x, jax.random.normal(jax.random.key(2), x.shape)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
@pytest.mark.parametrize("data,expert,slots,replicas,chunks,hierarchy", [
    (1, 8, 2, None, 1, 0), (2, 4, 3, None, 1, 0), (1, 8, 3, 4, 2, 0), (1, 8, 2, None, 1, 2)])
def test_placed_layer_equals_the_static_layer(dispatch, data, expert, slots, replicas, chunks,
                                              hierarchy):
    """Balanced placements with replicas (a replicated expert's gradient is
    the sum over its replicas), with idle slots (R = ep/2), overlap chunks
    and the two-level all-to-all too; capacity with room for every row (a
    replica adds capacity, so it equals the static layer only when nothing
    drops)."""
    cfg = _cfg(dispatch=dispatch, overlap_chunks=chunks, a2a_hierarchy=hierarchy)
    params, x, ct = _inputs(cfg)
    place = balance(LOAD, expert, slots, replicas=replicas)
    assert place.num_redundant == expert * slots - E
    if replicas is not None:  # the idle slots get no rows
        assert (place.share_PS == 0).sum() >= place.num_redundant - replicas
    assert place.imbalance(LOAD) < 1.05 < pl.Placement.static(E, expert).imbalance(LOAD)
    mesh = make_mesh(data=data, expert=expert)
    want = _fwd_bwd(cfg, params, x, ct, mesh=mesh, placement=None)
    got = _fwd_bwd(cfg, params, x, ct, mesh=mesh, placement=place)
    assert float(got[1].dropped_fraction) == 0.0
    assert_tree_close(got, want)


@pytest.mark.parametrize("mesh_shape", [None, (1, 8)])
def test_capacity_under_a_placement_is_one_expert_capacity_per_slot(mesh_shape):
    """Capacity dispatch under a placement: every slot holds one static
    expert's capacity C = ceil(cf*T*K/E), so a replicated expert holds r*C
    rows. Dropped rows against a NumPy count of the split rule (rank r of an
    expert's n rows on a token shard goes to the replica whose cumulative
    shares hold floor(n*c/U) <= r), with drops (cf 1.0, a 3x hot expert)."""
    cfg = _cfg(dispatch="capacity", capacity_factor=1.0)
    params, x, _ = _inputs(cfg)
    ep = 1 if mesh_shape is None else mesh_shape[1]
    place = balance(LOAD, 4 if ep == 1 else ep, 3 if ep == 1 else 2)
    mesh = None if mesh_shape is None else make_mesh(data=1, expert=ep)
    run = jax.jit(lambda p, x, a: jmoe.moe_apply(p, x, cfg, bias=BIAS, mesh=mesh, placement=a))
    _, aux = run(params, x, place.as_arrays())
    r = jmoe.routing.route(jmoe.routing.router_logits(x, params["router"]["w_DE"]), cfg, BIAS)
    experts_TK = np.asarray(r.experts_TK)
    shards = 1 if mesh_shape is None else ep   # capacity is per token shard
    t_local = T // shards
    cap = int(np.ceil(1.0 * t_local * 2 / E))
    slots, share = place.slot_expert_PS.reshape(-1), place.share_PS.reshape(-1)
    dropped = 0
    for k in range(shards):
        mine = experts_TK[k * t_local:(k + 1) * t_local].reshape(-1)
        for e in range(E):
            n = int((mine == e).sum())
            cuts = np.concatenate([[0], np.cumsum(share[slots == e])])
            rows = np.diff([n * c // pl.SHARE_UNITS for c in cuts])
            dropped += int(np.maximum(rows - cap, 0).sum())
    assert dropped > 0  # the case drops
    static_aux = run(params, x, pl.Placement.static(E, place.ep).as_arrays())[1]
    assert float(aux.dropped_fraction) < float(static_aux.dropped_fraction)
    assert round(float(aux.dropped_fraction) * T * 2) == dropped
    assert float(aux.capacity_factor) == pytest.approx(cap * E / (t_local * 2))


@pytest.mark.parametrize("data,expert", [(1, 8), (2, 4)])
def test_batch_capacity_under_a_placement_counts_each_slot_over_the_batch(data, expert):
    """`capacity_scope='batch'` under a placement: every slot holds one
    expert's capacity over the whole batch, C = ceil(cf*T*K/E), whatever
    shard its rows come from. Dropped rows against a NumPy count: the split
    rule per token shard, rows summed per slot over the shards, the excess
    over C dropped. Fewer drop than with per-shard capacities."""
    cf = 0.5  # C = 16 rows per slot for about 16 each: some slots overflow
    cfg = _cfg(dispatch="capacity", capacity_factor=cf, capacity_scope="batch", min_capacity=1)
    params, x, _ = _inputs(cfg)
    place = balance(LOAD, expert, E // expert + 1)
    mesh = make_mesh(data=data, expert=expert)
    run = jax.jit(lambda p, x, c: jmoe.moe_apply(p, x, c, bias=BIAS, mesh=mesh,
                                                  placement=place.as_arrays())[1],
                  static_argnums=2)
    aux = run(params, x, cfg)
    r = jmoe.routing.route(jmoe.routing.router_logits(x, params["router"]["w_DE"]), cfg, BIAS)
    experts_TK = np.asarray(r.experts_TK)
    shards, cap = data * expert, int(np.ceil(cf * T * 2 / E))
    slots, share = place.slot_expert_PS.reshape(-1), place.share_PS.reshape(-1)
    rows_S = np.zeros(slots.size, int)
    t_local = T // shards
    for k in range(shards):
        mine = experts_TK[k * t_local:(k + 1) * t_local].reshape(-1)
        for e in range(E):
            cuts = np.concatenate([[0], np.cumsum(share[slots == e])])
            rows_S[slots == e] += np.diff([int((mine == e).sum()) * c // pl.SHARE_UNITS
                                           for c in cuts])
    dropped = int(np.maximum(rows_S - cap, 0).sum())
    assert dropped > 0  # the case drops
    assert round(float(aux.dropped_fraction) * T * 2) == dropped
    assert float(aux.capacity_factor) == pytest.approx(cap * E / (T * 2))
    per_shard = run(params, x, cfg.replace(capacity_scope="shard"))
    assert float(aux.dropped_fraction) < float(per_shard.dropped_fraction)


def test_placed_layer_on_one_device_equals_the_per_token_reference():
    """Independent of the static layer: the per-token loop of
    tests/moe_reference.py, forward and gradients, under a placement whose
    hot expert has three replicas with unequal shares."""
    cfg = _cfg(dispatch="dropless", num_experts=4, top_k=2)
    params = jmoe.init_params(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (24, D))
    ct = jax.random.normal(jax.random.key(2), x.shape)
    place = pl.Placement(4, np.array([[0, 1, 0], [2, 0, 3]], np.int32),
                         share_PS=np.array([[8192, 32768, 16384], [32768, 8192, 32768]],
                                           np.int32))
    bias = jnp.array([0.3, 0.0, 0.0, 0.1])
    f = lambda p, x: jmoe.moe_apply(p, x, cfg, bias=bias, placement=place.as_arrays())[0]
    y, vjp = jax.vjp(f, params, x)
    got = (y, vjp(ct))
    concrete = (jax.tree.map(np.asarray, params), np.asarray(x))
    ref = lambda p, x: reference_moe(p, x, cfg, bias=bias, concrete=concrete)[0]
    y_ref, vjp_ref = jax.vjp(ref, params, x)
    assert_tree_close(got, (y_ref, vjp_ref(ct)))


def _received_rows(cfg, params, x, mesh, placement, monkeypatch):
    """Rows each device's experts received, seen from inside the exchange."""
    seen = {}
    inner = exchange._exchange_and_run

    def spy(buf, w, cfg_, ep, tp, sizes, **kw):
        rows = jnp.sum(sizes.recv_sizes_P)
        dev = jax.lax.axis_index("expert")
        jax.debug.callback(lambda d, r: seen.__setitem__(int(d), int(r)), dev, rows)
        return inner(buf, w, cfg_, ep, tp, sizes, **kw)

    monkeypatch.setattr(exchange, "_exchange_and_run", spy)
    arrays = None if placement is None else placement.as_arrays()
    jax.block_until_ready(jax.jit(lambda p, x: jmoe.moe_apply(
        p, x, cfg, bias=BIAS, mesh=mesh, placement=arrays)[0])(params, x))
    jax.effects_barrier()
    return np.array([seen[d] for d in range(8)])


def test_the_placement_takes_effect(monkeypatch):
    """Under the skewed router the static layer's busiest device receives
    far more rows than the mean; under the balanced placement the rows are
    spread as the placement's own arithmetic predicts."""
    cfg = _cfg(dispatch="dropless", ep_buckets=())
    t = 1024  # 128 tokens per shard: the split's rounding is a small part of a device's rows
    params = jmoe.init_params(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (t, D))
    mesh = make_mesh(data=1, expert=8)
    static = _received_rows(cfg, params, x, mesh, None, monkeypatch)
    _, aux = jmoe.moe_apply(params, x, cfg, bias=BIAS)
    load_E = np.asarray(aux.expert_load) * t * 2
    place = balance(load_E, 8, 2)
    placed = _received_rows(cfg, params, x, mesh, place, monkeypatch)
    assert static.sum() == placed.sum() == t * 2
    assert static.max() / static.mean() > 1.5
    assert placed.max() / placed.mean() < 1.2
    # The rows per device are the placement's split of each source shard's
    # rows (16 tokens each), summed: computed here from the split rule.
    arrays = place.as_arrays()
    r = jmoe.routing.route(jmoe.routing.router_logits(x, params["router"]["w_DE"]), cfg, BIAS)
    want = np.zeros(8, int)
    for shard in np.split(np.asarray(r.experts_TK), 8):
        count_E = np.bincount(shard.reshape(-1), minlength=E)
        want += np.asarray(pl.slot_rows(arrays, jnp.asarray(count_E))).sum(axis=1)
    np.testing.assert_array_equal(placed, want)


def test_another_placement_does_not_recompile():
    cfg = _cfg(dispatch="dropless")
    params, x, _ = _inputs(cfg)
    mesh = make_mesh(data=1, expert=8)
    traces = []

    @jax.jit
    def f(p, x, arrays):
        traces.append(1)
        return jmoe.moe_apply(p, x, cfg, bias=BIAS, mesh=mesh, placement=arrays)[0]

    a = f(params, x, balance(LOAD, 8, 2).as_arrays())
    b = f(params, x, balance(LOAD[::-1].copy(), 8, 2).as_arrays())
    assert len(traces) == 1
    assert_tree_close(a, b)
    # Arrays already placed on the mesh (as a trainer keeps them) work too.
    on_mesh = jax.device_put(balance(LOAD, 8, 2).as_arrays(), NamedSharding(mesh, P()))
    assert_tree_close(f(params, x, on_mesh), a)


def test_bad_placements_raise_before_compile():
    cfg = _cfg(dispatch="dropless")
    params, x, _ = _inputs(cfg)
    with pytest.raises(ValueError, match="expert axis has 8: build the placement for ep=8"):
        jmoe.moe_apply(params, x, cfg, bias=BIAS, mesh=make_mesh(data=1, expert=8),
                       placement=balance(LOAD, 4, 3).as_arrays())
    with pytest.raises(ValueError, match="placement is for 4 experts but MoEConfig.num_experts=8"):
        jmoe.moe_apply(params, x, cfg, bias=BIAS,
                       placement=pl.Placement.static(4, 2).as_arrays())
    ec = _cfg(dispatch="capacity", router="expert_choice")
    with pytest.raises(ValueError, match="token-choice routing"):
        jmoe.moe_apply(jmoe.init_params(jax.random.key(0), ec), x, ec,
                       placement=balance(LOAD, 4, 3).as_arrays())


def test_the_nnx_and_linen_modules_take_a_placement():
    """Both modules pass `placement=` through (same result, the slot
    weights' gradient reaching the module's own expert weights)."""
    from flax import nnx

    cfg = _cfg(dispatch="dropless", router="softmax_topk")
    x = jax.random.normal(jax.random.key(1), (32, D))
    arrays = balance(LOAD, 2, 5).as_arrays()
    layer = jmoe.MoE(cfg, rngs=nnx.Rngs(params=0))
    loss = lambda m, a: jnp.sum(m(x, placement=a)[0] ** 2)
    g0 = nnx.grad(lambda m: loss(m, None))(layer)
    g1 = nnx.grad(lambda m: loss(m, arrays))(layer)
    assert_tree_close(nnx.state(g1, nnx.Param), nnx.state(g0, nnx.Param))
    lin = jmoe.linen.MoE(cfg)
    variables = lin.init(jax.random.key(0), x)
    assert_tree_close(lin.apply(variables, x, placement=arrays)[0], lin.apply(variables, x)[0])
    # The placement reaches the layer: one for other experts is refused.
    wrong = pl.Placement.static(4, 2).as_arrays()
    with pytest.raises(ValueError, match="placement is for 4 experts"):
        layer(x, placement=wrong)
    with pytest.raises(ValueError, match="placement is for 4 experts"):
        lin.apply(variables, x, placement=wrong)


@pytest.mark.parametrize("data,expert,slots", [(1, 8, 2), (2, 4, 3), (1, 1, 0)])
def test_slot_ordered_weights_equal_the_static_layer(data, expert, slots):
    """Weights stored in slot order (`params["slots"]`): the forward equals the
    static layer's, and every slot's gradient is its expert's gradient (the
    sum over its replicas: replicas tied, so an optimizer keeps them equal).
    (1, 1, 0): one device, a placement of E + 3 slots."""
    cfg = _cfg()
    params, x, ct = _inputs(cfg)
    mesh = make_mesh(data=data, expert=expert) if expert > 1 else None
    place = (balance(LOAD, expert, slots) if expert > 1 else
             pl.Placement(E, np.array([[0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 7]])))
    assert place.num_redundant > 0 or slots == 2
    want_y, _, (want_g, want_gx) = _fwd_bwd(cfg, params, x, ct, mesh=mesh, placement=None)
    slotted = {"router": params["router"], "slots": pl.to_slots(params["experts"], place)}
    got_y, _, (got_g, got_gx) = _fwd_bwd(cfg, slotted, x, ct, mesh=mesh, placement=place)
    assert_tree_close(got_y, want_y)
    assert_tree_close(got_gx, want_gx)
    assert_tree_close(got_g["router"], want_g["router"])
    assert_tree_close(got_g["slots"], pl.to_slots(want_g["experts"], place))
    # Back to logical order: the first replicas hold the experts' gradients.
    assert_tree_close(pl.to_logical(got_g["slots"], place), want_g["experts"])


def test_slot_ordered_weights_move_no_expert_weights():
    """Slot-ordered weights take effect: the compiled step all-gathers no
    expert weights (logical-order weights under a placement all-gather every
    expert), and the replicas' gradient sum all-reduces G+1 = R+1 slots, not E."""
    cfg = _cfg(num_experts=16)
    params = jmoe.init_params(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (T, D))
    mesh = make_mesh(data=1, expert=8)
    load = np.r_[6.0, np.ones(14), 4.0]
    place = balance(load, 8, 3)  # 16 experts + 8 replicas
    arrays = place.as_arrays()

    def hlo(p):
        f = lambda p, x: jnp.sum(jmoe.moe_apply(p, x, cfg, mesh=mesh, placement=arrays)[0] ** 2)
        return jax.jit(jax.grad(f)).lower(p, x).compile().as_text()

    def weight_collectives(text, op):
        # Collectives whose operand has a [*, D, F] or [*, F, D] expert-matrix shape.
        return re.findall(rf"f32\[(\d+),(?:{D},{F}|{F},{D})\][^\n]*? {op}\(", text)

    on_mesh = lambda w: jax.device_put(w, NamedSharding(mesh, P("expert")))
    logical = hlo(dict(params, experts=on_mesh(params["experts"])))
    slotted = hlo({"router": params["router"],
                   "slots": on_mesh(pl.to_slots(params["experts"], place))})
    assert weight_collectives(logical, "all-gather"), "the logical-order path should gather"
    assert not weight_collectives(slotted, "all-gather")
    sizes = {int(n) for n in weight_collectives(slotted, "all-reduce")}
    assert sizes == {place.num_redundant + 1}, sizes
