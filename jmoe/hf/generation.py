"""Generation with a KV cache: one prefill, then one token per step.

    tokens_BN = jmoe.hf.generate(params, cfg, [[5, 17, 33], [40, 41]], max_new_tokens=32,
                                 temperature=0.0)            # greedy

Prompts of different lengths are right-padded into one [B, T] block; row b's
next token sits at its own position `len_b`, and decode writes each row's
key/value at that slot. A slot past a row's position is masked, so the
padding's entries are never read before decode overwrites them. The cache
has T + max_new_tokens slots from the start: the prefill compiles once per
(B, T), the decode step once per (B, S), whatever is generated.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmoe.hf.config import HFConfig
from jmoe.hf.model import forward, init_cache


def sample_logits(logits_BV: jax.Array, key: jax.Array, temperature: float, top_k: int,
                  top_p: float) -> jax.Array:
    """int32 [B] next tokens: greedy when temperature == 0, else sampled from
    softmax(logits / temperature) restricted to the top_k (0 = all) and to the
    smallest set whose probability reaches top_p (1.0 = all)."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_k > 0:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
        # Keep a token while the mass before it is below top_p (the best always stays).
        keep_BV = (cum_BV - jax.nn.softmax(sorted_BV, axis=-1)) < top_p
        cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_len"))
def prefill(params, ids_BT, lengths_B, cfg: HFConfig, max_len: int):
    """(logits [B, V] at each row's last prompt token, cache of `max_len` slots)."""
    cache = init_cache(cfg, ids_BT.shape[0], max_len)
    logits_BTV, cache, _ = forward(params, ids_BT, cfg, cache=cache)
    last_BV = jnp.take_along_axis(logits_BTV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    return last_BV, cache


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def decode_step(params, tok_B, pos_B, cache, cfg: HFConfig):
    """One token per row at position pos_B: (logits [B, V], updated cache)."""
    logits_B1V, cache, _ = forward(params, tok_B[:, None], cfg, positions_BT=pos_B[:, None],
                                   cache=cache, decode=True)
    return logits_B1V[:, 0], cache


@functools.partial(jax.jit, static_argnames=("cfg", "temperature", "top_k", "top_p"),
                   donate_argnames=("cache",))
def _sample_and_decode(params, logits_BV, pos_B, cache, key, cfg: HFConfig, temperature: float,
                       top_k: int, top_p: float):
    """Samples from `logits_BV` and feeds the tokens back: one dispatch per token."""
    tok_B = sample_logits(logits_BV, key, temperature, top_k, top_p)
    logits_BV, cache = decode_step.__wrapped__(params, tok_B, pos_B, cache, cfg)
    return tok_B, logits_BV, cache


_sample = jax.jit(sample_logits, static_argnames=("temperature", "top_k", "top_p"))


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded int32 [B, T] block and int32 [B] lengths."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token (e.g. the BOS id).")
    t = max(len(p) for p in prompts)
    ids = np.full((len(prompts), t), pad_id, np.int32)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
    return ids, np.array([len(p) for p in prompts], np.int32)


def generate(params, cfg: HFConfig, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             return_logits: bool = False):
    """int32 [B, max_new_tokens] continuations of `prompts` (lists of ids).

    return_logits: also the float32 [B, max_new_tokens, V] logits each token
    was chosen from (for tests: they equal the uncached model's).
    """
    ids_BT, lengths_B = pad_prompts(prompts)
    max_len = ids_BT.shape[1] + max_new_tokens
    if max_len > cfg.max_positions:
        raise ValueError(f"prompt + max_new_tokens = {max_len} exceeds the model's "
                         f"max_position_embeddings={cfg.max_positions}: generate fewer tokens.")
    key = jax.random.key(seed)
    logits_BV, cache = prefill(params, jnp.asarray(ids_BT), jnp.asarray(lengths_B), cfg, max_len)
    return decode_loop(
        logits_BV, cache, jnp.asarray(lengths_B), max_new_tokens, key,
        step=lambda logits_BV, pos_B, cache, k: _sample_and_decode(
            params, logits_BV, pos_B, cache, k, cfg, temperature, top_k, top_p),
        sample=lambda logits_BV, k: _sample(logits_BV, k, temperature, top_k, top_p),
        return_logits=return_logits)


def decode_loop(logits_BV, cache, pos_B, max_new_tokens: int, key, *, step, sample,
                return_logits: bool = False):
    """The token loop after a prefill (here and in `jmoe.generate`): token i
    is sampled from `logits_BV` with key `fold_in(key, i)`, fused with the
    decode step that gives the next logits, except the last (sampled alone).

      step(logits_BV, pos_B, cache, key) -> (tok_B, next logits_BV, cache)
      sample(logits_BV, key) -> tok_B
    Returns int32 [B, max_new_tokens] (and the float32 [B, N, V] logits each
    token was chosen from, with `return_logits`)."""
    toks, logits = [], []
    for i in range(max_new_tokens):
        if return_logits:
            logits.append(logits_BV)
        step_key = jax.random.fold_in(key, i)
        if i + 1 < max_new_tokens:
            tok_B, logits_BV, cache = step(logits_BV, pos_B + i, cache, step_key)
        else:
            tok_B = sample(logits_BV, step_key)
        toks.append(tok_B)
    out = np.stack([np.asarray(t) for t in toks], axis=1)
    if return_logits:
        return out, np.stack([np.asarray(l) for l in logits], axis=1)
    return out
