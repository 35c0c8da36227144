"""bf16 numerics: accumulation is fp32, and bf16 layers stay within bf16 rounding.

bf16 keeps 8 significant bits (7 stored + 1 implicit), so one round-to-nearest
has relative error at most u = 2^-8 (fp32: 2^-24). The grouped matmuls promise
fp32 accumulation with one final rounding to the output dtype; a bf16
accumulator instead rounds every partial sum, which the kernels' own tests
(tolerance 2e-2 of max|ref|) cannot tell apart. Here:

* the traced programs of both backends (forward and backward, Pallas kernel
  bodies included) must carry every product and every floating-point sum in
  fp32 (deterministic);
* long positive contractions (no cancellation, so the exact sum bounds every
  partial sum) must come out as the bf16 rounding of the exact result, which a
  bf16 accumulator misses by several units in the last place;
* the MoE layer and a tiny GPT in bf16 must match an fp32 run on the same
  bf16-rounded numbers to within what a few bf16 roundings explain.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from cfg_helpers import gpt_config
from moe_reference import reference_moe

import jmoe
from jmoe import kernels
from jmoe import model as M

U_BF16 = 2.0 ** -8  # unit roundoff of bf16 (8 significant bits)
U_F32 = 2.0 ** -24


# ---------------------------------------------------------------------------
# Kernels, structurally: every product and every sum in fp32.


def _walk(jaxpr, in_kernel=False):
    """(eqn, in_kernel) for every equation of `jaxpr` and its sub-jaxprs (loops,
    conds, custom_vjp calls, Pallas kernel bodies); in_kernel: inside a pallas_call."""
    for eqn in jaxpr.eqns:
        yield eqn, in_kernel
        for sub in jcore.jaxprs_in_params(eqn.params):
            yield from _walk(sub, in_kernel or eqn.primitive.name == "pallas_call")


def _loop_carries(eqn):
    """The loop-carried values of a while or scan equation (else [])."""
    if eqn.primitive.name == "while":
        return eqn.params["body_jaxpr"].jaxpr.invars[eqn.params["body_nconsts"]:]
    if eqn.primitive.name == "scan":
        c = eqn.params["num_consts"]
        return eqn.params["jaxpr"].jaxpr.invars[c:c + eqn.params["num_carry"]]
    return []


def _is_float(aval) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.floating)


SUMS = ("add", "add_any", "sub", "reduce_sum", "cumsum")


def _accumulators(eqn):
    """Floating loop carries of a while/scan that its body sums into (directly
    or after a dtype conversion): the loop's accumulators. (Output buffers
    are carried too, but only written into with dynamic_update_slice.)"""
    carries = [v for v in _loop_carries(eqn) if _is_float(v.aval)]
    if not carries:
        return []
    body = (eqn.params["body_jaxpr"] if eqn.primitive.name == "while"
            else eqn.params["jaxpr"]).jaxpr
    origin = {v: v for v in carries}
    found = []
    for e in body.eqns:
        srcs = [origin[v] for v in e.invars if isinstance(v, jcore.Var) and v in origin]
        if e.primitive.name == "convert_element_type" and srcs:
            origin[e.outvars[0]] = srcs[0]
        elif e.primitive.name in SUMS:
            found += [v for v in srcs if v not in found]
    return found


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_traced_kernels_accumulate_in_fp32(backend):
    """gmm and tgmm, forward and backward, on bf16 operands: every dot_general
    produces fp32, every floating add/sum runs in fp32, every loop carry that
    is summed into is fp32, and inside the Pallas kernels every floating loop
    carry (the accumulator) is fp32."""
    m, k, n, g = 96, 64, 48, 3
    bf = jnp.bfloat16
    gs = jnp.asarray([40, 0, 50], jnp.int32)
    tiling = (32, 16, 16)

    def gmm_tgmm(lhs, rhs, dout, d_rhs):
        out, vjp = jax.vjp(lambda a, b: kernels.gmm(a, b, gs, backend=backend, tiling=tiling),
                           lhs, rhs)
        t_out, t_vjp = jax.vjp(lambda a, d: kernels.tgmm(a, d, gs, backend=backend,
                                                         tiling=tiling), lhs, dout)
        return out, vjp(dout), t_out, t_vjp(d_rhs)

    args = (jax.ShapeDtypeStruct((m, k), bf), jax.ShapeDtypeStruct((g, k, n), bf),
            jax.ShapeDtypeStruct((m, n), bf), jax.ShapeDtypeStruct((g, k, n), bf))
    jaxpr = jax.make_jaxpr(gmm_tgmm)(*args).jaxpr
    dots, kernel_carries, accumulators, bad = 0, 0, 0, []
    for eqn, in_kernel in _walk(jaxpr):
        name = eqn.primitive.name
        outs = [v.aval for v in eqn.outvars]
        if name == "dot_general":
            dots += 1
            if outs[0].dtype != jnp.float32 or eqn.params["preferred_element_type"] != jnp.float32:
                bad.append(f"dot_general {[str(v.aval) for v in eqn.invars]} -> {outs[0]} "
                           f"(preferred_element_type={eqn.params['preferred_element_type']})")
        elif name in SUMS and _is_float(outs[0]) and outs[0].dtype != jnp.float32:
            bad.append(f"{name} -> {outs[0]}")
        for v in _accumulators(eqn):
            accumulators += 1
            if v.aval.dtype != jnp.float32:
                bad.append(f"{name} loop accumulates into a {v.aval} carry")
        if in_kernel:
            for v in _loop_carries(eqn):
                if _is_float(v.aval):
                    kernel_carries += 1
                    if v.aval.dtype != jnp.float32:
                        bad.append(f"Pallas kernel loop carries {v.aval} (an accumulator)")
    # gmm forward, its dlhs (transposed gmm) and drhs (tgmm), tgmm forward,
    # and tgmm's two backward gmms: each backend traces at least five products.
    assert dots >= 5, f"found only {dots} dot_generals: the walk missed the kernels"
    # At least the row-chunk loops of the two tgmms (drhs and tgmm forward).
    assert accumulators >= 2, f"found only {accumulators} loop accumulators"
    if backend == "pallas":
        assert kernel_carries >= 5, "found no accumulator inside the Pallas kernels"
    assert not bad, "bf16 accumulation:\n" + "\n".join(bad)


# ---------------------------------------------------------------------------
# Kernels, numerically: long positive contractions are rounded once.


@functools.partial(jax.jit, static_argnames=("backend", "tiling"))
def _gmm_fwd_bwd(lhs, rhs, gs, dout, *, backend, tiling):
    out, vjp = jax.vjp(lambda a, b: kernels.gmm(a, b, gs, backend=backend, tiling=tiling),
                       lhs, rhs)
    return (out, *vjp(dout))


def _check_rounded_once(got, want, n_terms, what):
    """`want`: exact fp64 sums of n_terms non-negative products of bf16 numbers.

    fp32 accumulation: products of two bf16 numbers are exact in fp32, and
    the fp32 sum s has |s - want| <= gamma * want with gamma = n * 2^-24 (all
    terms >= 0, so every partial sum is <= want); rounding s to bf16 adds
    at most u * |s|. So |got - want| <= (u * (1 + gamma) + gamma) * want.
    Typically |s - want| is ~sqrt(n) * 2^-24 * want, so `got` equals
    bf16(want) unless want lies that close to a bf16 rounding midpoint
    (probability ~1e-3 for n = 2048): at least 99% must match exactly.
    A bf16 accumulator rounds each partial sum (each within u of the final
    value), so its errors add over the blocks and break both checks.
    """
    got = np.asarray(got.astype(jnp.float32), np.float64)
    assert np.all(want > 0)
    gamma = n_terms * U_F32
    rel = np.abs(got - want) / want
    bound = U_BF16 * (1 + gamma) + gamma
    want_bf16 = np.asarray(jnp.asarray(want, jnp.float32).astype(jnp.bfloat16), np.float64)
    exact = float(np.mean(got == want_bf16))
    assert rel.max() <= bound and exact >= 0.99, (
        f"{what} (sums of {n_terms} terms): max relative error {rel.max():.2e} "
        f"(bound for fp32 accumulation {bound:.2e}), {exact:.1%} equal to the "
        "correctly rounded result (want >= 99%): accumulation is not fp32")


@pytest.mark.parametrize("backend,tiling", [("xla", (128, 128, 128)),
                                            ("pallas", (64, 32, 64))])
def test_bf16_gmm_rounds_once(backend, tiling):
    """out (sums over K), dlhs (over N) and drhs (over a group's rows) of a
    bf16 gmm equal the correctly rounded exact sums. Tiles split each
    contraction into 8-64 blocks/chunks, so a bf16 accumulator rounds often."""
    m, k, n = 1024, 2048, 256
    sizes = [512, 512]  # each group: 512 rows = 4 XLA chunks / 8 Pallas row chunks
    rng = np.random.default_rng(0)
    # Positive inputs in [0.5, 1): no cancellation, every partial sum grows.
    lhs, rhs, dout = (jnp.asarray(rng.uniform(0.5, 1.0, s), jnp.bfloat16)
                      for s in [(m, k), (2, k, n), (m, n)])
    out, dlhs, drhs = _gmm_fwd_bwd(lhs, rhs, jnp.asarray(sizes, jnp.int32), dout,
                                   backend=backend, tiling=tiling)
    l64, r64, d64 = (np.asarray(a.astype(jnp.float32), np.float64) for a in (lhs, rhs, dout))
    rows = [slice(0, 512), slice(512, 1024)]
    want_out = np.concatenate([l64[r] @ r64[g] for g, r in enumerate(rows)])
    want_dlhs = np.concatenate([d64[r] @ r64[g].T for g, r in enumerate(rows)])
    want_drhs = np.stack([l64[r].T @ d64[r] for r in rows])
    _check_rounded_once(out, want_out, k, "out")
    _check_rounded_once(dlhs, want_dlhs, n, "dlhs")
    _check_rounded_once(drhs, want_drhs, 512, "drhs")


# ---------------------------------------------------------------------------
# The MoE layer in bf16 against an fp32 reference on the same bf16 numbers.


def _rel_errors(got, want):
    """(RMS error, max error), both relative to the RMS of `want`."""
    got, want = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (got, want))
    scale = np.sqrt(np.mean(want ** 2))
    err = got - want
    return np.sqrt(np.mean(err ** 2)) / scale, np.abs(err).max() / scale


# Tolerances for a bf16 layer, in units of u = 2^-8, relative to the output's
# RMS. Inputs and weights are the same bf16 numbers on both sides, so every
# difference comes from rounding intermediate results to bf16: each rounding
# has relative error <= u (RMS <= u/sqrt(3) ~ 0.58u). Along one token's path
# there are ~7 in series (gate and up outputs, SiLU's sigmoid and product, the
# hidden product, the down output, the combine's output), plus SiLU's
# condition number 1 + |gate| ~ 2-3 on the gate's error. With fp32
# accumulation the errors are independent across the F (or D) terms of each
# contraction, so they add in quadrature and stay relative to the output:
# RMS ~ sqrt(7 + 3^2) * 0.58u ~ 2.3u at worst (measured 1.2u). A bf16
# running sum over n terms instead rounds every partial sum, ~0.4u * sqrt(n)
# of the result (~6u for D=256), and a token routed differently misses by
# ~100% of its output.
MOE_RMS_TOL = 3 * U_BF16
# Max over T*D ~ 16k elements of errors of RMS <= 3u: ~5 sigma (measured 6.5u).
MOE_MAX_TOL = 16 * U_BF16


@pytest.mark.parametrize("dtype,param_dtype,backend", [
    ("bfloat16", "bfloat16", "xla"), ("bfloat16", "bfloat16", "pallas"),
    ("bfloat16", "float32", "xla"), ("float32", "bfloat16", "xla")])
def test_moe_layer_bf16_against_fp32_reference(dtype, param_dtype, backend):
    """moe_apply with bf16 compute and/or bf16 weights against
    tests/moe_reference.py in fp32 on the same (bf16-rounded) numbers.

    bf16 compute must differ from fp32 (the option took effect) by no more
    than bf16 rounding explains; bf16 weights with fp32 compute are upcast,
    not the activations downcast, so that case matches to fp32 precision.
    """
    d, f, e, k, t = 256, 512, 4, 2, 64
    cfg = jmoe.MoEConfig(d_model=d, d_ff=f, num_experts=e, top_k=k, group_align=16,
                         dtype=dtype, param_dtype=param_dtype,
                         execution=jmoe.Execution(gmm_backend=backend))
    params = jmoe.init_params(jax.random.key(0), cfg)
    # fp32 input holding bf16 numbers: the layer's output comes back in fp32,
    # so an fp32 computation (the dtype ignored) would show as a tiny error.
    x_TD = jax.random.normal(jax.random.key(1), (t, d)).astype(jnp.bfloat16).astype(jnp.float32)
    y_TD, aux = jax.jit(lambda p, x: jmoe.moe_apply(p, x, cfg))(params, x_TD)
    assert y_TD.dtype == jnp.float32
    assert all(a.dtype == jnp.dtype(param_dtype) for a in jax.tree.leaves(params))

    p32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    cfg32 = dataclasses.replace(cfg, dtype="float32", param_dtype="float32")
    want_TD, _ = reference_moe(p32, x_TD, cfg32)

    # Routing must be the same decision on both sides: both compute router
    # logits in fp32 from the same numbers, and every token's k-th and
    # (k+1)-th probabilities are far apart compared to fp32 rounding.
    logits = np.asarray(x_TD, np.float64) @ np.asarray(p32["router"]["w_DE"], np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    ranked = -np.sort(-probs, axis=1)
    assert (ranked[:, k - 1] - ranked[:, k]).min() > 1e-4, "near-tie: pick another seed"
    chosen = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(np.asarray(aux.expert_load) * t * k,
                                  np.bincount(chosen.ravel(), minlength=e))
    # The router runs in fp32 whatever the compute dtype: its mean
    # probabilities match fp64 to fp32 precision (bf16 logits would be off
    # by ~u * |logit| ~ 1e-3).
    np.testing.assert_allclose(aux.expert_prob, probs.mean(0), rtol=1e-5,
                               err_msg="router probabilities are not fp32")

    rms, worst = _rel_errors(y_TD, want_TD)
    if dtype == "float32":
        # Weights upcast: an fp32 computation on the same numbers.
        assert worst <= 1e-5, f"fp32 compute on bf16 weights: max error {worst:.1e} of RMS"
    else:
        assert rms > 0.1 * U_BF16, f"RMS error {rms:.1e}: dtype=bfloat16 took no effect"
        assert rms <= MOE_RMS_TOL and worst <= MOE_MAX_TOL, (
            f"bf16 layer vs fp32: RMS error {rms / U_BF16:.2f}u, max {worst / U_BF16:.2f}u "
            f"(tolerances {MOE_RMS_TOL / U_BF16:.0f}u, {MOE_MAX_TOL / U_BF16:.0f}u; u = 2^-8)")


# ---------------------------------------------------------------------------
# The GPT in bf16 against the same model in fp32, on the same bf16 weights.


class _Tap:
    """Stands in for a block's MoE layer and keeps its input (traced)."""

    def __init__(self, inner, seen: list):
        self.inner, self.seen = inner, seen

    def __call__(self, x_BTD, **kw):
        self.seen.append(x_BTD)
        return self.inner(x_BTD, **kw)


def _logits_and_moe_inputs(graphdef, state, tokens_BT):
    """Model logits [B, T, V] and the input [B, T, D] of each MoE layer."""
    @jax.jit
    def run(state, tokens_BT):
        model = nnx.merge(graphdef, state)
        seen = []
        for block in model.blocks:
            if block.is_moe:
                block.ffn = _Tap(block.ffn, seen)
        logits_BTV, _ = model(tokens_BT)
        return logits_BTV, seen

    return run(state, tokens_BT)


# Logits of the bf16 model, relative to their RMS (u = 2^-8). Weights are the
# same bf16 numbers in both models, so differences come from rounding
# activations: each rounding <= u (RMS <= 0.58u), ~8 per layer in series
# (q/k/v, attention output, projection, residual add, norm, FFN hidden and
# output, residual add) plus the final norm and unembedding; the attention
# softmax, rotary angles and norms run in fp32. Independent errors add in
# quadrature: sqrt(2 * 8 + 2) * 0.58u ~ 2.5u (measured 1.9u, max 11u).
# Rotary angles in bf16 (RMS 3.0u, max 24u) or the attention's P @ V summed
# in bf16 (3.8u, max 25u) exceed it; test_model's atol=0.15 allows ~45u
# here. A token whose router picks other experts in bf16 (a near-tie flipped
# by that noise) is off by ~50u: those are counted and checked apart.
MODEL_RMS_TOL = 3 * U_BF16
# Max over 16k logits of errors of RMS <= 3u: ~5 sigma (measured 11u).
MODEL_MAX_TOL = 16 * U_BF16


def test_gpt_bf16_logits_against_fp32():
    """A tiny GPT (dense layer, then an MoE layer; GQA attention; T=256 so
    rotary angles reach 255 rad) with dtype='bfloat16' against
    dtype='float32' on the same bf16-rounded weights: tokens routed alike
    match to bf16 rounding; tokens routed differently are few near-ties."""
    kw = dict(vocab_size=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
              d_ff=32, num_experts=4, top_k=2, group_align=1, first_dense_layers=1)
    cfg32, cfg16 = gpt_config(kw), gpt_config(dict(kw, dtype="bfloat16"))
    assert cfg32.moe_layers == (1,) and cfg16.moe.dtype == "bfloat16"
    graphdef32, state = nnx.split(M.init_model(cfg32, 0))
    # At init the unit-scale embedding dominates the residual stream (and is
    # exact in bf16), so the logits would barely see attention and the FFNs;
    # at 1/10 of it they carry the logits (zeroing attention moves them ~110%).
    state["embed_VD"][...] = state["embed_VD"][...] * 0.1
    # fp32 weights holding bf16 numbers: the bf16 model's casts are exact.
    state = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(a.dtype)
                         if jnp.issubdtype(a.dtype, jnp.floating) else a, state)
    graphdef16, _ = jax.eval_shape(lambda: nnx.split(M.GPT(cfg16, rngs=nnx.Rngs(params=0))))
    tokens_BT = jax.random.randint(jax.random.key(3), (1, 256), 0, 64)
    logits32, (in32,) = _logits_and_moe_inputs(graphdef32, state, tokens_BT)
    logits16, (in16,) = _logits_and_moe_inputs(graphdef16, state, tokens_BT)
    assert in16.dtype == jnp.bfloat16 and in32.dtype == jnp.float32  # dtype took effect

    # Routing of the MoE layer, as jmoe decides it: top-k of fp32 router
    # logits of the layer's input (computed here in fp64).
    w_DE = np.asarray(state["blocks"][1]["ffn"]["router"]["w_DE"][...], np.float64)
    r32, r16 = (np.asarray(jnp.asarray(a, jnp.float32), np.float64).reshape(-1, 64) @ w_DE
                for a in (in32, in16))
    top32, top16 = (np.sort(np.argsort(-r, axis=1)[:, :2], axis=1) for r in (r32, r16))
    flipped = np.any(top32 != top16, axis=1)
    ranked = -np.sort(-r32, axis=1)
    margin = ranked[:, 1] - ranked[:, 2]  # how far the fp32 choice is from a tie
    shift = float(np.abs(r16 - r32).max())
    # The MoE input has been through ~10 bf16 roundings (one dense layer and
    # an attention): its router logits move by a few u of their largest value
    # (measured 1.7u); only near-ties flip (measured 4 of 256 tokens).
    shift_u = shift / np.abs(r32).max() / U_BF16
    ok = shift_u <= 4
    assert ok, f"router logits of the MoE input moved by {shift_u:.1f}u of their max (want <= 4u)"
    ok = flipped.mean() <= 0.05 and np.all(margin[flipped] <= 2 * shift)
    assert ok, (f"{flipped.sum()} of {flipped.size} tokens routed differently in bf16, fp32 "
                f"margins {margin[flipped]} (logit shift {shift:.1e})")

    # The MoE is the last layer, so a flipped token changes only its own logits.
    keep = ~flipped
    rms, worst = _rel_errors(np.asarray(logits16).reshape(-1, 64)[keep],
                             np.asarray(logits32).reshape(-1, 64)[keep])
    assert rms > 0.1 * U_BF16, f"RMS error {rms:.1e}: dtype=bfloat16 took no effect"
    ok = rms <= MODEL_RMS_TOL and worst <= MODEL_MAX_TOL
    assert ok, (
        f"bf16 GPT logits vs fp32: RMS error {rms / U_BF16:.2f}u, max {worst / U_BF16:.2f}u "
        f"(tolerances {MODEL_RMS_TOL / U_BF16:.0f}u, {MODEL_MAX_TOL / U_BF16:.0f}u; u = 2^-8; "
        f"{flipped.sum()} differently routed tokens left out)")
