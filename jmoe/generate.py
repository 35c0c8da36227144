"""KV-cache generation for jmoe's GPT-MoE (`jmoe.model.GPT`).

    toks_BN = jmoe.generate.generate(model, [[100, 101, 102], [40, 41]], max_new_tokens=64,
                                     temperature=0.8, top_k=40, top_p=0.95, seed=0)

One prefill runs the prompts through the blocks' own weights and fills a
cache of S = T + max_new_tokens slots per row; then each step feeds one
token per row, writes its key/value at the row's position and attends over
the slots up to it. The training forward (`GPT.__call__`) is untouched: this
module reads the same modules (`Block`, `Attention`, `MoE`, `DenseFFN`) and
runs its own cached path over them.

Shapes are static: the prefill compiles once per (B, T, S), the
sample-and-decode step once per (B, S, sampling settings), whatever the
number of tokens generated.

Prompts of different lengths are right-padded into one [B, T] block. Causal
attention keeps the padding out of every real position in the prefill; row
b's first new token goes to its own slot `len_b`, which overwrites the
padding's cache entry before any query can read it (a query at position p
reads slots 0..p only).

What the model supports, generation supports: RoPE, grouped-query
attention, dense/MoE mixes (`moe_every`, `first_dense_layers`), the
`scan_layers` layout (one `lax.scan` over each stack, the cache stacked the
same way), ScMoE. The MoE layers run dropless on the local path (`mesh=False`;
under a mesh GSPMD partitions them): nothing is dropped at inference, so a
model trained with capacity dispatch generates what its uncached forward
computes whenever that drops nothing. The decode step aligns expert groups
to one row: a step has B*K assignments, and padding each expert's few rows
to `group_align` would multiply its expert work. Refused: `expert_choice`
routing (an expert picks among all tokens of a batch, so a token's output
depends on later tokens) and slot-ordered expert weights (online
re-placement; reload the checkpoint as `jmoe.train.sample.load` does).

Cache layout (`init_cache`): unscanned, a list over layers of
{"k_BSJQ", "v_BSJQ"}; with `scan_layers`, a list over stacks of a list over
the period's blocks of the same dict with a leading [R] axis (repeats).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jmoe.hf.generation import decode_loop, pad_prompts, sample_logits
from jmoe.model import GPT, Block, rope
from jmoe.moe import moe_apply, selection_bias

__all__ = ["check_model", "decode_step", "generate", "init_cache", "prefill"]

Cache = Any


def check_model(model: GPT) -> None:
    """Raises ValueError (naming the field and the fix) for a model this module
    cannot decode token by token."""
    m = model.cfg.moe
    if m is not None and model.cfg.moe_layers and m.router == "expert_choice":
        raise ValueError("config.model.router='expert_choice' cannot generate with a KV cache: "
                         "each expert picks among all tokens of the batch, so a token's output "
                         "depends on later tokens. Use a token-choice router "
                         "(softmax_topk, sigmoid_topk, switch, topk_softmax).")
    for layer in model.moe_blocks():
        if layer.slot_weights:
            raise ValueError("the model's MoE layers hold slot-ordered expert weights (online "
                             "re-placement): load the checkpoint with jmoe.train.sample.load, "
                             "which restores the expert-ordered weights.")


def init_cache(model: GPT, batch: int, max_len: int) -> Cache:
    """A zero cache of `max_len` slots per row, in the model's compute dtype."""
    cfg = model.cfg
    shape = (batch, max_len, cfg.kv_heads, cfg.head_size)
    dt = jnp.dtype(cfg.dtype)
    kv = lambda lead=(): {"k_BSJQ": jnp.zeros(lead + shape, dt),
                          "v_BSJQ": jnp.zeros(lead + shape, dt)}
    if not cfg.scan_layers:
        return [kv() for _ in range(cfg.num_layers)]
    return [[kv((stack.repeats,)) for _ in range(stack.period)] for stack in model.stacks]


# ------------------------------------------------------------ one block ----

def _attention(block: Block, x_BTD: jax.Array, cache: dict, pos_B: Optional[jax.Array]):
    """Causal attention of `block` on x_BTD with the cache: prefill (pos_B None:
    positions 0..T-1, written into slots 0..T-1) or decode (T = 1, row b at
    position pos_B[b], reading slots 0..pos_B[b])."""
    attn, dt = block.attn, x_BTD.dtype
    pos_BT = None if pos_B is None else pos_B[:, None]
    q_BTHQ = rope(jnp.einsum("btd,dhk->bthk", x_BTD, attn.w_q_DHQ[...].astype(dt)),
                  attn.theta, pos_BT)
    k_BTJQ = rope(jnp.einsum("btd,djk->btjk", x_BTD, attn.w_k_DJQ[...].astype(dt)),
                  attn.theta, pos_BT)
    v_BTJQ = jnp.einsum("btd,djk->btjk", x_BTD, attn.w_v_DJQ[...].astype(dt))
    k_BSJQ, v_BSJQ = cache["k_BSJQ"], cache["v_BSJQ"]
    if pos_B is None:
        t = x_BTD.shape[1]
        k_BSJQ = k_BSJQ.at[:, :t].set(k_BTJQ.astype(k_BSJQ.dtype))
        v_BSJQ = v_BSJQ.at[:, :t].set(v_BTJQ.astype(v_BSJQ.dtype))
        # The training forward's attention on the prompt itself.
        o_BTHQ = jax.nn.dot_product_attention(q_BTHQ, k_BTJQ, v_BTJQ, is_causal=True)
    else:
        b_B = jnp.arange(x_BTD.shape[0])
        k_BSJQ = k_BSJQ.at[b_B, pos_B].set(k_BTJQ[:, 0].astype(k_BSJQ.dtype))
        v_BSJQ = v_BSJQ.at[b_B, pos_B].set(v_BTJQ[:, 0].astype(v_BSJQ.dtype))
        slots_S = jnp.arange(k_BSJQ.shape[1])
        mask_B11S = (slots_S[None, :] <= pos_B[:, None])[:, None, None, :]
        o_BTHQ = jax.nn.dot_product_attention(q_BTHQ, k_BSJQ.astype(dt), v_BSJQ.astype(dt),
                                              mask=mask_B11S)
    out_BTD = jnp.einsum("bthk,hkd->btd", o_BTHQ, attn.w_o_HQD[...].astype(dt))
    return out_BTD, {"k_BSJQ": k_BSJQ, "v_BSJQ": v_BSJQ}


def _moe(block: Block, x_BTD: jax.Array, decode: bool) -> jax.Array:
    layer = block.ffn
    # Dropless at inference (see the module docstring); a decode step's
    # handful of rows per expert is not padded to the layer's group_align.
    cfg = dataclasses.replace(layer.cfg, dispatch="dropless",
                              **({"group_align": 1} if decode else {}))
    bias = selection_bias(layer.cfg, layer.router.bias[...])
    y_BTD, _ = moe_apply(layer.params_dict(), x_BTD, cfg, bias=bias, mesh=False)
    return y_BTD


def _block(block: Block, x_BTD: jax.Array, cache: dict, pos_B: Optional[jax.Array]):
    """`Block.__call__` (inference) with the cache: (x_BTD, cache)."""
    decode = pos_B is not None
    n_BTD = block.attn_norm(x_BTD)
    a_BTD, cache = _attention(block, n_BTD, cache, pos_B)
    h_BTD = x_BTD + a_BTD
    if not block.is_moe:
        return h_BTD + block.ffn(block.ffn_norm(h_BTD)), cache
    if block.scmoe:  # the experts read the block's (normed) input
        return (h_BTD + block.shortcut_mlp(block.ffn_norm(h_BTD))
                + _moe(block, n_BTD, decode)), cache
    return h_BTD + _moe(block, block.ffn_norm(h_BTD), decode), cache


def _forward(model: GPT, tokens_BT: jax.Array, cache: Cache, pos_B: Optional[jax.Array]):
    """tokens_BT -> (float32 logits_BTV, cache) through every block."""
    cfg = model.cfg
    x_BTD = jnp.take(model.embed_VD[...], tokens_BT, axis=0).astype(jnp.dtype(cfg.dtype))
    new = []
    if not cfg.scan_layers:
        for block, layer_cache in zip(model.blocks, cache):
            x_BTD, layer_cache = _block(block, x_BTD, layer_cache, pos_B)
            new.append(layer_cache)
    else:
        for stack, stack_cache in zip(model.stacks, cache):
            splits = [nnx.split(layer) for layer in stack.layers]

            def body(x_BTD, xs):
                states, caches = xs
                out = []
                for (graphdef, _), state, layer_cache in zip(splits, states, caches):
                    x_BTD, layer_cache = _block(nnx.merge(graphdef, state), x_BTD, layer_cache,
                                                pos_B)
                    out.append(layer_cache)
                return x_BTD, out

            x_BTD, stack_cache = jax.lax.scan(body, x_BTD,
                                              ([s for _, s in splits], stack_cache))
            new.append(stack_cache)
    logits_BTV = model._unembed(model.final_norm(x_BTD)).astype(jnp.float32)
    return logits_BTV, new


# ------------------------------------------------------------ jitted steps ----

@functools.partial(jax.jit, static_argnames=("graphdef", "max_len"))
def prefill(graphdef, state, tokens_BT: jax.Array, lengths_B: jax.Array, max_len: int):
    """(float32 logits [B, V] at each row's last prompt token, cache of
    `max_len` slots holding the prompt)."""
    model = nnx.merge(graphdef, state)
    cache = init_cache(model, tokens_BT.shape[0], max_len)
    logits_BTV, cache = _forward(model, tokens_BT, cache, None)
    last_BV = jnp.take_along_axis(logits_BTV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    return last_BV, cache


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def decode_step(graphdef, state, tok_B: jax.Array, pos_B: jax.Array, cache: Cache):
    """Token tok_B[b] at position pos_B[b]: (float32 logits [B, V], cache)."""
    logits_B1V, cache = _forward(nnx.merge(graphdef, state), tok_B[:, None], cache, pos_B)
    return logits_B1V[:, 0], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "top_k", "top_p"),
                   donate_argnames=("cache",))
def _sample_and_decode(graphdef, state, logits_BV, pos_B, cache, key, temperature: float,
                       top_k: int, top_p: float):
    """Samples from `logits_BV` and feeds the tokens back: one dispatch per token."""
    tok_B = sample_logits(logits_BV, key, temperature, top_k, top_p)
    logits_BV, cache = decode_step.__wrapped__(graphdef, state, tok_B, pos_B, cache)
    return tok_B, logits_BV, cache


_sample = jax.jit(sample_logits, static_argnames=("temperature", "top_k", "top_p"))


def generate(model: GPT, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             return_logits: bool = False):
    """int32 [B, max_new_tokens] continuations of `prompts` (lists of token ids).

    temperature 0 is greedy; else softmax(logits / temperature) restricted to
    the top_k (0 = all) and to the smallest set reaching top_p (1.0 = all),
    the formulas of `jmoe.hf.sample_logits`. Row b's i-th token draws with
    fold_in(key(seed), i). return_logits: also the float32
    [B, max_new_tokens, V] logits each token was drawn from.
    """
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 1.")
    check_model(model)
    graphdef, state = nnx.split(model)
    ids_BT, lengths_B = pad_prompts(prompts)
    max_len = ids_BT.shape[1] + max_new_tokens
    key = jax.random.key(seed)
    logits_BV, cache = prefill(graphdef, state, jnp.asarray(ids_BT), jnp.asarray(lengths_B),
                               max_len)
    return decode_loop(
        logits_BV, cache, jnp.asarray(lengths_B), max_new_tokens, key,
        step=lambda logits_BV, pos_B, cache, k: _sample_and_decode(
            graphdef, state, logits_BV, pos_B, cache, k, temperature, top_k, top_p),
        sample=lambda logits_BV, k: _sample(logits_BV, k, temperature, top_k, top_p),
        return_logits=return_logits)
