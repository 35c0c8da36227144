"""Shadow experts (`Execution.shadow_experts`, FasterMoE): the hottest experts
of a step computed on every device for its own tokens. Same function and
gradients as the plain layer, against the per-token reference and under
placements, chunks and the two-level all-to-all; the option takes effect
(the hot experts' rows stop crossing devices); the choice is the global top-s."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe
from cfg_helpers import moe_config
from checks import assert_tree_close
from jmoe.balance import balance
from jmoe.sharding import exchange, make_mesh
from jmoe.sharding.shadow import hottest_experts
from moe_reference import reference_moe

D, F, E, T = 16, 32, 8, 128
# Expert 0 takes ~3x and expert 7 ~2x the mean.
BIAS = jnp.zeros((E,)).at[0].set(0.35).at[7].set(0.2)


def _cfg(**kw):
    base = dict(d_model=D, d_ff=F, num_experts=E, top_k=2, group_align=4,
                router="sigmoid_topk", dispatch="dropless")
    base.update(kw)
    return moe_config(**base)


def _inputs(t=T):
    params = jmoe.init_params(jax.random.key(0), _cfg())
    x = jax.random.normal(jax.random.key(1), (t, D))
    return params, x, jax.random.normal(jax.random.key(2), x.shape)


def _fwd_bwd(cfg, params, x, ct, mesh, placement=None):
    arrays = None if placement is None else placement.as_arrays()

    def run(p, x, ct):
        f = lambda p, x: jmoe.moe_apply(p, x, cfg, bias=BIAS, mesh=mesh, placement=arrays)[0]
        y, vjp = jax.vjp(f, p, x)
        return y, vjp(ct)
    return jax.jit(run)(params, x, ct)


def test_shadowed_layer_equals_the_per_token_reference():
    """Independent of the layer: the per-token loop of tests/moe_reference.py,
    forward and every gradient, with the two hottest experts shadowed."""
    cfg = _cfg(shadow_experts=2)
    params, x, ct = _inputs()
    got = _fwd_bwd(cfg, params, x, ct, make_mesh(data=1, expert=8))
    concrete = (jax.tree.map(np.asarray, params), np.asarray(x))
    ref = lambda p, x: reference_moe(p, x, cfg, bias=BIAS, concrete=concrete)[0]
    y_ref, vjp_ref = jax.vjp(ref, params, x)
    assert_tree_close(got, (y_ref, vjp_ref(ct)))


@pytest.mark.parametrize("data,expert,shadows,chunks,hierarchy,slots", [
    (2, 4, 2, 1, 0, 0), (1, 8, 2, 2, 2, 0), (1, 8, 1, 1, 0, 2)])
def test_shadowed_layer_equals_the_plain_layer(data, expert, shadows, chunks, hierarchy, slots):
    """Forward and gradients equal the unshadowed layer's on (1, 8) and
    (2, 4), with overlap chunks, the two-level all-to-all, and under a
    placement with replicas (slots=2: 8 experts + 8 replicas)."""
    params, x, ct = _inputs()
    mesh = make_mesh(data=data, expert=expert)
    place = balance(np.array([6.0, 1, 1, 1, 1, 1, 1, 4]), expert, slots) if slots else None
    plain = _cfg(overlap_chunks=chunks, a2a_hierarchy=hierarchy)
    want = _fwd_bwd(plain, params, x, ct, mesh, place)
    got = _fwd_bwd(plain.with_execution(shadow_experts=shadows), params, x, ct, mesh, place)
    assert_tree_close(got, want)


def _rows_from_other_devices(cfg, params, x, mesh, monkeypatch):
    """[P] rows each device's experts receive from other devices (spied inside
    the exchange: recv_sizes_P[q] rows come from device q)."""
    seen = {}
    inner = exchange._exchange_and_run

    def spy(buf, w, cfg_, ep, tp, sizes, **kw):
        dev = jax.lax.axis_index("expert")
        others = jnp.sum(sizes.recv_sizes_P) - sizes.recv_sizes_P[dev]
        jax.debug.callback(lambda d, r: seen.__setitem__(int(d), int(r)), dev, others)
        return inner(buf, w, cfg_, ep, tp, sizes, **kw)

    monkeypatch.setattr(exchange, "_exchange_and_run", spy)
    jax.block_until_ready(jax.jit(lambda p, x: jmoe.moe_apply(
        p, x, cfg, bias=BIAS, mesh=mesh)[0])(params, x))
    jax.effects_barrier()
    return np.array([seen[d] for d in range(8)])


def test_shadowing_takes_effect(monkeypatch):
    """With expert 0 shadowed, no row of expert 0 crosses devices: the rows a
    device receives from others are exactly the other shards' assignments to
    its unshadowed experts, counted here from the routing."""
    t = 1024
    params, x, _ = _inputs(t)
    mesh = make_mesh(data=1, expert=8)
    plain = _cfg(ep_buckets=())
    static = _rows_from_other_devices(plain, params, x, mesh, monkeypatch)
    shadowed = _rows_from_other_devices(plain.with_execution(shadow_experts=1), params, x, mesh,
                                        monkeypatch)
    r = jmoe.routing.route(jmoe.routing.router_logits(x, params["router"]["w_DE"]), plain, BIAS)
    experts_TK = np.asarray(r.experts_TK)
    counts = np.bincount(experts_TK.reshape(-1), minlength=E)
    assert counts.argmax() == 0
    want_static, want_shadow = np.zeros(8, int), np.zeros(8, int)
    for src, shard in enumerate(np.split(experts_TK.reshape(-1, 2), 8)):
        for e in shard.reshape(-1):
            if e != src:  # expert e lives on device e (one expert per device)
                want_static[e] += 1
                want_shadow[e] += e != 0
    np.testing.assert_array_equal(static, want_static)
    np.testing.assert_array_equal(shadowed, want_shadow)
    assert shadowed[0] == 0 < static[0]


def test_hottest_experts_are_the_global_top_s_with_ties_to_the_lower_id():
    experts_TK = jnp.array([[3, 5], [5, 1], [3, 2], [1, 6]])  # counts: 1:2, 3:2, 5:2, 2:1, 6:1
    np.testing.assert_array_equal(hottest_experts(experts_TK, 8, 2, ()), [1, 3])
    np.testing.assert_array_equal(hottest_experts(experts_TK, 8, 4, ()), [1, 3, 5, 2])


@pytest.mark.parametrize("kw,match", [
    (dict(dispatch="capacity", capacity_factor=1.25), "shadow experts run on the dropless path"),
    (dict(shadow_experts=-1), "must be an integer >= 0"),
    (dict(shadow_experts=9), "at most num_experts=8"),
])
def test_bad_shadow_settings_raise(kw, match):
    kw = dict(kw)
    shadows = kw.pop("shadow_experts", 1)
    with pytest.raises(ValueError, match=match):
        _cfg(**kw).with_execution(shadow_experts=shadows)
