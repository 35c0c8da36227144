"""An obvious, slow, per-token reference MoE layer for tests.

Routing decisions (which experts) are made per token with NumPy; everything
that carries gradients (router probabilities, expert MLPs, the combine) is a
per-token loop of `jnp` ops, so `jax.vjp` of it is the reference gradient.
"""

import jax
import jax.numpy as jnp
import numpy as np


def _mlp(x_D, w, e, activation):
    up = x_D @ w["w_up_EDF"][e]
    if activation == "swiglu":
        h = jax.nn.silu(x_D @ w["w_gate_EDF"][e]) * up
    else:
        h = jax.nn.gelu(up)
    return h @ w["w_down_EFD"][e]


def _shared(x_D, w, cfg):
    up = x_D @ w["w_up_DF"]
    h = jax.nn.silu(x_D @ w["w_gate_DF"]) * up if cfg.activation == "swiglu" else jax.nn.gelu(up)
    y = h @ w["w_down_FD"]
    if cfg.shared_gate:
        y = y * jax.nn.sigmoid(x_D @ w["w_gate_D1"])
    return y


def _choose(logits_E, cfg, bias, concrete_E):
    """(expert ids, weights) for one token, by the router's definition.

    Selection reads `concrete_E` (the same logits as NumPy values, so this
    also works under `jax.vjp`); the weights are computed from `logits_E`.
    """
    k = 1 if cfg.router == "switch" else cfg.top_k
    if cfg.router in ("softmax_topk", "switch"):
        p = jax.nn.softmax(logits_E)
        ids = list(np.argsort(-np.asarray(jax.nn.softmax(concrete_E)), kind="stable")[:k])
        w = p[np.array(ids)]
        if cfg.renormalize and cfg.router != "switch":
            w = w / jnp.sum(w)
        return ids, w * cfg.routed_scaling_factor
    s = jax.nn.sigmoid(logits_E)
    sel = np.asarray(jax.nn.sigmoid(concrete_E), np.float64) + (
        0 if bias is None else np.asarray(bias, np.float64))
    if cfg.n_group:
        size = cfg.num_experts // cfg.n_group
        gscore = [np.sort(sel[g * size:(g + 1) * size])[::-1][:2].sum() for g in range(cfg.n_group)]
        best = np.argsort(-np.array(gscore), kind="stable")[:cfg.topk_group]
        allowed = np.zeros(cfg.num_experts, bool)
        for g in best:
            allowed[g * size:(g + 1) * size] = True
        sel = np.where(allowed, sel, -np.inf)
    ids = list(np.argsort(-sel, kind="stable")[:k])
    w = s[np.array(ids)]
    if cfg.renormalize:
        w = w / jnp.sum(w)
    return ids, w * cfg.routed_scaling_factor


def reference_moe(params, x_TD, cfg, bias=None, concrete=None):
    """Returns (y_TD, kept) where kept[t][k] says if assignment (t, k) ran.

    Under `jax.vjp`, pass `concrete=(params, x_TD)` as plain arrays: routing
    decisions are read from them, gradients flow through the traced ones.
    """
    t_count = x_TD.shape[0]
    w = params["experts"]
    logits_TE = x_TD.astype(jnp.float32) @ params["router"]["w_DE"]
    cp, cx = concrete if concrete is not None else (params, x_TD)
    concrete_TE = np.asarray(cx, np.float32) @ np.asarray(cp["router"]["w_DE"], np.float32)
    ys = [jnp.zeros((cfg.d_model,), jnp.float32) for _ in range(t_count)]
    if cfg.router == "expert_choice":
        probs = jax.nn.softmax(logits_TE, axis=-1)
        cprobs = np.asarray(jax.nn.softmax(concrete_TE, axis=-1))
        c = min(cfg.capacity(t_count), t_count)
        kept = np.zeros((t_count,), bool)
        for e in range(cfg.num_experts):
            col = cprobs[:, e]
            for t in np.argsort(-col, kind="stable")[:c]:
                ys[t] = ys[t] + probs[t, e] * _mlp(x_TD[t], w, e, cfg.activation)
                kept[t] = True
    else:
        choices = [_choose(logits_TE[t], cfg, bias, concrete_TE[t]) for t in range(t_count)]
        k = len(choices[0][0])
        kept = np.ones((t_count, k), bool)
        if cfg.dispatch == "capacity":
            cap = cfg.capacity(t_count)
            order = [(kk, t) for kk in range(k) for t in range(t_count)]  # top-1 first
            if cfg.drop_policy == "probability":
                cw = [_choose(concrete_TE[t], cfg, bias, concrete_TE[t])[1] for t in range(t_count)]
                order = sorted(order, key=lambda a: -float(cw[a[1]][a[0]]))
            load = np.zeros(cfg.num_experts, int)
            for kk, t in order:
                e = choices[t][0][kk]
                kept[t, kk] = load[e] < cap
                load[e] += kept[t, kk]
        for t in range(t_count):
            ids, wts = choices[t]
            for kk, e in enumerate(ids):
                if kept[t, kk]:
                    ys[t] = ys[t] + wts[kk] * _mlp(x_TD[t], w, int(e), cfg.activation)
    y = jnp.stack(ys)
    if cfg.num_shared_experts:
        y = y + jnp.stack([_shared(x_TD[t], params["shared"], cfg) for t in range(t_count)])
    return y, kept


def gathered_reference(params, x_TD, ids_TK, kept_TK=None):
    """A softmax top-k SwiGLU layer with the routing decided outside:
    y[t] = sum over kept k of w[t, k] * MLP_{ids[t, k]}(x[t]), with w the
    chosen softmax probabilities renormalised over all K chosen (dropped ones
    included). Plain gathers and einsums, so it jits and `jax.vjp` gives the
    reference gradients; no buffers, no exchange."""
    probs_TE = jax.nn.softmax(x_TD @ params["router"]["w_DE"], axis=-1)
    w_TK = jnp.take_along_axis(probs_TE, ids_TK, axis=1)
    w_TK = w_TK / jnp.sum(w_TK, axis=1, keepdims=True)
    if kept_TK is not None:
        w_TK = w_TK * kept_TK
    ex = params["experts"]
    gate = jnp.einsum("td,tkdf->tkf", x_TD, ex["w_gate_EDF"][ids_TK])
    up = jnp.einsum("td,tkdf->tkf", x_TD, ex["w_up_EDF"][ids_TK])
    y_TKD = jnp.einsum("tkf,tkfd->tkd", jax.nn.silu(gate) * up, ex["w_down_EFD"][ids_TK])
    return jnp.einsum("tk,tkd->td", w_TK, y_TKD)
