"""Routers and their losses: pure functions of router logits.

A router turns `logits_TE` into *assignments*: which experts each token goes
to and with what weight. Token-choice routers (`softmax_topk`,
`sigmoid_topk`, `switch`) return `experts_TK` / `weights_TK`; expert-choice
returns, per expert, the C tokens it takes (`tokens_EC` / `weights_EC`).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from jmoe.config import MoEConfig


@struct.dataclass
class Routing:
    """Token-choice routing decisions for T tokens.

    experts_TK: int32 [T, K] chosen expert ids, best first.
    weights_TK: float32 [T, K] combine weights of the chosen experts.
    probs_TE: float32 [T, E] the router's scores normalised to sum to one per
      token (softmax probabilities, or normalised sigmoid affinities); used by
      the load-balance loss and the entropy metric.
    logits_TE: float32 [T, E] raw router logits (z-loss).
    """

    experts_TK: jax.Array
    weights_TK: jax.Array
    probs_TE: jax.Array
    logits_TE: jax.Array


@struct.dataclass
class ExpertChoice:
    """Expert-choice routing: expert e takes tokens `tokens_EC[e]`.

    tokens_EC: int32 [E, C]; weights_EC: float32 [E, C] (the token's softmax
    probability for that expert); probs_TE and logits_TE as in `Routing`.
    """

    tokens_EC: jax.Array
    weights_EC: jax.Array
    probs_TE: jax.Array
    logits_TE: jax.Array


def router_logits(x_TD: jax.Array, w_DE: jax.Array) -> jax.Array:
    """Router logits in float32, [T, D] x [D, E] -> [T, E]."""
    return jnp.dot(x_TD.astype(jnp.float32), w_DE.astype(jnp.float32))


def jitter(x_TD: jax.Array, eps: float, rng: jax.Array) -> jax.Array:
    """Multiplicative uniform noise in [1-eps, 1+eps] (Switch Transformer)."""
    noise = jax.random.uniform(rng, x_TD.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
    return (x_TD.astype(jnp.float32) * noise).astype(x_TD.dtype)


def softmax_topk(logits_TE: jax.Array, k: int, renormalize: bool,
                 scale: float = 1.0) -> Routing:
    """Top-k over softmax probabilities (Mixtral with `renormalize`, Qwen-MoE without)."""
    probs_TE = jax.nn.softmax(logits_TE, axis=-1)
    weights_TK, experts_TK = jax.lax.top_k(probs_TE, k)
    if renormalize:
        weights_TK = weights_TK / jnp.sum(weights_TK, axis=-1, keepdims=True)
    return Routing(experts_TK.astype(jnp.int32), weights_TK * scale, probs_TE, logits_TE)


def _group_limited_mask(sel_TE: jax.Array, n_group: int, topk_group: int) -> jax.Array:
    """Boolean [T, E]: experts inside each token's best `topk_group` groups.

    A group's score is the sum of its two best selection scores (DeepSeek-V3);
    with one expert per group it is that expert's score.
    """
    t, e = sel_TE.shape
    sel_TGX = sel_TE.reshape(t, n_group, e // n_group)
    top = jax.lax.top_k(sel_TGX, min(2, e // n_group))[0]
    group_score_TG = jnp.sum(top, axis=-1)
    _, best_groups = jax.lax.top_k(group_score_TG, topk_group)
    keep_TG = jnp.zeros((t, n_group), bool).at[jnp.arange(t)[:, None], best_groups].set(True)
    return jnp.repeat(keep_TG, e // n_group, axis=1)


def sigmoid_topk(logits_TE: jax.Array, k: int, bias_E: Optional[jax.Array],
                 renormalize: bool, scale: float = 1.0, n_group: int = 0,
                 topk_group: int = 0) -> Routing:
    """DeepSeek-V3 routing: sigmoid affinities; `bias_E` steers selection only.

    The combine weights are the unbiased affinities of the chosen experts,
    optionally renormalised over the k chosen, times `scale`.
    """
    scores_TE = jax.nn.sigmoid(logits_TE)
    sel_TE = scores_TE if bias_E is None else scores_TE + bias_E.astype(jnp.float32)
    # The bias only decides who is picked: no gradient flows through it.
    sel_TE = jax.lax.stop_gradient(sel_TE)
    if n_group:
        mask_TE = _group_limited_mask(sel_TE, n_group, topk_group)
        sel_TE = jnp.where(mask_TE, sel_TE, -jnp.inf)
    _, experts_TK = jax.lax.top_k(sel_TE, k)
    weights_TK = jnp.take_along_axis(scores_TE, experts_TK, axis=-1)
    if renormalize:
        weights_TK = weights_TK / (jnp.sum(weights_TK, axis=-1, keepdims=True) + 1e-20)
    probs_TE = scores_TE / jnp.sum(scores_TE, axis=-1, keepdims=True)
    return Routing(experts_TK.astype(jnp.int32), weights_TK * scale, probs_TE, logits_TE)


def topk_softmax(logits_TE: jax.Array, k: int, bias_E: Optional[jax.Array] = None,
                 scale: float = 1.0) -> Routing:
    """GPT-OSS routing: top-k of the logits (plus a learned bias), softmax over those k.

    Unlike `softmax_topk` the weights are a softmax over the chosen logits
    only; `probs_TE` (the full softmax) feeds the balance loss and entropy.
    """
    if bias_E is not None:
        logits_TE = logits_TE + bias_E.astype(jnp.float32)
    top_TK, experts_TK = jax.lax.top_k(logits_TE, k)
    weights_TK = jax.nn.softmax(top_TK, axis=-1)
    probs_TE = jax.nn.softmax(logits_TE, axis=-1)
    return Routing(experts_TK.astype(jnp.int32), weights_TK * scale, probs_TE, logits_TE)


def expert_choice(logits_TE: jax.Array, capacity: int) -> ExpertChoice:
    """Each expert takes the `capacity` tokens with its highest probability (Zhou et al.)."""
    probs_TE = jax.nn.softmax(logits_TE, axis=-1)
    c = min(capacity, probs_TE.shape[0])
    weights_EC, tokens_EC = jax.lax.top_k(probs_TE.T, c)
    return ExpertChoice(tokens_EC.astype(jnp.int32), weights_EC, probs_TE, logits_TE)


def route(logits_TE: jax.Array, cfg: MoEConfig, bias_E: Optional[jax.Array] = None):
    """Dispatches on `cfg.router`; returns `Routing` or `ExpertChoice`."""
    if cfg.router == "softmax_topk":
        return softmax_topk(logits_TE, cfg.top_k, cfg.renormalize, cfg.routed_scaling_factor)
    if cfg.router == "switch":
        return softmax_topk(logits_TE, 1, False, cfg.routed_scaling_factor)
    if cfg.router == "sigmoid_topk":
        return sigmoid_topk(logits_TE, cfg.top_k, bias_E, cfg.renormalize,
                            cfg.routed_scaling_factor, cfg.n_group, cfg.topk_group)
    if cfg.router == "expert_choice":
        return expert_choice(logits_TE, cfg.capacity(logits_TE.shape[0]))
    if cfg.router == "topk_softmax":
        # `bias_E` is this router's learned logit bias (`router_bias`), not a selection bias.
        return topk_softmax(logits_TE, cfg.top_k, bias_E, cfg.routed_scaling_factor)
    raise ValueError(f"MoEConfig.router={cfg.router!r} is unknown.")


# ---------------------------------------------------------------- losses ----

def expert_counts(experts_TK: jax.Array, num_experts: int) -> jax.Array:
    """int32 [E]: how many token-expert assignments each expert received."""
    return jnp.zeros((num_experts,), jnp.int32).at[experts_TK.reshape(-1)].add(1)


def load_balance_loss(probs_TE: jax.Array, experts_TK: jax.Array) -> jax.Array:
    """GShard/Switch loss `E * sum_e f_e * P_e`; 1.0 when perfectly balanced.

    f_e: fraction of the T*K assignments sent to expert e (not differentiable);
    P_e: mean router probability of expert e over the T tokens.
    """
    num_experts = probs_TE.shape[-1]
    f_E = expert_counts(experts_TK, num_experts) / experts_TK.size
    p_E = jnp.mean(probs_TE, axis=0)
    return num_experts * jnp.sum(jax.lax.stop_gradient(f_E) * p_E)


def z_loss(logits_TE: jax.Array) -> jax.Array:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_TE, axis=-1)))


def entropy(probs_TE: jax.Array) -> jax.Array:
    """Mean per-token entropy of the router distribution, in nats."""
    return -jnp.mean(jnp.sum(probs_TE * jnp.log(jnp.maximum(probs_TE, 1e-20)), axis=-1))


def update_bias(bias_E: jax.Array, load_E: jax.Array, rate: float) -> jax.Array:
    """Aux-loss-free balancing (DeepSeek-V3): raise under-loaded experts' bias.

    bias <- bias + rate * sign(mean(load) - load). `load_E` may be counts or
    fractions; only its sign against the mean matters.
    """
    load_E = load_E.astype(jnp.float32)
    return bias_E + rate * jnp.sign(jnp.mean(load_E) - load_E).astype(bias_E.dtype)
