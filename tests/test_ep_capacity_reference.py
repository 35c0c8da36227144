"""Expert-parallel capacity dispatch with drops against a per-shard reference
written by hand, and the capacity formula pinned by hand-computed cases.

Under a mesh every token shard (data x expert) routes its own T_local tokens
with its own capacity C = max(ceil(cf * T_local * K / E), min_capacity, 1)
and applies `drop_policy` locally, like GShard's groups. The reference below
decides who is kept per token in NumPy (never calling `MoEConfig.capacity`)
and computes the kept assignments' expert MLPs with plain `jnp`, so
`jax.vjp` of it is the reference gradient.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

import jmoe
from jmoe import routing
from jmoe.sharding import make_mesh
from cfg_helpers import moe_config
from moe_reference import gathered_reference
from checks import assert_tree_close

D, F, E, K, T = 16, 32, 8, 2, 64


def _cfg(**kw):
    base = dict(d_model=D, d_ff=F, num_experts=E, top_k=K, dispatch="capacity",
                router="softmax_topk", renormalize=True, group_align=4)
    base.update(kw)
    return moe_config(**base)


# ------------------------------------------------------------- reference --

def _hand_capacity(cf, t_local, k, e, min_capacity):
    """The documented formula, written out here (not `cfg.capacity`)."""
    return max(math.ceil(cf * t_local * k / e), min_capacity, 1)


def _shard_decisions(logits_TE, t_local, cap, policy):
    """Per token shard: each token's top-K experts (softmax, renormalised)
    and which assignments find a slot. Returns (ids_TK, kept_TK, dropped)."""
    t_count = logits_TE.shape[0]
    ids_TK = np.zeros((t_count, K), np.int32)
    kept_TK = np.zeros((t_count, K), bool)
    for s in range(t_count // t_local):
        toks = range(s * t_local, (s + 1) * t_local)
        w = {}
        for t in toks:
            z = logits_TE[t] - logits_TE[t].max()
            p = np.exp(z) / np.exp(z).sum()
            ids_TK[t] = np.argsort(-p, kind="stable")[:K]
            top = p[ids_TK[t]]
            for k in range(K):
                w[t, k] = top[k] / top.sum()
        # GShard order: every top-1 choice before any top-2, then by token.
        order = [(t, k) for k in range(K) for t in toks]
        if policy == "probability":  # heavier weight first, ties in position order
            order = sorted(order, key=lambda a: -w[a])
        load = np.zeros(E, int)
        for t, k in order:
            e = ids_TK[t, k]
            kept_TK[t, k] = load[e] < cap
            load[e] += kept_TK[t, k]
    return ids_TK, kept_TK, int((~kept_TK).sum())


def _reference(params, x, ct, t_local, cap, policy):
    logits = np.asarray(x @ params["router"]["w_DE"], np.float32)
    ids, kept, dropped = _shard_decisions(logits, t_local, cap, policy)
    y, vjp = jax.vjp(lambda p, x: jax.jit(gathered_reference)(p, x, ids, kept), params, x)
    return y, vjp(ct), dropped


def _layer(cfg, mesh, params, x, ct):
    @jax.jit
    def run(p, x, ct):
        (y, aux), vjp = jax.vjp(lambda p, x: jmoe.moe_apply(p, x, cfg), p, x)
        return y, aux, vjp((ct, jax.tree.map(jnp.zeros_like, aux)))
    with jax.set_mesh(mesh):
        return run(params, x, ct)


def _inputs(seed=0):
    params = jmoe.init_params(jax.random.key(seed), _cfg())
    x = jax.random.normal(jax.random.key(seed + 1), (T, D))
    ct = jax.random.normal(jax.random.key(seed + 2), (T, D))
    return params, x, ct


def _mesh(data, expert, devices):
    return make_mesh(data=data, expert=expert, devices=jax.devices()[:devices])


def _check(cfg, mesh, shards, cap):
    params, x, ct = _inputs()
    y_ref, grads_ref, dropped = _reference(params, x, ct, T // shards, cap, cfg.drop_policy)
    y, aux, grads = _layer(cfg, mesh, params, x, ct)
    # Drops are large and counted exactly: the test is about overflowing shards.
    assert dropped > 0.15 * T * K, dropped
    assert float(aux.dropped_fraction) == pytest.approx(dropped / (T * K), rel=1e-6)
    assert_tree_close(y, y_ref)
    assert_tree_close(grads, grads_ref)
    return aux


# data, expert, a2a_hierarchy, devices used, capacity_factor, min_capacity,
# and the per-shard capacity worked out by hand (T_local = 64 / (data*expert)).
MESHES = [
    (1, 8, 0, 8, 0.5, 2, 2),   # T_local=8:  ceil(0.5*8*2/8)=1 < min_capacity=2
    (2, 4, 0, 8, 0.5, 1, 1),   # T_local=8:  ceil(1.0)=1
    (2, 4, 2, 8, 0.75, 1, 2),  # T_local=8:  ceil(1.5)=2, two-level all-to-all
    (2, 2, 0, 4, 0.6, 1, 3),   # T_local=16: ceil(2.4)=3, on 4 devices
]


@pytest.mark.parametrize("policy", ["position", "probability"])
@pytest.mark.parametrize("data,expert,hierarchy,devices,cf,min_cap,cap", MESHES)
def test_ep_capacity_with_drops_equals_per_shard_reference(
        data, expert, hierarchy, devices, cf, min_cap, cap, policy):
    """Forward, dropped fraction and gradients (x and every parameter) of the
    expert-parallel capacity layer equal the per-shard reference."""
    shards = data * expert
    assert _hand_capacity(cf, T // shards, K, E, min_cap) == cap
    cfg = _cfg(capacity_factor=cf, min_capacity=min_cap, drop_policy=policy,
               a2a_hierarchy=hierarchy)
    _check(cfg, _mesh(data, expert, devices), shards, cap)


def _count_all_to_alls(cfg, mesh):
    params, x, _ = _inputs()
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(lambda p, x: jmoe.moe_apply(p, x, cfg)[0])(params, x).jaxpr

    def eqns(j):
        for e in j.eqns:
            yield e
            for sub in jax_core.jaxprs_in_params(e.params):
                yield from eqns(sub)
    return sum(e.primitive.name == "all_to_all" for e in eqns(jaxpr))


@pytest.mark.parametrize("data,expert,devices,cf,cap,policy", [
    (2, 4, 8, 0.75, 2, "position"),      # C=2: chunks of 1 + 1 slots
    (2, 2, 4, 0.6, 3, "probability"),    # C=3: chunks of 2 + 1 slots
])
def test_ep_capacity_overlap_chunks_with_drops_equals_reference(data, expert, devices, cf, cap,
                                                                 policy):
    """overlap_chunks=2 cuts the C slots in two exchanges (twice the
    all-to-alls), and with drops still equals the per-shard reference."""
    shards = data * expert
    assert _hand_capacity(cf, T // shards, K, E, 1) == cap
    mesh = _mesh(data, expert, devices)
    cfg = _cfg(capacity_factor=cf, min_capacity=1, drop_policy=policy)
    chunked = cfg.with_execution(overlap_chunks=2)
    assert _count_all_to_alls(chunked, mesh) == 2 * _count_all_to_alls(cfg, mesh) > 0
    _check(chunked, mesh, shards, cap)


# ------------------------------------------------------- capacity formula --

@pytest.mark.parametrize("cf,t,k,e,min_cap,want", [
    (1.25, 10, 2, 8, 1, 4),   # 1.25*10*2/8 = 3.125 -> 4
    (1.0, 16, 2, 8, 0, 4),    # exactly 4.0: no rounding up past an integer
    (2.0, 12, 1, 4, 0, 6),    # exactly 6.0
    (1.0, 4, 1, 8, 3, 3),     # ceil(0.5) = 1, min_capacity wins
    (0.1, 1, 1, 8, 0, 1),     # ceil(0.0125) = 1; never below 1
    (0.5, 7, 3, 6, 0, 2),     # 0.5*7*3/6 = 1.75 -> 2
    (1.5, 100, 2, 16, 4, 19), # 18.75 -> 19, above min_capacity
])
def test_capacity_formula_by_hand(cf, t, k, e, min_cap, want):
    cfg = jmoe.MoEConfig(d_model=D, d_ff=F, num_experts=e, top_k=k, dispatch="capacity",
                         renormalize=False, capacity_factor=cf, min_capacity=min_cap)
    assert cfg.capacity(t) == want
    # Expert choice fills the same number of slots per expert.
    ec = cfg.replace(router="expert_choice")
    assert ec.capacity(t) == want


def test_expert_choice_takes_the_hand_computed_capacity():
    """Each expert takes ceil(cf*T*K/E) tokens, at most T."""
    logits = jax.random.normal(jax.random.key(0), (10, E))
    cfg = _cfg(router="expert_choice", capacity_factor=1.25, min_capacity=1)
    assert routing.route(logits, cfg).tokens_EC.shape == (E, 4)   # ceil(3.125)
    big = cfg.replace(capacity_factor=8.0)                          # 20 slots > 10 tokens
    assert routing.route(logits, big).tokens_EC.shape == (E, 10)


@pytest.mark.parametrize("cf,min_cap,kept_per_expert", [(1.25, 1, 4), (1.25, 6, 6),
                                                        (1.0, 0, 3)])
def test_one_device_layer_keeps_the_hand_computed_capacity(cf, min_cap, kept_per_expert):
    """Every token sends both assignments to experts 0 and 1 (bias on
    selection), so each keeps exactly C of its T=10: dropped = (2T - 2C) / 2T."""
    cfg = _cfg(router="sigmoid_topk", capacity_factor=cf, min_capacity=min_cap)
    params = jmoe.init_params(jax.random.key(0), cfg)
    bias = jnp.zeros((E,)).at[:2].set(100.0)
    x = jax.random.normal(jax.random.key(1), (10, D))
    _, aux = jax.jit(lambda p, x, b: jmoe.moe_apply(p, x, cfg, bias=b))(params, x, bias)
    assert float(aux.dropped_fraction) == pytest.approx((20 - 2 * kept_per_expert) / 20)


# ------------------------------------------------- batch-wide capacity --

# data, expert, a2a_hierarchy, devices, capacity_factor, the batch-wide C by
# hand (T=64 over all shards: ceil(cf*64*2/8)), capacity layout, chunks.
BATCH_CASES = [
    (1, 8, 0, 8, 0.5, 8, "auto", 1),     # 0.5*16 = 8; auto packs
    (2, 4, 2, 8, 0.75, 12, "packed", 1),  # 12; two-level all-to-all
    (2, 2, 0, 4, 0.6, 10, "dense", 2),    # 9.6 -> 10; dense buffers, 2 chunks
]


@pytest.mark.parametrize("data,expert,hierarchy,devices,cf,cap,layout,chunks", BATCH_CASES)
def test_batch_capacity_equals_the_one_batch_reference(data, expert, hierarchy, devices, cf,
                                                       cap, layout, chunks):
    """`capacity_scope='batch'`: expert-parallel, the layer keeps and drops
    what one shard holding the whole batch keeps (C over all T tokens, every
    top-1 choice of the batch before any top-2, then token order across
    shards): forward, dropped fraction and every gradient equal the
    reference with a single shard of T tokens. The per-shard scope drops
    other rows on the same batch (the option takes effect)."""
    assert _hand_capacity(cf, T, K, E, 1) == cap
    mesh = _mesh(data, expert, devices)
    cfg = _cfg(capacity_factor=cf, min_capacity=1, capacity_scope="batch",
               capacity_layout=layout, overlap_chunks=chunks, a2a_hierarchy=hierarchy)
    assert cfg.packed_capacity == (layout != "dense")
    aux = _check(cfg, mesh, 1, cap)
    assert float(aux.capacity_factor) == pytest.approx(cap * E / (T * K))
    params, x, ct = _inputs()
    per_shard = _layer(cfg.replace(capacity_scope="shard"), mesh, params, x, ct)[1]
    assert float(per_shard.dropped_fraction) != pytest.approx(float(aux.dropped_fraction))


@pytest.mark.parametrize("kw,fix", [
    (dict(drop_policy="probability"), "drop_policy='position'"),
    (dict(dispatch="dropless"), "dispatch='capacity'"),
    (dict(capacity_factor=0.0), "capacity_factor > 0"),
    (dict(capacity_factor=-2.0), "capacity_factor > 0"),
    (dict(router="expert_choice"), "token-choice router"),
])
def test_batch_capacity_refuses_what_it_cannot_rank(kw, fix):
    with pytest.raises(ValueError, match=r"capacity_scope") as err:
        _cfg(capacity_scope="batch", **kw)
    assert fix in str(err.value)
    with pytest.raises(ValueError, match="choose one of"):
        _cfg(capacity_scope="global")


def test_the_planner_prices_the_batch_wide_capacity():
    """The cost model: a batch-wide capacity adds the counts' all-gather; in
    dense buffers it holds C over the ep shards' tokens from every shard
    (by hand: ceil(1.25 * 4096*8 * 2 / 64) = 1280 rows per expert), and
    `auto` runs it packed (priced as the dropless exchange plus its drops)."""
    from jmoe.planner import hardware, layer_cost
    hw = hardware.get("h100")

    def cost(**kw):
        m = jmoe.MoEConfig(d_model=256, d_ff=512, num_experts=64, top_k=2, dispatch="capacity",
                           **kw)
        return layer_cost.moe_layer_cost(m, 4096, 8, hw)
    shard, dense = cost(), cost(capacity_scope="batch",
                                execution=jmoe.Execution(capacity_layout="dense"))
    packed = cost(capacity_scope="batch")
    assert shard.detail["capacity"] == 160 and dense.detail["capacity"] == 1280
    assert dense.time > shard.time
    names = lambda c: [o.name for o in c.ops]
    assert "batch_rank_all_gather" in names(dense) and "batch_rank_all_gather" not in names(shard)
    assert "a2a_counts" in names(packed) and "a2a_counts" not in names(dense)


@pytest.mark.slow
def test_training_with_a_batch_wide_capacity_does_not_depend_on_the_token_shards(tmp_path):
    """The trainer with capacity dispatch that drops (cf 0.5): on mesh
    expert=8 (8 token shards) and on expert=4 x tensor=2 (4 token shards),
    a batch-wide capacity trains the same losses (to 1e-5); per-shard
    capacities do not (they drop other rows)."""
    from test_train import tiny_config, train_losses
    from jmoe.train import loop

    def losses(scope, expert, tensor):
        workdir = str(tmp_path / f"{scope}{expert}{tensor}")
        loop.run(tiny_config(**{"total_steps": 4, "opt.schedule_steps": 4, "eval_every": 4,
                                "checkpoint_every": 4, "model.dispatch": "capacity",
                                "model.capacity_factor": 0.5, "model.min_capacity": 1,
                                "model.capacity_scope": scope, "mesh.expert": expert,
                                "mesh.tensor": tensor}), workdir)
        return np.array([v for _, v in sorted(train_losses(workdir).items())])
    batch8, batch4 = losses("batch", 8, 1), losses("batch", 4, 2)
    np.testing.assert_allclose(batch4, batch8, rtol=1e-5, atol=1e-5)
    shard8, shard4 = losses("shard", 8, 1), losses("shard", 4, 2)
    assert np.abs(shard8 - shard4).max() > 1e-3
