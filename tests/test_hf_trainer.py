"""`python train.py --config configs/hf_finetune.py`: the trainer fine-tunes an
imported HF checkpoint (jmoe.train.hf_model) with its loop, step, checkpoints
and metrics.

One tiny reference run (module fixture: the Mixtral fixture, N steps,
checkpoints every 2, the 8 test devices as data parallelism) serves most
tests. Its losses, and the expert-parallel run's, must equal a plain
one-device loop over `jmoe.hf.finetune.make_train_step`; the resumed run
must repeat them bit for bit.
"""

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer

import jmoe.hf as hf
from jmoe.hf import config as hf_config, finetune
from jmoe.sharding import specs
from jmoe.train import cli, data, hf_model, loop, step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures", "hf")
CONFIG_FILE = os.path.join(ROOT, "configs", "hf_finetune.py")
N = 5  # steps of the reference run
LB, Z = 0.01, 1e-3  # loss weights (both non-zero: both must reach the objective)


def tiny(text, family="mixtral", **overrides):
    return cli.load_config(CONFIG_FILE, overrides={
        "hf.path": os.path.join(FIX, family), "data.path": str(text), "data.seq_len": 16,
        "data.val_percent": 10.0, "batch_size": 8, "total_steps": N, "opt.lr": 1e-2,
        "opt.warmup_steps": 0, "loss.load_balance_weight": LB, "loss.z_loss_weight": Z,
        "eval_every": N, "eval_batches": 1, "log_every": 1, "checkpoint_every": 2,
        "keep_checkpoints": 10, "async_checkpointing": False, "mesh.data": 8,
        **overrides})


def records(workdir, split="train"):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def saved_state(workdir, step):
    """The checkpoint's state read by Orbax alone (no abstract tree from jmoe)."""
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "state"))


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    # A periodic word stream: learnable in a few steps.
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(" ".join(f"w{3 + (i * 7) % 40}" for i in range(3000)))
    return path


@pytest.fixture(scope="module")
def ref_run(text, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ref"))
    # Exports at steps 2 and 4 too: the last (step N) replaces them.
    summary = loop.run(tiny(text, **{"hf.export_every": 2}), workdir)
    return workdir, summary


@pytest.fixture(scope="module")
def one_device(text):
    """The reference run's N losses computed without the trainer, on one
    device: `finetune.make_train_step` (its `loss_fn`) with the trainer's
    optimizer, on batches rebuilt independently -- the tokenizer library on
    the text, the EOS from config.json, the split by position, the trainer's
    window order (jmoe.train.data, as for the GPT). (step-1 loss, metrics, losses)."""
    path = os.path.join(FIX, "mixtral")
    ids = Tokenizer.from_file(os.path.join(path, "tokenizer.json")).encode(text.read_text()).ids
    with open(os.path.join(path, "config.json")) as f:
        ids = np.asarray(ids + [json.load(f)["eos_token_id"]], np.int32)
    train_ids = ids[:len(ids) - int(len(ids) * 10.0 / 100)]
    batches = data.train_iterator(train_ids, seq_len=16, global_batch=8, seed=0)
    config = tiny(text)
    tx = step_lib.make_optimizer(config.opt, config.total_steps)
    cfg, params = hf.load(path)
    step = finetune.make_train_step(cfg, tx, {"load_balance_loss": LB, "z_loss": Z})
    opt_state, out = tx.init(params), []
    for _ in range(N):
        params, opt_state, m = step(params, opt_state, next(batches))
        out.append(jax.device_get(m))
    return out


@pytest.mark.slow  # the module's reference run and the one-device loop (~40-60 s)
def test_trains_and_the_first_loss_is_finetune_loss_fn(ref_run, one_device):
    workdir, summary = ref_run
    recs = records(workdir)
    assert [r["step"] for r in recs] == list(range(1, N + 1))
    losses = [r["loss"] for r in recs]
    assert losses[-1] < 0.6 * losses[0], losses
    np.testing.assert_allclose(recs[0]["loss"], float(one_device[0]["loss"]), rtol=2e-6)
    np.testing.assert_allclose(recs[0]["ce"], float(one_device[0]["ce"]), rtol=2e-6)
    np.testing.assert_allclose(losses, [float(m["loss"]) for m in one_device], rtol=1e-5)
    # Aux losses and per-layer expert loads are logged, as for the GPT.
    load = np.asarray(recs[0]["expert_load"])
    assert load.shape == (2, 4) and np.allclose(load.sum(-1), 1.0)
    assert recs[0]["load_balance_loss"] > 0 and recs[0]["z_loss"] > 0
    assert [r["step"] for r in records(workdir, "val")] == [N]
    assert os.listdir(os.path.join(workdir, "tb"))
    assert sorted(map(int, os.listdir(os.path.join(workdir, "checkpoints")))) == [2, 4, N]


@pytest.mark.slow  # needs the module's reference run (~40 s) when run alone
def test_export_equals_the_trained_params(ref_run):
    workdir, _ = ref_run
    out = os.path.join(workdir, "hf")
    state = saved_state(workdir, N)
    trained = state["params"]
    # Re-imported by jmoe: every leaf equal to the checkpoint's.
    _, back = hf.load(out)
    flat_t = dict(jax.tree_util.tree_flatten_with_path(trained)[0])
    flat_b = dict(jax.tree_util.tree_flatten_with_path(back)[0])
    assert len(flat_t) == len(flat_b) > 10
    for k in flat_t:
        kb = [p for p in flat_b if jax.tree_util.keystr(p) == jax.tree_util.keystr(k)
              or _same_path(p, k)]
        assert kb, k
        np.testing.assert_array_equal(np.asarray(flat_b[kb[0]]), np.asarray(flat_t[k]))
    # And the files, read with the safetensors library: HF names and layouts.
    tensors = load_file(os.path.join(out, "model.safetensors"))
    source = load_file(os.path.join(FIX, "mixtral", "model.safetensors"))
    moe = trained["layers"][1]["moe"]
    np.testing.assert_array_equal(tensors["model.layers.1.block_sparse_moe.experts.2.w1.weight"],
                                  np.asarray(moe["experts"]["w_gate_EDF"])[2].T)
    np.testing.assert_array_equal(tensors["model.layers.1.block_sparse_moe.gate.weight"],
                                  np.asarray(moe["router"]["w_DE"]).T)
    np.testing.assert_array_equal(tensors["model.embed_tokens.weight"],
                                  np.asarray(trained["embed"]["w_VD"]))
    # Training moved them: the export is not the source copied back.
    assert not np.array_equal(tensors["model.embed_tokens.weight"],
                              source["model.embed_tokens.weight"])
    assert set(tensors) == set(source)
    assert os.path.exists(os.path.join(out, "tokenizer.json"))
    assert not {"hf.tmp", "hf.old"} & set(os.listdir(workdir))


def test_sample_on_the_run_dir_samples_its_export(ref_run, capsys, monkeypatch):
    """`python -m jmoe.sample RUN` on an HF fine-tuning run: the same greedy
    text as sampling its export directory; --step and a missing export are
    refused with their messages."""
    from jmoe.train import sample
    workdir, _ = ref_run
    argv = ["--prompt", "the", "--length", "6", "--temperature", "0"]
    assert sample.main([os.path.join(workdir, "hf")] + argv) == 0
    want = capsys.readouterr().out
    assert sample.main([workdir] + argv) == 0
    got = capsys.readouterr()
    assert got.out == want and want.strip()
    assert "sampling its export" in got.err
    assert sample.main([workdir, "--step", str(N)] + argv) == 1
    assert "--step picks a checkpoint of a GPT-MoE run" in capsys.readouterr().err
    monkeypatch.setattr(hf_model, "export_dir", lambda config, w: os.path.join(w, "nowhere"))
    assert sample.main([workdir] + argv) == 1
    assert "without an export yet" in capsys.readouterr().err


def _same_path(a, b):
    norm = lambda p: [str(getattr(k, "key", getattr(k, "idx", k))) for k in p]
    return norm(a) == norm(b)


@pytest.mark.slow  # a second launch and a refused third (~25-30 s)
def test_resume_replays_the_losses_without_reimporting(ref_run, text, tmp_path, monkeypatch):
    ref, _ = ref_run
    workdir = str(tmp_path / "run")
    shutil.copytree(ref, workdir)
    for s in (4, N):  # as if killed after the checkpoint of step 2
        shutil.rmtree(os.path.join(workdir, "checkpoints", str(s)))
    shutil.rmtree(os.path.join(workdir, "hf"))
    offset = os.path.getsize(os.path.join(workdir, "metrics.jsonl"))

    def no_import(*a, **k):
        raise AssertionError("a resumed run re-imported the HF tensors")
    monkeypatch.setattr(hf, "load", no_import)
    loop.run(tiny(text), workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        f.seek(offset)
        again = [r for r in map(json.loads, f) if r["split"] == "train"]
    want = {r["step"]: r["loss"] for r in records(ref)}
    assert [r["step"] for r in again] == [3, 4, N]
    for r in again:
        assert r["loss"] == want[r["step"]], (r["step"], r["loss"], want[r["step"]])
    a = load_file(os.path.join(ref, "hf", "model.safetensors"))
    b = load_file(os.path.join(workdir, "hf", "model.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # Another checkpoint in the same workdir is refused, naming the field.
    with pytest.raises(loop.ConfigError, match=r"config\.hf\.path=.*qwen3_moe.* gives "):
        loop.run(tiny(text, family="qwen3_moe", total_steps=N + 1), workdir)
    # So is the GPT-MoE's config.
    gpt = cli.load_config(os.path.join(ROOT, "configs", "gpt_moe.py"), overrides={
        "model.d_model": 32, "model.num_layers": 1, "model.num_heads": 2, "model.d_ff": 32,
        "model.num_experts": 4, "data.source": "text", "data.path": str(text),
        "data.seq_len": 16, "data.val_percent": 10.0, "batch_size": 8, "mesh.data": 8})
    with pytest.raises(loop.ConfigError, match="is of an HF fine-tuning run"):
        loop.run(gpt, workdir)


@pytest.mark.slow  # the expert-parallel step compiles for 8 devices (~30-60 s on 2 cores)
def test_expert_parallel_fsdp_losses_equal_one_device(one_device, text, tmp_path, monkeypatch):
    # The fixture's leaves are below FSDP's size floor: lower it so FSDP splits them.
    monkeypatch.setattr(specs.fsdp_spec, "__kwdefaults__", {"min_size": 256})
    seen = {}
    real = hf_model.HFModel.import_state

    def spy(self, tx, shardings):
        state = real(self, tx, shardings)  # donated by the first step: keep its layout
        seen["shards"] = jax.tree.map(lambda x: x.sharding.shard_shape(x.shape), state)
        return state
    monkeypatch.setattr(hf_model.HFModel, "import_state", spy)
    workdir = str(tmp_path / "ep")
    loop.run(tiny(text, **{"mesh.data": 2, "mesh.expert": 4, "mesh.fsdp": True}), workdir)
    want = [float(m["loss"]) for m in one_device]
    got = [r["loss"] for r in records(workdir)]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # The layout took effect: E over `expert`, the embedding split over `data`.
    params = seen["shards"].params
    assert params["layers"][0]["moe"]["experts"]["w_up_EDF"][0] == 4 // 4
    assert np.prod(params["embed"]["w_VD"]) == 96 * 32 // 2


@pytest.mark.slow  # MLA + bias update, one compile (~20-30 s)
def test_deepseek_selection_bias_is_updated_from_the_logged_loads(text, tmp_path):
    rate = 0.05
    workdir = str(tmp_path / "ds")
    loop.run(tiny(text, family="deepseek_v3", total_steps=1, eval_every=1,
                  **{"hf.bias_update_rate": rate}), workdir)
    load = np.asarray(records(workdir)[0]["expert_load"])  # [L_moe, E]
    src = load_file(os.path.join(FIX, "deepseek_v3", "model.safetensors"))
    out = load_file(os.path.join(workdir, "hf", "model.safetensors"))
    with open(os.path.join(FIX, "deepseek_v3", "config.json")) as f:
        first_moe = json.load(f).get("first_k_dense_replace", 0)
    key = f"model.layers.{first_moe}.mlp.gate.e_score_correction_bias"
    # bias + rate * sign(mean load - load), written out (routing.update_bias's rule).
    want = src[key] + rate * np.sign(load[0].mean() - load[0])
    np.testing.assert_allclose(out[key], want, rtol=0, atol=1e-7)
    assert not np.array_equal(out[key], src[key])


@pytest.mark.slow  # one expert-parallel compile per family (~30-60 s each)
@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "gpt_oss"])
def test_every_family_trains_expert_parallel_and_exports(family, text, tmp_path, monkeypatch):
    # One exchange buffer instead of the bucket switch (an execution choice,
    # the same maths; 23 s -> 15.5 s a family): the trainer's HF run under
    # the bucket switch is test_expert_parallel_fsdp_losses_equal_one_device,
    # and each family's layer under it on (2, 4) is in test_hf_finetune,
    # test_hf_gpt_oss, test_hf_blocks and test_hf_deepseek.
    real = hf_config.HFConfig.moe_config
    monkeypatch.setattr(hf_config.HFConfig, "moe_config",
                        lambda self, **kw: real(self, **kw).with_execution(ep_buckets=()))
    workdir = str(tmp_path / family)
    loop.run(tiny(text, family=family, total_steps=3, eval_every=3,
                  **{"mesh.data": 2, "mesh.expert": 4}), workdir)
    losses = [r["loss"] for r in records(workdir)]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    cfg, back = hf.load(os.path.join(workdir, "hf"))
    assert cfg.model_type == family
    trained = saved_state(workdir, 3)["params"]
    np.testing.assert_array_equal(np.asarray(back["embed"]["w_VD"]),
                                  np.asarray(trained["embed"]["w_VD"]))


@pytest.mark.parametrize("override, message", [
    ({"placement.every": 5}, r"config\.placement\.every=5 is invalid: online expert re-placement"),
    ({"adaptive.plans": 2}, r"config\.adaptive\.plans=2 is invalid"),
    ({"mesh.data": 4, "mesh.tensor": 2}, r"config\.mesh\.tensor=2 is invalid"),
    ({"hf.bias_update_rate": 0.1}, r"config\.hf\.bias_update_rate=0\.1 .*no selection bias"),
    ({"hf.path": "/nonexistent"}, r"config\.hf\.path='/nonexistent' is invalid"),
    ({"data.path": "/nonexistent"}, r"config\.data\.path='/nonexistent'"),
])
def test_refused_before_compiling(text, tmp_path, override, message):
    with pytest.raises(loop.ConfigError, match=message):
        loop.run(tiny(text, **override), str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w" / "checkpoints")
