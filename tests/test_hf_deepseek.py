"""The full DeepSeek-V3 model (multi-head latent attention with a compressed
KV cache, interleaved YaRN RoPE with mscale, first dense layers, the sigmoid
group-limited router with its selection bias, a shared expert) against
transformers' recorded numbers."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

import jmoe.hf as hf
from jmoe.hf import safetensors as st
from jmoe.sharding.mesh import make_mesh

PATH = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "deepseek_v3")


@pytest.fixture(scope="module")
def deepseek():
    return hf.load(PATH)


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def test_logits_and_greedy_match_transformers(deepseek):
    cfg, params = deepseek
    exp = np.load(os.path.join(PATH, "expected.npz"))
    assert cfg.mla[0] and cfg.rope_interleave and cfg.moe_layers == (False, True)
    assert cfg.n_group == 4 and cfg.routed_scaling_factor == 2.5 and cfg.shared_d_ff
    run = jax.jit(lambda p, i, c: hf.forward(p, i, c)[0], static_argnums=2)
    assert _rel(run(params, exp["prompts"], cfg), exp["logits"]) < 1e-4
    np.testing.assert_array_equal(
        hf.generate(params, cfg, exp["prompts"].tolist(), max_new_tokens=32), exp["greedy"])
    # Each feature is live: without it the logits move far beyond the tolerance.
    plain = cfg.replace(softmax_scale=sum(cfg.mla[2:4]) ** -0.5)  # YaRN's mscale^2 dropped
    no_bias = jax.tree.map(lambda x: x, params)
    no_bias["layers"][1]["moe_bias"]["bias_E"] = 0 * no_bias["layers"][1]["moe_bias"]["bias_E"]
    for c, p in ((cfg.replace(rope_interleave=False), params), (plain, params), (cfg, no_bias)):
        assert _rel(run(p, exp["prompts"], c), exp["logits"]) > 1e-3


def test_compressed_cache_decode_equals_uncached(deepseek):
    cfg, params = deepseek
    cache = hf.init_cache(cfg, 2, 8)
    assert set(cache[0]) == {"ckv_BSC", "krot_BSR"}  # the latent, not per-head K/V
    prompts = [[5, 17, 33, 8], [40, 41, 7, 7, 88, 15, 22]]
    n = 8
    toks, logits = hf.generate(params, cfg, prompts, max_new_tokens=n, temperature=1.0,
                               seed=2, return_logits=True)
    seqs = [p + toks[b].tolist() for b, p in enumerate(prompts)]
    block = np.zeros((2, max(map(len, seqs))), np.int32)
    for b, s in enumerate(seqs):
        block[b, :len(s)] = s
    full, _, _ = jax.jit(lambda p, i: hf.forward(p, i, cfg))(params, block)
    for b, p in enumerate(prompts):
        assert _rel(logits[b], np.asarray(full)[b, len(p) - 1:len(p) - 1 + n]) < 1e-4, b


def test_expert_parallel_and_export(deepseek, tmp_path):
    """On a (2, 4) mesh the MoE layer runs expert-parallel with the same
    logits; import -> export reproduces every tensor bit for bit."""
    cfg, params = deepseek
    mesh = make_mesh(data=2, expert=4)
    _, p8 = hf.load(PATH, mesh=mesh)
    exp = np.load(os.path.join(PATH, "expected.npz"))
    with jax.set_mesh(mesh):
        logits, _, _ = jax.jit(lambda p, i: hf.forward(p, i, cfg))(p8, exp["prompts"])
    assert _rel(logits, exp["logits"]) < 1e-4
    out = str(tmp_path / "out")
    hf.save(out, params, cfg, source=PATH)
    a, b = st.Checkpoint(PATH), st.Checkpoint(out)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    with pytest.raises(hf.UnsupportedCheckpoint, match="pass source="):
        hf.save(str(tmp_path / "no_source"), params, cfg)
    assert not (tmp_path / "no_source").exists()  # refused before writing anything


def test_multi_token_prediction_layers_are_skipped(tmp_path):
    """A checkpoint with an MTP layer after the decoder's imports the same
    decoder; a stray tensor inside the decoder is still refused."""
    import shutil
    dst = tmp_path / "ds"
    shutil.copytree(PATH, dst)
    ck = st.Checkpoint(str(dst))
    tensors = {k: np.array(ck[k]) for k in ck}
    mtp = {"model.layers.2.eh_proj.weight": np.zeros((32, 64), np.float32)}
    st.save_file({**tensors, **mtp}, str(dst / "model.safetensors"))
    cfg, params = hf.load(str(dst))
    assert cfg.num_layers == 2 and len(params["layers"]) == 2
    st.save_file({**tensors, "model.layers.1.eh_proj.weight": mtp[next(iter(mtp))]},
                 str(dst / "model.safetensors"))
    with pytest.raises(hf.UnsupportedCheckpoint, match="model.layers.1.eh_proj.weight"):
        hf.load(str(dst))
