"""jmoe's attention block against a per-head loop written from the formulas.

The reference reads the block's own weights and does, for each query head h
in a plain loop (batch rows alongside):

  q_h = x @ w_q[:, h],  k_j = x @ w_k[:, j],  v_j = x @ w_v[:, j],
        j = h // (H / J)  (grouped-query: consecutive query heads share a kv head)
  RoPE on q_h and k_j: theta_i = base^(-2i/K) for i < K/2; at position t the
        pair (i, i + K/2) is rotated by the angle t * theta_i. That is the
        split-halves ("rotate_half", GPT-NeoX / LLaMA) pairing jmoe uses (see
        `jmoe.model.rope`), not the interleaved (2i, 2i+1) pairing of RoFormer
        / GPT-J: the rotation below is written for that pairing.
  o_h[t] = sum_{s <= t} softmax_s(q_h[t] . k_j[s] / sqrt(K)) v_j[s]   (causal)
  y = sum_h o_h @ w_o[h]

Forward and gradients (jax.vjp, with respect to the input and every weight)
must match at fp32 to ~1e-5, for grouped-query (H=4, J=2), multi-query (J=1)
and multi-head (J=H) attention, over T=16 positions so the rotation matters.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jmoe import model as M

T, D, B = 16, 32, 2
WEIGHTS = ("w_q_DHQ", "w_k_DJQ", "w_v_DJQ", "w_o_HQD")


def rope_ref(x_TK: jax.Array, base: float) -> jax.Array:
    """Rotates pair (i, i + K/2) of row t by t * base^(-2i/K), pair by pair.
    x_TK: [..., T, K] (leading axes, e.g. batch, are carried along)."""
    t_count, k = x_TK.shape[-2:]
    half = k // 2
    pos_T = jnp.arange(t_count, dtype=jnp.float32)
    first, second = [], []
    for i in range(half):
        angle_T = pos_T * base ** (-2.0 * i / k)
        a, b = x_TK[..., i], x_TK[..., i + half]
        first.append(a * jnp.cos(angle_T) - b * jnp.sin(angle_T))
        second.append(a * jnp.sin(angle_T) + b * jnp.cos(angle_T))
    return jnp.stack(first + second, axis=-1)


def attention_ref(w: dict, x_BTD: jax.Array, base: float) -> jax.Array:
    """Causal RoPE attention, one query head at a time (batch rows alongside)."""
    w_q, w_k, w_v, w_o = (w[n] for n in WEIGHTS)
    num_heads, k = w_q.shape[1], w_q.shape[2]
    group = num_heads // w_k.shape[1]  # query heads per kv head
    t_count = x_BTD.shape[1]
    causal_TT = np.tril(np.ones((t_count, t_count), bool))  # query t sees keys s <= t
    y_BTD = jnp.zeros_like(x_BTD)
    for h in range(num_heads):
        j = h // group
        q_BTK = rope_ref(x_BTD @ w_q[:, h], base)
        k_BTK = rope_ref(x_BTD @ w_k[:, j], base)
        v_BTK = x_BTD @ w_v[:, j]
        scores_BTT = q_BTK @ jnp.swapaxes(k_BTK, 1, 2) / math.sqrt(k)
        p_BTT = jax.nn.softmax(jnp.where(causal_TT, scores_BTT, -jnp.inf), axis=-1)
        y_BTD = y_BTD + (p_BTT @ v_BTK) @ w_o[h]
    return y_BTD


def _close(got, want, what, tol=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.abs(want).max()
    err = np.abs(got - want).max() / scale
    assert err <= tol, f"{what}: max error {err:.1e} of max|ref| {scale:.2e}"


def test_rope_matches_formula():
    """jmoe.model.rope on [B, T, H, K] equals the pairwise rotation, per head."""
    x_BTHK = jax.random.normal(jax.random.key(0), (2, T, 3, 8))
    got = jax.jit(M.rope, static_argnums=1)(x_BTHK, 10_000.0)
    want = jax.jit(lambda x: [rope_ref(x[:, :, h], 10_000.0) for h in range(3)])(x_BTHK)
    for h in range(3):
        _close(got[:, :, h], want[h], f"rope head {h}")


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1), (4, 4)],
                         ids=["gqa", "mqa", "mha"])
def test_attention_matches_per_head_reference(heads, kv_heads):
    cfg = M.GPTConfig(d_model=D, num_heads=heads, num_kv_heads=kv_heads, head_dim=8,
                      num_layers=2, moe_every=0, dense_d_ff=16)
    cfg.validate()
    attn = M.Attention(cfg, rngs=nnx.Rngs(params=0))
    graphdef, state = nnx.split(attn)
    assert state["w_k_DJQ"][...].shape == (D, kv_heads, 8)
    x_BTD = jax.random.normal(jax.random.key(1), (B, T, D))
    dy_BTD = jax.random.normal(jax.random.key(2), (B, T, D))

    @jax.jit
    def jmoe_fwd_bwd(state, x):
        y, vjp = jax.vjp(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
        return y, *vjp(dy_BTD)

    @jax.jit
    def ref_fwd_bwd(w, x):
        y, vjp = jax.vjp(lambda w, x: attention_ref(w, x, cfg.rope_theta), w, x)
        return y, *vjp(dy_BTD)

    y, dstate, dx = jmoe_fwd_bwd(state, x_BTD)
    want_y, dw, want_dx = ref_fwd_bwd({n: state[n][...] for n in WEIGHTS}, x_BTD)
    _close(y, want_y, "output")
    _close(dx, want_dx, "d input")
    for n in WEIGHTS:
        _close(dstate[n][...], dw[n], f"d {n}")
