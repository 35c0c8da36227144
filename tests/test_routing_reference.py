"""Routing and token movement against references written by hand.

* The expert-parallel dropless exchange (its worst-case buffer, and the
  `ep_buckets` it tries first) equals a per-token reference, forward and
  gradients, with the branch that ran checked from inside it.
* DeepSeek group-limited routing picks groups by the sum of their two best
  selection scores, not the group sum or max; the bias steers selection only.
* Tokens move by gathers, forward and backward: no one-hot `[T, E, C]`
  dispatch tensor and no scatter of token rows in the layer's jaxpr.
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
from checks import assert_tree_close, record_exchange_buffers

D, F, E, K = 16, 32, 8, 2


def _cfg(**kw):
    base = dict(d_model=D, d_ff=F, num_experts=E, top_k=K, group_align=4)
    base.update(kw)
    return moe_config(**base)


# ------------------------------------------------------------- reference --

def _softmax_topk_ids(logits_TE):
    """Each token's K most probable experts, best first (NumPy, per token)."""
    ids = []
    for row in np.asarray(logits_TE, np.float64):
        p = np.exp(row - row.max())
        ids.append(np.argsort(-p, kind="stable")[:K])
    return np.asarray(ids, np.int32)


# ------------------------------------------ dropless exchange vs reference --

T_EP = 128  # 16 tokens (32 assignments) per shard on the 2x4 mesh


def _skewed_inputs(x_shift, w0, w1):
    """Tokens shifted by `x_shift` and router columns 0 and 1 raised by
    w0, w1: experts 0 and 1 (both on expert shard 0) attract more tokens."""
    params = jmoe.init_params(jax.random.key(0), _cfg())
    params["router"]["w_DE"] = params["router"]["w_DE"].at[:, 0].add(w0).at[:, 1].add(w1)
    x = jax.random.normal(jax.random.key(1), (T_EP, D)) + x_shift
    ct = jax.random.normal(jax.random.key(2), (T_EP, D))
    return params, x, ct


# (x shift, router skew of experts 0 and 1), expected exchange rows per
# device. Default buckets on 4 expert shards with 32 assignments each: slots
# of ceil8(1.5*32/4) = 16 and ceil8(3*32/4) = 24 rows per (source,
# destination) pair, so exchanges of 4*16 = 64 and 4*24 = 96 rows, then the
# worst case 4*32 = 128 (every assignment to one device).
SKEWS = {
    "balanced": ((0.0, 0.0, 0.0), 64),      # busiest pair 13 rows
    "one_expert": ((0.5, 1.0, 0.5), 128),   # busiest pair 31; expert 0 gets 122/128 tokens
}


@pytest.mark.parametrize("case,buckets", [
    ("one_expert", ()),        # the worst-case buffer alone, no switch
    ("one_expert", None),      # default buckets, fallback branch taken
    ("balanced", None),        # default buckets, the smallest bucket
])
def test_dropless_exchange_equals_reference(monkeypatch, case, buckets):
    """Expert-parallel dropless (2x4 mesh, dense ragged exchange) equals the
    per-token reference, forward and gradients w.r.t. x and every parameter,
    drops nothing, and ran the exchange buffer the routing calls for."""
    seen = record_exchange_buffers(monkeypatch)
    skew, rows = SKEWS[case]
    cfg = _cfg(dispatch="dropless", ragged_impl="dense")
    if buckets is not None:
        cfg = cfg.with_execution(ep_buckets=buckets)
    else:
        assert cfg.execution.ep_buckets == (1.5, 3.0)
        assert cfg.ep_bucket_slots(32, 4) == [16, 24]
    params, x, ct = _skewed_inputs(*skew)

    @jax.jit
    def run(p, x, ct):
        (y, aux), vjp = jax.vjp(lambda p, x: jmoe.moe_apply(p, x, cfg), p, x)
        return y, aux, vjp((ct, jax.tree.map(jnp.zeros_like, aux)))

    with jax.set_mesh(make_mesh(data=2, expert=4)):
        y, aux, grads = run(params, x, ct)
    jax.effects_barrier()
    assert set(seen) == {rows}, seen

    ids = _softmax_topk_ids(x @ params["router"]["w_DE"])
    y_ref, vjp_ref = jax.vjp(lambda p, x: jax.jit(gathered_reference)(p, x, ids), params, x)
    assert float(aux.dropped_fraction) == 0.0
    np.testing.assert_allclose(np.asarray(aux.expert_load),
                               np.bincount(ids.ravel(), minlength=E) / ids.size, rtol=1e-6)
    assert_tree_close(y, y_ref)
    assert_tree_close(grads, vjp_ref(ct))


# --------------------------------------------------- group-limited routing --

def _logit(s):
    s = np.asarray(s, np.float64)
    return jnp.asarray(np.log(s / (1 - s)), jnp.float32)


# E = 12 in 3 groups of 4. Each row is built so that the three plausible
# group scores pick three different groups:
#   group:               A (0-3)              B (4-7)                C (8-11)
#   scores           .9 .1 .1 .1          .7 .55 .02 .02         .6 .6 .6 .6
#   max                  .9 (A)               .7                     .6
#   sum of top 2         1.0                  1.25 (B)               1.2
#   sum of all           1.2                  1.29                   2.4 (C)
# and the plain top-2 over all experts (.9, .7) straddles groups A and B.
_A = [0.9, 0.1, 0.1, 0.1]
_B = [0.7, 0.55, 0.02, 0.02]
_C = [0.6, 0.6, 0.6, 0.6]


def _group_cfg(**kw):
    base = dict(num_experts=12, top_k=2, router="sigmoid_topk", renormalize=False,
                n_group=3, topk_group=1)
    base.update(kw)
    return _cfg(**base)


def test_group_score_is_the_sum_of_the_two_best():
    """DeepSeek-V3 picks group B (top-2 sum), whatever order the groups come in."""
    rows = [_A + _B + _C, _C + _A + _B, _B + _C + _A]
    want_ids = [[4, 5], [8, 9], [0, 1]]  # B's two best, wherever B sits
    r = routing.route(_logit(rows), _group_cfg())
    np.testing.assert_array_equal(np.asarray(r.experts_TK), want_ids)
    np.testing.assert_allclose(np.asarray(r.weights_TK), [[0.7, 0.55]] * 3, rtol=1e-6)


def test_two_of_three_groups():
    """topk_group=2 with C = .58 .4 .4 .4 (top-2 sum .98, group sum 1.78):
    groups B and A are eligible (the group sum would take C and B), and the
    top 3 of their experts are .9 .7 .55 (without the group limit C's .58
    would be third)."""
    row = _A + _B + [0.58, 0.4, 0.4, 0.4]
    r = routing.route(_logit([row]), _group_cfg(top_k=3, topk_group=2))
    np.testing.assert_array_equal(np.asarray(r.experts_TK), [[0, 4, 5]])


def test_bias_picks_groups_and_experts_but_not_weights():
    """Selection reads sigmoid + bias (groups and experts); the combine
    weights are the unbiased sigmoid scores of the experts picked."""
    scores = [0.9, 0.8, 0.1, 0.1] + [0.5, 0.3, 0.4, 0.1] + [0.2] * 4
    logits = _logit([scores])
    # Unbiased: group A (top-2 sum 1.7) and experts 0, 1.
    r = routing.route(logits, _group_cfg(), jnp.zeros((12,)))
    np.testing.assert_array_equal(np.asarray(r.experts_TK), [[0, 1]])
    # Biased, group B reads .5 .9 1.0 .1 (top-2 sum 1.9 > 1.7): experts 6, 5
    # in biased order, with their unbiased weights .4, .3.
    bias = jnp.zeros((12,)).at[5].set(0.6).at[6].set(0.6)
    for renormalize, want in [(False, [0.4, 0.3]), (True, [0.4 / 0.7, 0.3 / 0.7])]:
        r = routing.route(logits, _group_cfg(renormalize=renormalize, routed_scaling_factor=1.0),
                          bias)
        np.testing.assert_array_equal(np.asarray(r.experts_TK), [[6, 5]])
        np.testing.assert_allclose(np.asarray(r.weights_TK), [want], rtol=1e-6)
    # The bias carries no gradient; the weights' gradient is the sigmoid's.
    g_bias = jax.grad(lambda b: jnp.sum(routing.route(logits, _group_cfg(), b).weights_TK))(bias)
    np.testing.assert_array_equal(np.asarray(g_bias), 0.0)
    g_logits = jax.grad(lambda l: jnp.sum(routing.route(l, _group_cfg(), bias).weights_TK))(logits)
    s = np.asarray(scores)
    want_g = np.zeros(12)
    want_g[[5, 6]] = s[[5, 6]] * (1 - s[[5, 6]])
    np.testing.assert_allclose(np.asarray(g_logits)[0], want_g, rtol=1e-5, atol=1e-7)


# ------------------------------------------------- gathers, never one-hot --

T_J = 128


def _eqns(jaxpr):
    """Every equation of `jaxpr` and the jaxprs nested in it."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax_core.jaxprs_in_params(eqn.params):
            yield from _eqns(sub)


def _vjp_jaxpr(cfg):
    params = jmoe.init_params(jax.random.key(0), cfg)

    def fwd_bwd(p, x, ct):
        y, vjp = jax.vjp(lambda p, x: jmoe.moe_apply(p, x, cfg, mesh=None)[0], p, x)
        return y, vjp(ct)
    x = jnp.zeros((T_J, D))
    return jax.make_jaxpr(fwd_bwd)(params, x, x).jaxpr


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_tokens_move_by_gathers_without_one_hot(dispatch):
    """One device, forward + backward. The [T, E, C] one-hot of GShard-style
    dispatch, or a [T, R] permutation matrix, has T*R >= 128*280 = 35,840
    elements; the layer's largest array here is an [R, F] = 280*32 hidden
    layer. Token rows ([..., D] floats) are gathered both ways; the only
    float scatter is the router's [T, E] top-k transpose (no D-wide rows)."""
    cfg = _cfg(dispatch=dispatch, capacity_factor=1.25)
    cap = math.ceil(1.25 * T_J * K / E)   # 40 slots per expert
    rows = T_J * K + E * (cfg.group_align - 1)  # 280 buffer rows (already a multiple of 4)
    limit = min(T_J * rows, T_J * E * cap)
    eqns = list(_eqns(_vjp_jaxpr(cfg)))
    sizes = [(math.prod(v.aval.shape), e.primitive.name, v.aval.shape) for e in eqns
             for v in e.outvars if hasattr(v.aval, "shape")]
    assert max(sizes)[0] < limit, max(sizes)
    row_shape = lambda v: v.aval.ndim >= 2 and v.aval.shape[-1] == D and jnp.issubdtype(
        v.aval.dtype, jnp.floating)
    gathers = [e for e in eqns if e.primitive.name == "gather" and row_shape(e.invars[0])]
    backward = [e for e in gathers if "transpose" in str(e.source_info.name_stack)]
    # permute + unpermute forward; and the cotangents of both, backward.
    assert len(gathers) - len(backward) >= 2 and len(backward) >= 2, len(gathers)
    scatters = [e for e in eqns if "scatter" in e.primitive.name]
    assert scatters, "the plan's integer bookkeeping scatters are gone: the test lost its view"
    float_scatters = [e for e in scatters if jnp.issubdtype(e.invars[0].aval.dtype, jnp.floating)]
    assert not [e for e in float_scatters if e.invars[0].aval.shape[-1] == D], float_scatters
    assert all(e.invars[0].aval.shape == (T_J, E) and "route" in str(e.source_info.name_stack)
               for e in float_scatters), float_scatters
