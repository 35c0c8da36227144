"""KV-cache generation (jmoe.hf.generate) against the uncached model and the
sampling formulas."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe.hf as hf
from jmoe import dispatch
from jmoe.hf import generation as gen

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "hf")


@pytest.fixture(scope="module")
def qwen2():
    return hf.load(os.path.join(FIX, "qwen2_moe"))


def test_cached_decode_equals_uncached_at_every_position(qwen2):
    """Prompts of different lengths in one batch, sampled (temperature, top-k,
    top-p): each token's logits from prefill + cached decode equal the
    uncached model's on the whole sequence at that position."""
    cfg, params = qwen2
    prompts = [[5, 17, 33, 8, 61, 12, 90], [40, 41, 7, 7, 88, 15, 22, 63, 51, 6, 19, 34]]
    n = 12
    toks, logits = hf.generate(params, cfg, prompts, max_new_tokens=n, temperature=1.0,
                               top_k=20, top_p=0.95, seed=3, return_logits=True)
    # One uncached pass over [B, T + n]; the short row is padded after its
    # sequence, which causal attention never lets earlier positions see.
    seqs = [p + toks[b].tolist() for b, p in enumerate(prompts)]
    block = np.zeros((2, max(map(len, seqs))), np.int32)
    for b, s in enumerate(seqs):
        block[b, :len(s)] = s
    full, _, _ = jax.jit(lambda p, i: hf.forward(p, i, cfg))(params, block)
    for b, p in enumerate(prompts):
        ref = np.asarray(full)[b, len(p) - 1:len(p) - 1 + n]
        err = np.max(np.abs(ref - logits[b])) / np.max(np.abs(ref))
        assert err < 1e-4, (b, err)
    # Static shapes: another batch of the same sizes compiles nothing new.
    sizes = gen.prefill._cache_size(), gen._sample_and_decode._cache_size()
    hf.generate(params, cfg, [p[::-1] for p in prompts], max_new_tokens=n, temperature=1.0,
                top_k=20, top_p=0.95, seed=4)
    assert (gen.prefill._cache_size(), gen._sample_and_decode._cache_size()) == sizes


def test_decode_does_not_pad_experts_to_group_align(qwen2):
    """A decode step's grouped matmuls run on B*K rows, not on every expert
    padded to group_align (which the prefill path does use)."""
    cfg, params = qwen2
    b, f = 3, cfg.moe_d_ff  # 3 rows: no buffer size collides with a weight shape
    a = b * cfg.top_k
    padded = dispatch.dropless_rows(a, cfg.num_experts, cfg.group_align)
    assert padded > a

    def hidden_rows(decode):
        jaxpr = str(jax.make_jaxpr(lambda p, i: hf.forward(p, i, cfg, decode=decode))(
            params, jnp.zeros((b, 1), jnp.int32)))
        return {r for r in (a, padded) if f"f32[{r},{f}]" in jaxpr}
    assert hidden_rows(decode=True) == {a}
    assert hidden_rows(decode=False) == {padded}


LOGITS = np.log(np.array([0.05, 0.5, 0.15, 0.3], np.float32))


def _freqs(n=20000, **kw):
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (n, 4))
    toks = hf.sample_logits(logits, jax.random.key(0), **kw)
    return np.bincount(np.asarray(toks), minlength=4) / n


def test_sampling_follows_the_formulas():
    p = np.exp(LOGITS) / np.exp(LOGITS).sum()
    greedy = hf.sample_logits(jnp.asarray(LOGITS)[None], jax.random.key(0), 0.0, 0, 1.0)
    assert int(greedy[0]) == 1
    # temperature T: softmax(logits / T)
    t2 = p ** 0.5 / (p ** 0.5).sum()
    np.testing.assert_allclose(_freqs(temperature=2.0, top_k=0, top_p=1.0), t2, atol=0.015)
    # top-k=2: the two best, renormalised
    k2 = np.array([0, 0.5, 0, 0.3]) / 0.8
    np.testing.assert_allclose(_freqs(temperature=1.0, top_k=2, top_p=1.0), k2, atol=0.015)
    # top-p=0.7: 0.5 (mass before it 0) and 0.3 (before it 0.5 < 0.7) stay; 0.15 does not
    np.testing.assert_allclose(_freqs(temperature=1.0, top_k=0, top_p=0.7), k2, atol=0.015)
    # top-p=0.85 keeps 0.15 too (mass before it 0.8 < 0.85)
    p3 = np.array([0, 0.5, 0.15, 0.3]) / 0.95
    np.testing.assert_allclose(_freqs(temperature=1.0, top_k=0, top_p=0.85), p3, atol=0.015)
