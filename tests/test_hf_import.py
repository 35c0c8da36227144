"""jmoe.hf against transformers' own numbers (recorded by scripts/make_hf_fixtures.py).

The fixtures are tiny random-weight checkpoints saved by transformers'
`save_pretrained`, with the fp32 logits transformers computed for two fixed
prompts and its 32-token greedy continuation. Nothing here imports torch or
transformers: the recorded arrays are the independent reference.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest

import jmoe.hf as hf
from jmoe.hf import safetensors as st
from jmoe.sharding.mesh import make_mesh

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe"]


def _expected(fam):
    return np.load(os.path.join(FIX, fam, "expected.npz"))


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("fam", FAMILIES)
def test_logits_and_greedy_match_transformers(fam):
    cfg, params = hf.load(os.path.join(FIX, fam))
    exp = _expected(fam)
    logits, _, _ = jax.jit(lambda p, i: hf.forward(p, i, cfg))(params, exp["prompts"])
    assert _rel(logits, exp["logits"]) < 1e-4
    toks = hf.generate(params, cfg, exp["prompts"].tolist(), max_new_tokens=32)
    np.testing.assert_array_equal(toks, exp["greedy"])


def test_fixture_options_are_the_ones_under_test():
    """The fixtures exercise what each family adds (else parity would prove less)."""
    mix, _ = hf.load_config(os.path.join(FIX, "mixtral"))
    q2, _ = hf.load_config(os.path.join(FIX, "qwen2_moe"))
    q3, _ = hf.load_config(os.path.join(FIX, "qwen3_moe"))
    assert mix.num_kv_heads < mix.num_heads and mix.rope_theta == 1e6 and not mix.tie_embeddings
    assert q2.qkv_bias and q2.shared_gate and not q2.norm_topk_prob
    assert q2.moe_layers == (True, False, True)
    assert q3.qk_norm and q3.norm_topk_prob and q3.tie_embeddings
    assert q3.head_dim * q3.num_heads != q3.d_model and q3.moe_layers == (False, True)
    assert os.path.exists(os.path.join(FIX, "qwen3_moe", st.INDEX))


def test_expert_parallel_mesh_matches_transformers(fam="mixtral"):
    """Imported straight onto a (data=2, expert=4) mesh: expert weights are
    split over `expert` (no device holds them all) and the model runs its
    MoE layers expert-parallel, with the same logits and greedy tokens."""
    mesh = make_mesh(data=2, expert=4)
    cfg, params = hf.load(os.path.join(FIX, fam), mesh=mesh)
    layer = next(l for l in params["layers"] if "moe" in l)
    w = layer["moe"]["experts"]["w_up_EDF"]
    assert {s.data.shape[0] for s in w.addressable_shards} == {cfg.num_experts // 4}
    exp = _expected(fam)
    with jax.set_mesh(mesh):
        logits, _, _ = jax.jit(lambda p, i: hf.forward(p, i, cfg))(params, exp["prompts"])
        toks = hf.generate(params, cfg, exp["prompts"].tolist(), max_new_tokens=32)
    assert _rel(logits, exp["logits"]) < 1e-4
    np.testing.assert_array_equal(toks, exp["greedy"])


@pytest.mark.parametrize("fam", ["qwen2_moe", "qwen3_moe"])
def test_export_reimport_is_bit_identical(fam, tmp_path):
    src = os.path.join(FIX, fam)
    cfg, params = hf.load(src)
    out = str(tmp_path / "out")
    hf.save(out, params, cfg, source=src, max_shard_bytes=30_000)
    a, b = st.Checkpoint(src), st.Checkpoint(out)
    # Every tensor the source has (a tied lm_head is one tensor), bit for bit.
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k
    assert os.path.exists(os.path.join(out, st.INDEX))  # sharded on the way out
    cfg2, params2 = hf.load(out)
    assert cfg2 == cfg
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                 params, params2)


def test_bf16_import_rounds_like_a_cast():
    """param_dtype='bfloat16' stores each tensor as jnp's own cast of the fp32 one."""
    _, p32 = hf.load(os.path.join(FIX, "mixtral"))
    _, p16 = hf.load(os.path.join(FIX, "mixtral"), param_dtype="bfloat16")
    w32 = p32["layers"][1]["moe"]["experts"]["w_down_EFD"]
    w16 = p16["layers"][1]["moe"]["experts"]["w_down_EFD"]
    assert w16.dtype == np.dtype("bfloat16")
    np.testing.assert_array_equal(np.asarray(w16), np.asarray(w32.astype("bfloat16")))


# ------------------------------------------------------- bad checkpoints ----

def _copy(tmp_path, fam="mixtral"):
    dst = tmp_path / fam
    shutil.copytree(os.path.join(FIX, fam), dst)
    return dst


def _edit_config(path, **kw):
    with open(path / "config.json") as f:
        raw = json.load(f)
    raw.update(kw)
    with open(path / "config.json", "w") as f:
        json.dump(raw, f)


def _edit_tensors(path, fn):
    ck = st.Checkpoint(str(path))
    tensors = {k: np.array(ck[k]) for k in ck}
    fn(tensors)
    st.save_file(tensors, str(path / "model.safetensors"))


KEY = "model.layers.1.block_sparse_moe.experts.2.w3.weight"


@pytest.mark.parametrize("case,match", [
    ("model_type", r"model_type='llama' is not supported: jmoe.hf imports full models of "
                   r"\('mixtral', 'qwen2_moe', 'qwen3_moe', 'gpt_oss', 'deepseek_v3'\)"),
    ("rope", r"rope_parameters.rope_type='llama3' is not supported.*'default'\) and 'yarn'"),
    ("act", r"hidden_act='gelu' is not supported"),
    ("missing", rf"tensor '{KEY}' is missing .*shape \[48, 32\]"),
    ("shape", rf"tensor '{KEY}' has shape \[47, 32\] but config.json implies \[48, 32\]"),
    ("extra", r"tensor 'model.layers.0.self_attn.q_proj.bias' \(and 0 more\) is not read"),
])
def test_bad_checkpoint_one_line_error(case, match, tmp_path, monkeypatch):
    path = _copy(tmp_path)
    if case == "model_type":
        _edit_config(path, model_type="llama")
    elif case == "rope":
        _edit_config(path, rope_parameters={"rope_type": "llama3", "rope_theta": 1e6, "factor": 8})
    elif case == "act":
        _edit_config(path, hidden_act="gelu")
    elif case == "missing":
        _edit_tensors(path, lambda t: t.pop(KEY))
    elif case == "shape":
        _edit_tensors(path, lambda t: t.update({KEY: t[KEY][:47]}))
    elif case == "extra":
        _edit_tensors(path, lambda t: t.update(
            {"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}))
    # Stops before reading any tensor data (only headers), let alone compiling.
    read = []
    monkeypatch.setattr(st.Checkpoint, "__getitem__", lambda self, k: read.append(k))
    with pytest.raises(hf.UnsupportedCheckpoint, match=match) as err:
        hf.load(str(path))
    assert "\n" not in str(err.value) and not read
