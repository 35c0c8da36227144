"""The trainer end to end: learning, resume after SIGKILL, mesh change, time limit,
NaN, CLI.

One tiny reference run (module fixture, mesh data=1 x expert=8) serves most
tests; the SIGKILL test replays it in a subprocess and must match it bit for
bit.
"""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import model as model_lib, routing
from jmoe.sharding import make_mesh
from jmoe.train import checkpoint, cli, loop, mesh as mesh_lib, step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 6  # checkpoint interval; the reference run trains 2N steps

TINY = {
    "model.d_model": 32, "model.num_layers": 2, "model.num_heads": 2, "model.num_experts": 8,
    "model.top_k": 2, "model.d_ff": 32, "model.group_align": 8,
    "data.seq_len": 32, "batch_size": 16, "total_steps": 2 * N,
    "opt.lr": 1e-2, "opt.warmup_steps": 2, "opt.schedule_steps": 2 * N,
    "eval_every": 2 * N, "eval_batches": 2, "log_every": 1, "checkpoint_every": N,
    "keep_checkpoints": 5, "mesh.data": 1, "mesh.expert": 8,
}


CONFIG_FILE = os.path.join(ROOT, "configs", "gpt_moe.py")


def load_config(arg=None):
    return cli.load_config(CONFIG_FILE, arg)


def tiny_config(**overrides):
    return cli.load_config(CONFIG_FILE, overrides={**TINY, **overrides})


def cli_args(**overrides):
    return [f"--config.{k}={v}" for k, v in {**TINY, **overrides}.items()]


def subprocess_env():
    env = dict(os.environ)
    # Same numerics as this process (tests/conftest.py sets these in-process).
    env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def train_losses(workdir):
    """{step: loss} of every logged step; a resumed run's records win."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r["split"] == "train":
                out[r["step"]] = r["loss"]
    return out


def train_records_from(workdir, offset):
    """Train records that metrics.jsonl gained after byte `offset` (one launch's)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        f.seek(offset)
        return [r for r in map(json.loads, f) if r["split"] == "train"]


def committed_steps(workdir):
    """Steps of the committed checkpoints (Orbax renames a finished save to its step)."""
    path = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def restore_state(workdir, config, step):
    gpt = loop.validate_config(config)
    tx = step_lib.make_optimizer(config.opt, config.total_steps)
    abstract = jax.eval_shape(step_lib.make_init(gpt, tx, config.seed))
    mgr = checkpoint.manager(workdir, every=1, keep=10, read_only=True)
    _, state, data_state = checkpoint.restore(mgr, abstract, step)
    mgr.close()
    return state, data_state


@pytest.fixture(scope="module")
def ref_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ref"))
    summary = loop.run(tiny_config(), workdir)
    return workdir, summary


def test_tiny_run_learns_evaluates_and_reports(ref_run):
    workdir, summary = ref_run
    losses = train_losses(workdir)
    assert sorted(losses) == list(range(1, 2 * N + 1))
    assert losses[2 * N] < losses[1] - 0.5, losses
    assert np.isfinite(summary["val_loss"]) and summary["val_loss"] < losses[1]
    assert summary["step"] == 2 * N
    recs = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    last = [r for r in recs if r["split"] == "train"][-1]
    assert np.array(last["expert_load"]).shape == (2, 8)  # [MoE layers, experts]
    for key in ("lr", "grad_norm", "load_balance_loss", "z_loss", "dropped_fraction",
                "router_entropy", "tokens_per_s", "mfu"):
        assert key in last
    assert any(r["split"] == "val" for r in recs)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tb")))
    assert json.load(open(os.path.join(workdir, "summary.json")))["step"] == 2 * N
    # Checkpoints at N and 2N hold the data position and the config.
    state, data_state = restore_state(workdir, tiny_config(), N)
    assert int(state.step) == N and data_state == {"next_index": N}
    assert checkpoint.restore_config(workdir)[1].model.d_model == 32


def test_plot_and_sample(ref_run, capsys, monkeypatch):
    from flax import nnx

    from jmoe import plot
    from jmoe.train import sample

    workdir, _ = ref_run
    # What each figure draws, taken just before it is written.
    drawn = {}
    save = plot._save

    def spy(fig, out_dir, name, tight=True):
        axes = [ax for ax in fig.axes if ax.lines or ax.images]
        lines = [[(np.asarray(ln.get_xdata()), np.asarray(ln.get_ydata())) for ln in ax.lines]
                 for ax in axes]
        drawn[name] = (lines, [np.asarray(ax.images[0].get_array()) for ax in axes if ax.images])
        return save(fig, out_dir, name, tight)

    monkeypatch.setattr(plot, "_save", spy)
    out = os.path.join(workdir, "plots")
    assert plot.main([workdir, "--out", out]) == 0
    for name in ("loss.png", "optim.png", "moe.png", "expert_load.png"):
        with open(os.path.join(out, name), "rb") as f:
            png = f.read()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    # The curves and the heatmap are the numbers in metrics.jsonl.
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    train = sorted((r for r in recs if r["split"] == "train"), key=lambda r: r["step"])
    val = [r for r in recs if r["split"] == "val"]
    steps = [r["step"] for r in train]
    (loss_lines,), _ = drawn["loss.png"]
    np.testing.assert_array_equal(loss_lines[0][0], steps)
    np.testing.assert_array_equal(loss_lines[0][1], [r["ce"] for r in train])
    np.testing.assert_array_equal(loss_lines[1][1], [r["loss"] for r in val])
    (lr_lines, gn_lines), _ = drawn["optim.png"]
    np.testing.assert_array_equal(lr_lines[0][1], [r["lr"] for r in train])
    np.testing.assert_array_equal(gn_lines[0][1], [r["grad_norm"] for r in train])
    _, heatmaps = drawn["expert_load.png"]
    load_SLE = np.array([r["expert_load"] for r in train])
    assert len(heatmaps) == load_SLE.shape[1] == 2  # one per MoE layer
    for layer, img in enumerate(heatmaps):
        # Rows are experts, columns steps; 1 = a balanced share (1/E).
        np.testing.assert_allclose(img, load_SLE[:, layer, :].T * 8, rtol=1e-12)

    model, config, step = sample.load(workdir)
    assert step == 2 * N
    # Twelve steps in, the model greedily predicts a space after anything,
    # so an off-by-one in the position read would go unseen: the sampler's
    # mechanics are checked on the same architecture with random weights,
    # whose greedy continuation changes with the context.
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    state = jax.tree.map(
        lambda x: jax.device_put(rng.normal(0, x.shape[-2] ** -0.5 if x.ndim > 1 else 1.0,
                                            x.shape).astype(x.dtype), x.sharding)
        if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    random_model = nnx.merge(graphdef, state)
    prompt = np.frombuffer(b"def ", np.uint8)
    # top_k=1 is greedy whatever the temperature and seed: each new token is
    # the argmax of the model's logits at the previous position. The
    # reference reads all of them off one causal forward pass over the
    # final sequence.
    g = sample.generate(random_model, prompt, length=12, seq_len=32, temperature=1.0, top_k=1,
                        seed=1)
    g2 = sample.generate(random_model, prompt, length=12, seq_len=32, temperature=0.5, top_k=1,
                         seed=2)
    assert g.shape == (12,) and np.array_equal(g, g2)
    assert len(set(g.tolist())) > 2  # a continuation that depends on the context
    seq = np.concatenate([prompt, g]).astype(np.int32)[None]
    logits_1TV = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])(state, seq)
    np.testing.assert_array_equal(g, np.argmax(np.asarray(logits_1TV[0, len(prompt) - 1:-1]), -1))


@pytest.mark.slow
def test_sigkill_then_resume_is_identical(ref_run, tmp_path):
    ref_dir, _ = ref_run
    workdir = str(tmp_path / "killed")
    # Far more steps than needed (same schedule), so the kill lands mid-run;
    # a save every step, so it most likely lands during an (async) save too.
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config",
           os.path.join(ROOT, "configs", "gpt_moe.py"), "--workdir", workdir]
    proc = subprocess.Popen(cmd + cli_args(total_steps=1000, checkpoint_every=1),
                            env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=ROOT)
    committed = os.path.join(workdir, "checkpoints", str(N))
    deadline = time.time() + 300
    while not os.path.isdir(committed) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    out = proc.communicate()[0].decode()
    assert proc.returncode == -signal.SIGKILL, out
    assert os.path.isdir(committed), out
    ckpts = os.path.join(workdir, "checkpoints")
    half_written = [d for d in os.listdir(ckpts) if "tmp" in d]
    latest = committed_steps(workdir)[-1]  # >= N: the kill may land a few saves later
    killed_log = os.path.getsize(os.path.join(workdir, "metrics.jsonl"))

    # The same command (with the reference's length) resumes from the latest checkpoint.
    res = subprocess.run(cmd + cli_args(), env=subprocess_env(), capture_output=True,
                         text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"resumed from {ckpts}/{latest} " in res.stdout, res.stdout
    # A deterministic restart from step 0 would reach the same losses and
    # state below (and could still print the line above): what tells a resume
    # apart is that the relaunch trained only the steps after the checkpoint.
    assert [r["step"] for r in train_records_from(workdir, killed_log)] == \
        list(range(latest + 1, 2 * N + 1))
    # Orbax commits a checkpoint by renaming its temporary directory, so one
    # cut short by the kill was never visible; the restart cleared it away.
    assert not [d for d in os.listdir(ckpts) if "tmp" in d], half_written
    ref, got = train_losses(ref_dir), train_losses(workdir)
    assert [got[s] for s in range(1, 2 * N + 1)] == [ref[s] for s in range(1, 2 * N + 1)]
    config = tiny_config()
    a, da = restore_state(ref_dir, config, 2 * N)
    b, db = restore_state(workdir, config, 2 * N)
    assert da == db == {"next_index": 2 * N}  # no batch repeated or skipped
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow
def test_restore_on_another_mesh_evaluates_and_trains_on_alike(ref_run, tmp_path):
    ref_dir, summary = ref_run
    workdir = str(tmp_path / "moved")
    shutil.copytree(ref_dir, workdir)
    # One exchange buffer instead of the bucket switch (an execution knob:
    # the same maths, ~17 s less compile).
    moved_config = tiny_config(**{"mesh.data": 2, "mesh.expert": 4, "execution.ep_buckets": ()})
    # Saved on (data=1, expert=8); restored on (2, 4): a finished run only evaluates.
    moved = loop.run(moved_config, workdir)
    assert moved["step"] == 2 * N
    np.testing.assert_allclose(moved["val_loss"], summary["val_loss"], rtol=1e-5)
    # The training run's summary survives the evaluation-only rerun.
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f)["train_loss"] == summary["train_loss"]

    # Training goes on from step N on (2, 4) as it went on on (1, 8) in the
    # reference: parameters, both Adam moments, the optimizer's counts (the
    # LR schedule), the step and the data position all came across.
    # Tolerance: fp32 with "highest" matmuls, and both meshes split the batch
    # into the same 8 row shards, so only the order of cross-shard sums (the
    # gradient reduction over a different device layout) differs: ~1 ulp
    # (6e-8 relative) per step, which Adam's g/sqrt(v) passes on without
    # amplifying over N = 6 steps. Measured: losses equal, every state leaf
    # within 1.1e-7 of its largest entry. rtol 1e-6 allows a few ulp; fresh
    # Adam moments or a lost data position move the losses by 0.09-0.13
    # relative, and a reset step shows in the state comparison.
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(2 * N)))
    go_on = loop.run(moved_config, workdir)
    ref, got = train_losses(ref_dir), train_losses(workdir)
    steps = list(range(N + 1, 2 * N + 1))
    np.testing.assert_allclose([got[s] for s in steps], [ref[s] for s in steps],
                               rtol=1e-6, atol=0)
    np.testing.assert_allclose(go_on["val_loss"], summary["val_loss"], rtol=1e-6)
    a, da = restore_state(ref_dir, tiny_config(), 2 * N)
    b, db = restore_state(workdir, moved_config, 2 * N)
    assert da == db == {"next_index": 2 * N}
    # The whole state: the step count, both Adam moments and their counts too.
    # Each leaf within 1e-6 of its largest entry (measured: <= 1.1e-7).
    jax.tree.map(lambda x, y: np.testing.assert_allclose(
        np.asarray(y, np.float64), np.asarray(x, np.float64), rtol=0,
        atol=1e-6 * np.abs(np.asarray(x, np.float64)).max()), a, b)


def test_max_time_s_stops_with_a_checkpoint_and_the_same_command_resumes(ref_run, tmp_path,
                                                                          capsys):
    ref_dir, _ = ref_run
    ref = train_losses(ref_dir)
    workdir = str(tmp_path / "timed")
    ckpts = os.path.join(workdir, "checkpoints")
    # Out of time as soon as a step is dispatched: each launch trains one step.
    # The reference's config otherwise (checkpoint_every=N), so the
    # checkpoints at 1 and 2 are the stops' own.
    # One exchange buffer, as in the test above: ~17 s less compile per launch.
    config = tiny_config(max_time_s=1e-9, **{"execution.ep_buckets": ()})
    for stop in (1, 2):
        summary = loop.run(config, workdir)
        out = capsys.readouterr().out
        assert summary["step"] == stop, out
        assert committed_steps(workdir) == list(range(1, stop + 1)), out
        assert f"done: step {stop} " in out, out
        # It says why it stopped, on screen and in the summary.
        assert (f"stopped early at step {stop} of {config.total_steps} by the time limit "
                "(config.max_time_s), with a checkpoint: rerun the same command") in out, out
        if stop > 1:
            assert f"resumed from {ckpts}/{stop - 1} " in out, out
        with open(os.path.join(workdir, "summary.json")) as f:
            saved = json.load(f)
        assert saved["step"] == stop
        assert saved["stopped_by"] == "the time limit (config.max_time_s)"
    state, data_state = restore_state(workdir, config, 2)
    assert int(state.step) == 2 and data_state == {"next_index": 2}
    # The second launch trained step 2 only, on the reference's second batch.
    got = train_losses(workdir)
    assert sorted(got) == [1, 2]
    np.testing.assert_allclose([got[1], got[2]], [ref[1], ref[2]], rtol=1e-6, atol=0)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny_config(**{"model.num_layers": 1, "opt.lr": 1e30, "opt.warmup_steps": 0,
                            "opt.grad_clip": 0.0, "checkpoint_every": 1,
                            "total_steps": 20, "mesh.data": -1, "mesh.expert": 1})
    with pytest.raises(loop.NonFiniteLoss, match=r"at step (\d+)") as err:
        loop.run(config, str(tmp_path))
    bad = int(err.value.args[0].split("at step ")[1].split(":")[0])
    mgr = checkpoint.manager(str(tmp_path), every=1, keep=5, read_only=True)
    assert mgr.latest_step() is not None and mgr.latest_step() < bad
    mgr.close()


def test_grad_accumulation_and_router_bias_update():
    config = tiny_config(**{"model.num_layers": 1, "model.router": "sigmoid_topk",
                            "model.bias_update_rate": 0.1,
                            "loss.load_balance_weight": 0.0, "loss.z_loss_weight": 0.0,
                            "mesh.data": -1, "mesh.expert": 1})
    gpt = loop.validate_config(config)
    mesh = make_mesh(config.mesh, owner="config.mesh")
    tx = step_lib.make_optimizer(config.opt, config.total_steps)
    sched = step_lib.make_schedule(config.opt, config.total_steps)
    init = step_lib.make_init(gpt, tx, 0)
    shard = mesh_lib.state_shardings(mesh, jax.eval_shape(init))
    bsh = mesh_lib.batch_sharding(mesh)
    graphdef = step_lib.graphdef_of(gpt)
    batch = jax.device_put(np.random.default_rng(0).integers(0, 256, (16, 33), np.int32), bsh)
    out = {}
    with jax.set_mesh(mesh):
        for a in (1, 2):
            scfg = dataclasses.replace(step_lib.step_config(config), grad_accum_steps=a)
            train, _ = step_lib.jit_steps(shard, bsh, graphdef, tx, sched, scfg)
            state = model_lib.compile_init(jax.jit(init, out_shardings=shard))()
            out[a] = train(state, batch)
    (s1, m1), (s2, m2) = out[1], out[2]
    np.testing.assert_allclose(m1["ce"], m2["ce"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-4)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
                 s1.params, s2.params)
    # Aux-loss-free balancing: the biases moved, by the rule, outside the optimizer.
    biases = [v for v in jax.tree.leaves(s1.buffers)]
    assert len(biases) == 1 and np.abs(biases[0]).max() > 0
    np.testing.assert_allclose(biases[0], routing.update_bias(
        jnp.zeros(8), m1["expert_load"][0], 0.1), rtol=1e-6)


@pytest.mark.parametrize("args,needle", [
    (["--config.model.d_modle=3"], "d_modle"),
    (["--config.data.source=text", "--config.data.path=/no/such/dir"], "config.data.path"),
    (["--config.model.top_k=99"], "top_k"),
    (["--config.batch_size=12", "--config.mesh.data=8"], "config.batch_size"),
    # An unknown key at any depth names itself and the valid ones.
    (["--config.train.steps=abc"], "unknown config field 'train' in --config.train.steps; "
                                   "fields of config: "),
    (["--config.model.num_expert=4"], "did you mean 'num_experts'?); fields of config.model:"),
    (["--config.execution.overlap_chunks=0"], "config.execution.overlap_chunks=0 is invalid"),
])
def test_cli_errors_exit_nonzero_with_one_clear_line(tmp_path, args, needle):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config",
           os.path.join(ROOT, "configs", "gpt_moe.py"), "--workdir", str(tmp_path)]
    res = subprocess.run(cmd + args, env=subprocess_env(), capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert res.returncode != 0
    lines = [l for l in res.stderr.splitlines() if needle in l]
    assert lines, res.stderr
    assert "Traceback" not in res.stderr
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_train_py_sets_gpu_flags_before_jax_starts(tmp_path):
    """XLA reads XLA_FLAGS once, when the first backend starts: train.py must
    call configure_gpu_overlap() before that (here forced to record the state,
    then stopped by a config error before any compile)."""
    script = f"""
import runpy, sys
from jax._src import xla_bridge
import jmoe.runtime.xla_flags as xf
def probe(*a, **k):
    print("BACKENDS_STARTED", xla_bridge.backends_are_initialized(), flush=True)
    return []
xf.configure_gpu_overlap = xf.configure_cpu_workarounds = probe
sys.argv = ["train.py", "--config", {os.path.join(ROOT, "configs", "gpt_moe.py")!r},
            "--workdir", {str(tmp_path)!r}, "--config.model.top_k=99"]
runpy.run_path({os.path.join(ROOT, "train.py")!r}, run_name="__main__")
"""
    res = subprocess.run([sys.executable, "-c", script], env=subprocess_env(),
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 1, res.stderr
    assert res.stdout.count("BACKENDS_STARTED False") == 2, res.stdout + res.stderr


def test_resume_check_compares_the_model_not_how_it_runs():
    config = tiny_config()
    saved = json.loads(json.dumps(config.model.to_dict()))  # as the checkpoint stores it
    loop._check_same_model(saved, config)  # tuples came back as lists: still the same
    config.execution.overlap_chunks = 2  # how it runs: resuming with it is fine
    loop._check_same_model(saved, config)
    config.model.d_model = 2 * config.model.d_model
    with pytest.raises(ValueError, match="config.model.d_model"):
        loop._check_same_model(saved, config)


def test_tokens_per_s_leaves_evaluation_out_but_keeps_its_window(monkeypatch):
    """A window that ends in an evaluation counts all its steps over the
    training time alone (a fake clock: no timing of this machine)."""
    from jmoe.train import metrics

    now = [0.0]
    monkeypatch.setattr(metrics, "time", type("Clock", (), {
        "perf_counter": staticmethod(lambda: now[0]), "time": staticmethod(lambda: now[0])}))
    rep = metrics.Reporter("unused", total_steps=10, start_step=0, tokens_per_step=100,
                           flops_per_step=1e3, peak_flops=1e6, enabled=False)
    rep.reset_clock(1)  # after the first (compiling) step
    now[0] = 3.0  # steps 2 and 3 take 1.5 s each
    rep.add(2, {"loss": 1.0})
    rep.add(3, {"loss": 0.5})
    rep.eval(3, 0.7, seconds=10.0)
    now[0] = 13.0  # the evaluation's 10 s
    mean = rep.flush(3)
    assert mean["tokens_per_s"] == pytest.approx(2 * 100 / 3.0)
    assert mean["mfu"] == pytest.approx(2 * 1e3 / 3.0 / 1e6)
