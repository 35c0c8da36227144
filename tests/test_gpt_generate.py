"""KV-cache generation for the GPT-MoE (jmoe.generate) against the uncached
model (`GPT.__call__`, the training forward) at every position."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jmoe import dispatch, generate as gen, model_config
from jmoe.model import GPT

# Prompts of different lengths in one batch: the short rows are right-padded.
PROMPTS = [[5, 17, 33, 8, 61], [40, 41, 7, 7, 20, 15, 22, 63, 51], [9, 3]]


def tiny(**kw) -> GPT:
    """The default config's structure (every layer MoE, MHA, untied, dropless,
    softmax top-2) at toy sizes; `kw` overrides config.model fields."""
    m = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_experts=4, top_k=2,
             d_ff=16)
    m.update(kw)
    return GPT(model_config.from_config(m), rngs=nnx.Rngs(params=0))


MODELS = {
    "default_shaped": {},
    # Dense first layer, then MoE every 2nd; grouped-query attention; ScMoE.
    "dense_moe_mix_gqa_scmoe": dict(num_layers=4, first_dense_layers=1, moe_every=2,
                                    num_kv_heads=2, scmoe=True, group_align=8),
    # Stacks (first dense, MoE period of 2, dense tail) under lax.scan.
    "scan_layers": dict(num_layers=5, first_dense_layers=1, moe_every=2, scan_layers=True),
}


def _full_logits(model: GPT, seqs: list[list[int]]) -> np.ndarray:
    """The uncached model on each whole sequence, right-padded into one block
    (causal attention keeps the padding out of the real positions)."""
    block = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for b, s in enumerate(seqs):
        block[b, :len(s)] = s
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])(state, block))


def _unit_scale(model: GPT) -> GPT:
    """The model with every weight matrix redrawn at std shape[-2]^-1/2
    (as tests/test_train.py does), larger than the init's. At init scale the
    tiny model's greedy tokens barely depend on the context: decoding at
    positions off by one gave the same 30 tokens."""
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    state = jax.tree.map(
        lambda x: jnp.asarray(rng.normal(0, x.shape[-2] ** -0.5, x.shape).astype(x.dtype))
        if x.ndim > 1 and jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    return nnx.merge(graphdef, state)


@pytest.mark.parametrize("name", list(MODELS))
def test_cached_logits_equal_uncached_at_every_position(name):
    """Sampled (temperature, top-k, top-p) continuations of a batch of
    different-length prompts: every token's logits from prefill + cached
    decode equal the uncached model's at that position."""
    model = tiny(**MODELS[name])
    n = 7
    toks, logits = gen.generate(model, PROMPTS, max_new_tokens=n, temperature=1.0, top_k=20,
                                top_p=0.95, seed=3, return_logits=True)
    assert toks.shape == (3, n) and logits.shape == (3, n, 64)
    full = _full_logits(model, [p + toks[b].tolist() for b, p in enumerate(PROMPTS)])
    for b, p in enumerate(PROMPTS):
        ref = full[b, len(p) - 1:len(p) - 1 + n]
        err = np.max(np.abs(ref - logits[b])) / np.max(np.abs(ref))
        assert err < 1e-5, (name, b, err)
    # Sampled, not greedy: some token differs from the argmax it was drawn from.
    assert (toks != logits.argmax(-1)).any()


def test_capacity_model_generates_dropless():
    """A model trained with capacity dispatch generates without drops: its
    cached logits equal the uncached forward of the same weights run
    dropless, while its own uncached forward (capacity factor 0.5) drops."""
    capacity = tiny(dispatch="capacity", capacity_factor=0.5, min_capacity=1)
    # The same weights under the default (dropless) config's graph.
    graphdef, _ = jax.eval_shape(lambda: nnx.split(tiny()))
    dropless = nnx.merge(graphdef, nnx.state(capacity))
    assert dropless.blocks[0].ffn.cfg.dispatch == "dropless"
    n = 3
    toks, logits = gen.generate(capacity, PROMPTS, max_new_tokens=n, return_logits=True)
    seqs = [p + toks[b].tolist() for b, p in enumerate(PROMPTS)]
    full = _full_logits(dropless, seqs)
    dropping = _full_logits(capacity, seqs)
    for b, p in enumerate(PROMPTS):
        ref = full[b, len(p) - 1:len(p) - 1 + n]
        assert np.max(np.abs(ref - logits[b])) / np.max(np.abs(ref)) < 1e-5, b
    assert np.max(np.abs(dropping - full)) > 1e-2  # the capacity forward does drop


def test_greedy_equals_argmax_of_repeated_full_forwards():
    """temperature=0: each new token is the argmax of the uncached model run
    again on the sequence so far (a fixed [B, T + n] window, position read
    per row)."""
    model = _unit_scale(tiny(num_layers=3, first_dense_layers=1))
    n = 10
    toks = gen.generate(model, PROMPTS, max_new_tokens=n, temperature=0.0)
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])
    width = max(map(len, PROMPTS)) + n
    seqs = [list(p) for p in PROMPTS]
    for _ in range(n):
        buf = np.zeros((len(seqs), width), np.int32)
        for b, s in enumerate(seqs):
            buf[b, :len(s)] = s
        logits_BTV = np.asarray(step(state, buf))
        for b, s in enumerate(seqs):
            s.append(int(np.argmax(logits_BTV[b, len(s) - 1])))
    ref = np.array([s[len(p):] for s, p in zip(seqs, PROMPTS)])
    np.testing.assert_array_equal(toks, ref)
    assert len(set(ref.reshape(-1).tolist())) > 3  # a continuation that depends on the context


def test_one_compile_for_prefill_and_one_for_decode():
    """Static shapes: one prefill and one decode compile for 12 tokens; other
    prompts of the same sizes compile nothing new."""
    model = tiny()
    kw = dict(max_new_tokens=12, temperature=0.7, top_k=5, top_p=0.9)
    sizes = lambda: (gen.prefill._cache_size(), gen._sample_and_decode._cache_size())
    p0, d0 = sizes()
    gen.generate(model, PROMPTS, seed=0, **kw)
    assert sizes() == (p0 + 1, d0 + 1)
    gen.generate(model, [list(reversed(p)) for p in PROMPTS], seed=1, **kw)
    assert sizes() == (p0 + 1, d0 + 1)


def test_decode_does_not_pad_experts_to_group_align():
    """A decode step's grouped matmuls run on B*K rows, not on every expert
    padded to group_align (which the prefill, like training, does use)."""
    model = tiny(group_align=8)
    b, f, k, e = 3, 16, 2, 4  # 3 rows: no buffer size collides with a weight shape
    a = b * k
    padded = dispatch.dropless_rows(a, e, 8)
    assert padded > a
    graphdef, state = nnx.split(model)
    cache = gen.init_cache(model, b, 8)

    def rows(jaxpr) -> set:
        return {r for r in (a, padded) if f"f32[{r},{f}]" in str(jaxpr)}

    tok_B, pos_B = jnp.zeros((b,), jnp.int32), jnp.full((b,), 4, jnp.int32)
    assert rows(jax.make_jaxpr(lambda s, c: gen.decode_step.__wrapped__(
        graphdef, s, tok_B, pos_B, c))(state, cache)) == {a}
    # The same layer on 3 tokens with the model's own alignment pads them.
    assert rows(jax.make_jaxpr(lambda s: gen.prefill.__wrapped__(
        graphdef, s, jnp.zeros((b, 1), jnp.int32), jnp.ones((b,), jnp.int32), 8))(state)) \
        == {padded}


def test_expert_choice_is_refused_before_compile():
    model = tiny(router="expert_choice", dispatch="capacity")
    with pytest.raises(ValueError, match="router='expert_choice'.*token-choice router"):
        gen.generate(model, PROMPTS, max_new_tokens=2)


def test_sample_cli_uses_the_cache_and_stops_at_the_window(monkeypatch, capsys):
    """`python -m jmoe.sample RUN_DIR`: greedy bytes equal the cached greedy
    continuation, --top_p reaches the sampler, and a --length past the
    run's window stops there with a note."""
    import ml_collections

    from jmoe.train import sample

    model = tiny(vocab_size=256)
    config = ml_collections.ConfigDict({"data": {"source": "stdlib", "seq_len": 16}})
    monkeypatch.setattr(sample, "load", lambda workdir, step=None: (model, config, 7))
    seen = {}
    real = gen.generate

    def spy(*args, **kw):
        seen.update(kw)
        return real(*args, **kw)

    monkeypatch.setattr(gen, "generate", spy)
    assert sample.main(["run", "--prompt", "def ", "--length", "40", "--temperature", "0",
                        "--top_p", "0.5"]) == 0
    out, err = capsys.readouterr()
    assert seen["max_new_tokens"] == 12 and seen["top_p"] == 0.5  # 16 - len("def ")
    assert "stopped after 12 of --length 40 tokens" in err and "seq_len=16" in err
    ref = real(model, [list(b"def ")], max_new_tokens=12, temperature=0.0)[0]
    assert out == "def " + bytes(ref.astype(np.uint8)).decode("utf-8", "replace") + "\n"
    # A prompt that fills the window is refused.
    assert sample.main(["run", "--prompt", "x" * 16]) == 1
    assert "shorten the prompt" in capsys.readouterr().err
