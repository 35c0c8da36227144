"""MoE layer forward+backward against the dense limit and the peers' approaches.

    python bench/moe_layer.py --json bench/results/moe_layer.json

Rows (all fp32, forward + backward as `jax.vjp` with a fixed random
cotangent, every weight passed to the jitted function as an argument):

  dense_limit      one expert-sized FFN on T*K tokens: the same active FLOPs
  jmoe_capacity    jmoe, dispatch='capacity' (cf from --cf)
  jmoe_dropless    jmoe, dispatch='dropless'
  onehot_einsum    GShard/flaxformer one-hot [T, E, C] dispatch/combine einsums
  sort_ragged_dot  sort by expert + jax.lax.ragged_dot (MaxText's GPU path)

Timings are interleaved (one call of each variant per round) and the table
reports medians and the ratio to `dense_limit`, all from this one process.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import harness
import jmoe

harness.setup()  # before the first computation


def dense_limit(cfg, t):
    def f(x_TD, w_up_DF, w_down_FD):
        return jax.nn.gelu(x_TD @ w_up_DF) @ w_down_FD
    key = jax.random.key(0)
    args = (jax.random.normal(key, (t * cfg.top_k, cfg.d_model)),
            jax.random.normal(key, (cfg.d_model, cfg.d_ff)) / np.sqrt(cfg.d_model),
            jax.random.normal(key, (cfg.d_ff, cfg.d_model)) / np.sqrt(cfg.d_ff))
    return f, args


def jmoe_layer(cfg):
    def f(x_TD, params):
        return jmoe.moe_apply(params, x_TD, cfg)[0]
    return f


def onehot_einsum(cfg, t):
    """GShard-style: one-hot dispatch mask [T, E, C] and combine tensor."""
    e, k, c = cfg.num_experts, cfg.top_k, cfg.capacity(t)

    def f(x_TD, params):
        logits_TE = x_TD @ params["router"]["w_DE"]
        probs_TE = jax.nn.softmax(logits_TE, axis=-1)
        w_TK, idx_TK = jax.lax.top_k(probs_TE, k)
        w_TK = w_TK / jnp.sum(w_TK, axis=-1, keepdims=True)
        mask_KTE = jax.nn.one_hot(idx_TK.T, e, dtype=jnp.int32)
        # Position of each token in its expert's buffer, top-1 choices first.
        pos_KTE = jnp.cumsum(mask_KTE.reshape(k * t, e), axis=0).reshape(k, t, e) * mask_KTE - 1
        keep_KTE = (pos_KTE >= 0) & (pos_KTE < c)
        pos_onehot = jax.nn.one_hot(jnp.where(keep_KTE, pos_KTE, -1), c, dtype=x_TD.dtype)
        dispatch_TEC = jnp.sum(pos_onehot, axis=0)
        combine_TEC = jnp.einsum("kt,ktec->tec", w_TK.T, pos_onehot)
        x_ECD = jnp.einsum("tec,td->ecd", dispatch_TEC, x_TD)
        w = params["experts"]
        h = jax.nn.gelu(jnp.einsum("ecd,edf->ecf", x_ECD, w["w_up_EDF"]))
        y_ECD = jnp.einsum("ecf,efd->ecd", h, w["w_down_EFD"])
        return jnp.einsum("tec,ecd->td", combine_TEC, y_ECD)
    return f


def sort_ragged_dot(cfg, t):
    """Sort assignments by expert, `lax.ragged_dot` per group, unsort, combine."""
    e, k = cfg.num_experts, cfg.top_k

    def f(x_TD, params):
        logits_TE = x_TD @ params["router"]["w_DE"]
        w_TK, idx_TK = jax.lax.top_k(jax.nn.softmax(logits_TE, axis=-1), k)
        w_TK = w_TK / jnp.sum(w_TK, axis=-1, keepdims=True)
        flat = idx_TK.reshape(-1)
        order = jnp.argsort(flat)
        xs = x_TD[order // k]
        sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
        w = params["experts"]
        h = jax.nn.gelu(jax.lax.ragged_dot(xs, w["w_up_EDF"], sizes))
        ys = jax.lax.ragged_dot(h, w["w_down_EFD"], sizes)
        y_A = jnp.zeros_like(ys).at[order].set(ys)
        return jnp.sum(y_A.reshape(t, k, -1) * w_TK[..., None], axis=1)
    return f


def main(argv=None):
    p = harness.parser(__doc__, repeats=7, quick=dict(tokens=256, d_model=64, d_ff=128, repeats=2))
    harness.add_layer_flags(p)
    a = p.parse_args(argv)
    t = a.tokens
    base = harness.layer_config(a)
    cap_cfg = base.replace(dispatch="capacity")
    drop_cfg = base.replace(dispatch="dropless")
    params = jmoe.init_params(jax.random.key(0), base)
    x = jax.random.normal(jax.random.key(1), (t, a.d_model))
    ct = jax.random.normal(jax.random.key(2), (t, a.d_model))
    dense_f, dense_args = dense_limit(base, t)
    dense_ct = jax.random.normal(jax.random.key(3), (t * a.top_k, a.d_model))
    fwd_bwd = harness.fwd_bwd
    rows = {
        "dense_limit": (fwd_bwd(dense_f), (dense_ct,) + dense_args),
        "jmoe_capacity": (fwd_bwd(jmoe_layer(cap_cfg)), (ct, x, params)),
        "jmoe_dropless": (fwd_bwd(jmoe_layer(drop_cfg)), (ct, x, params)),
        "onehot_einsum": (fwd_bwd(onehot_einsum(cap_cfg, t)), (ct, x, params)),
        "sort_ragged_dot": (fwd_bwd(sort_ragged_dot(drop_cfg, t)), (ct, x, params)),
    }
    shape = harness.layer_shape(a)
    print(harness.describe(platform=jax.default_backend(), devices=jax.device_count(), **shape),
          flush=True)
    out_rows = harness.compare(rows, a.repeats, reference="dense_limit")
    result = {**harness.machine_info(),
              "shape": {**shape, "activation": "gelu", "dtype": "float32"},
              "repeats": a.repeats, "rows": out_rows}
    harness.write_json(a.json, result)
    return result


if __name__ == "__main__":
    main()
