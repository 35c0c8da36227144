"""Fault injection (issue 15): what the trainer does when a cluster misbehaves.

Each test injects one fault and checks the documented behaviour
(docs/reliability.md): damaged checkpoints are walked back over, a held
workdir is refused, a failed save stops (or is skipped) with the previous
checkpoint intact, a resume on other data is refused, a NaN before the first
save says there is no checkpoint, and a hung process ends the job.

The model is a one-layer, four-expert GPT on one 8-device mesh axis (no
expert parallelism): start-up and compilation dominate, a run of 6 steps
takes about 8 s in-process.
"""

from __future__ import annotations

import errno
import glob
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from etils import epath

from jmoe.train import checkpoint, cli, loop, step as step_lib, workdir_lock
from test_train import committed_steps, subprocess_env, train_losses, train_records_from

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(ROOT, "configs", "gpt_moe.py")
TINY = {
    "model.d_model": 32, "model.num_layers": 1, "model.num_heads": 2, "model.num_experts": 4,
    "model.top_k": 2, "model.d_ff": 32, "model.group_align": 8,
    "data.seq_len": 32, "batch_size": 8, "total_steps": 6,
    "opt.lr": 1e-2, "opt.warmup_steps": 2, "opt.schedule_steps": 6,
    "eval_every": 1000, "eval_batches": 1, "log_every": 1, "checkpoint_every": 2,
    "keep_checkpoints": 5, "mesh.data": -1, "mesh.expert": 1,
}


def tiny_config(**overrides):
    return cli.load_config(CONFIG_FILE, overrides={**TINY, **overrides})


def train_cmd(workdir, **overrides):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--config", CONFIG_FILE,
            "--workdir", workdir] + [f"--config.{k}={v}" for k, v in {**TINY, **overrides}.items()]


def restore_state(workdir, step, config=None):
    """(state, data_state) of `step`, unchecked (Orbax's plain restore)."""
    config = config or tiny_config()
    gpt = loop.validate_config(config)
    tx = step_lib.make_optimizer(config.opt, config.total_steps)
    abstract = jax.eval_shape(step_lib.make_init(gpt, tx, config.seed))
    mgr = checkpoint.manager(workdir, every=1, keep=10, read_only=True)
    try:
        return checkpoint.restore(mgr, abstract, step)[1:]
    finally:
        mgr.close()


@pytest.fixture(scope="module")
def ref_run(tmp_path_factory):
    """6 uninterrupted steps, checkpoints at 2, 4 and 6."""
    workdir = str(tmp_path_factory.mktemp("faults_ref"))
    loop.run(tiny_config(), workdir)
    assert committed_steps(workdir) == [2, 4, 6]
    return workdir


# --------------------------------------------------------------------------
# Damaged checkpoints


def _state_files(step_dir):
    return sorted((f for f in glob.glob(os.path.join(step_dir, "state", "**"), recursive=True)
                   if os.path.isfile(f) and "/d/" in f), key=os.path.getsize)


def truncate_a_file(step_dir):
    f = _state_files(step_dir)[-1]
    os.truncate(f, os.path.getsize(f) // 2)


def overwrite_bytes(step_dir):
    # 64 bytes in the middle of the largest data file: the compressed chunk
    # still decodes (zstd carries no checksum), to wrong numbers.
    f = _state_files(step_dir)[-1]
    with open(f, "r+b") as fh:
        fh.seek(os.path.getsize(f) // 2)
        fh.write(np.random.default_rng(0).bytes(64))


def remove_metadata(step_dir):
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


def half_written(step_dir):
    # A copy or a non-atomic file system cut short: the directory has its
    # final name, but half the data files and the integrity record never came.
    for f in _state_files(step_dir)[::2]:
        os.remove(f)
    shutil.rmtree(os.path.join(step_dir, "integrity"))


def overwrite_config(step_dir):
    # What the issue saw: restore_config died with UnicodeDecodeError.
    with open(os.path.join(step_dir, "config", "metadata"), "wb") as f:
        f.write(b"\xd5" * 100)


@pytest.mark.parametrize("damage,why", [
    (truncate_a_file, "Exception: Encountered error while reading array"),
    # Usually the chunk still decodes, to wrong numbers the checksums catch;
    # when the bytes land on a compression frame's header, the read fails.
    (overwrite_bytes, ("ValueError: checksum mismatch in 1 state array(s)",
                       "Exception: Encountered error while reading array")),
    # Without it Orbax reads another tree structure out of the data files.
    (remove_metadata, "ValueError: pytree structure error"),
    # Which files go depends on their sizes, and the first read to miss one
    # may be an array's metadata (TensorStore's NOT_FOUND) or its data.
    (half_written, ("Exception: Encountered error while reading array",
                    "ValueError: NOT_FOUND: Error opening")),
    (overwrite_config, "UnicodeDecodeError"),
])
def test_damaged_newest_checkpoint_resumes_from_the_previous_one(ref_run, tmp_path, capsys,
                                                                 damage, why):
    workdir = str(tmp_path / "w")
    shutil.copytree(ref_run, workdir)
    ckpts = os.path.join(workdir, "checkpoints")
    damage(os.path.join(ckpts, "6"))
    before = os.path.getsize(os.path.join(workdir, "metrics.jsonl"))
    summary = loop.run(tiny_config(), workdir)
    out = capsys.readouterr().out
    assert summary["step"] == 6
    line = [l for l in out.splitlines() if l.startswith("checkpoint: skipped damaged")]
    whys = why if isinstance(why, tuple) else (why,)
    assert line and any(f"damaged step 6 ({w}" in line[0] for w in whys), out
    assert "resuming from step 4, the newest intact one" in line[0]
    assert f"resumed from {ckpts}/4 " in out, out
    # Trained 5 and 6 again (a resume, not a restart), to the reference's losses.
    assert [r["step"] for r in train_records_from(workdir, before)] == [5, 6]
    ref, got = train_losses(ref_run), train_losses(workdir)
    assert [got[5], got[6]] == [ref[5], ref[6]]
    # The damaged step was set aside, with the reason, and a new 6 was written.
    aside = os.path.join(workdir, checkpoint.DAMAGED_DIR, "6")
    assert any(w in open(os.path.join(aside, "WHY.txt")).read() for w in whys)
    assert committed_steps(workdir) == [2, 4, 6]
    a, _ = restore_state(ref_run, 6)
    b, _ = restore_state(workdir, 6)
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow
def test_every_checkpoint_damaged_stops_with_one_line_unless_told(ref_run, tmp_path, capsys):
    workdir = str(tmp_path / "w")
    shutil.copytree(ref_run, workdir)
    ckpts = os.path.join(workdir, "checkpoints")
    remove_metadata(os.path.join(ckpts, "6"))
    overwrite_config(os.path.join(ckpts, "4"))
    overwrite_bytes(os.path.join(ckpts, "2"))
    # The command line: one line naming the directory, each step and the fix.
    res = subprocess.run(train_cmd(workdir), env=subprocess_env(), capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    err = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(err) == 1 and "Traceback" not in res.stderr, res.stderr
    assert err[0].startswith(f"error: every checkpoint in {ckpts} is damaged: step 6 ("), err
    assert "step 4 (UnicodeDecodeError" in err[0], err[0]
    # The overwritten bytes are caught by the checksums, or by the failed
    # read when they land on a compression frame's header (see above).
    assert ("step 2 (ValueError: checksum" in err[0]
            or "step 2 (Exception: Encountered error while reading array" in err[0]), err[0]
    assert "--config.restart_if_all_damaged=true" in err[0]
    assert committed_steps(workdir) == [2, 4, 6]  # nothing moved or deleted
    assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_NAME))  # released
    # Told to: the damaged steps go aside and training starts from step 0.
    summary = loop.run(tiny_config(restart_if_all_damaged=True), workdir)
    out = capsys.readouterr().out
    assert summary["step"] == 6 and "every step was damaged" in out and "resumed" not in out
    assert sorted(os.listdir(os.path.join(workdir, checkpoint.DAMAGED_DIR))) == ["2", "4", "6"]
    assert committed_steps(workdir) == [2, 4, 6]
    ref, got = train_losses(ref_run), train_losses(workdir)
    assert [got[s] for s in range(1, 7)] == [ref[s] for s in range(1, 7)]


def test_saved_config_is_read_from_the_newest_step_whose_config_reads(ref_run, tmp_path):
    # What `python -m jmoe.sample` reads first; it used to die with the
    # UnicodeDecodeError of the damaged newest step.
    workdir = str(tmp_path / "w")
    shutil.copytree(ref_run, workdir)
    overwrite_config(os.path.join(workdir, "checkpoints", "6"))
    step, config = checkpoint.restore_config(workdir)
    assert step == 4 and config.model.d_model == 32
    with pytest.raises(UnicodeDecodeError):  # asked for by number: no walking back
        checkpoint.restore_config(workdir, 6)


# ConfigDict already refuses a string for a bool field; None it lets through.
@pytest.mark.parametrize("field,value,fix", [
    ("on_save_error", "later", "choose one of ('stop', 'skip')"),
    ("allow_data_change", None, "must be a bool: --config.allow_data_change=true or false."),
    ("restart_if_all_damaged", None, "must be a bool"),
    ("takeover_lock", None, "must be a bool"),
])
def test_fault_fields_are_checked_before_anything_runs(field, value, fix):
    config = tiny_config()
    with config.unlocked():
        config[field] = value
    with pytest.raises(ValueError, match=re.escape(f"config.{field}={value!r} is invalid: {fix}")):
        loop.validate_config(config)


def test_state_checksum_is_the_same_on_any_mesh_and_sees_one_bit():
    # The integrity record is checked after restoring onto the run's mesh,
    # which may differ from the saving one's: the sums must not depend on it.
    from jax.sharding import NamedSharding, PartitionSpec as P
    rng = np.random.default_rng(0)
    tree = {"w": rng.normal(size=(8, 16)).astype(np.float32),
            "b": rng.normal(size=(16,)).astype(jax.numpy.bfloat16),
            "n": np.array(7, np.int32), "key": jax.random.key(0)}
    mesh = jax.make_mesh((2, 4), ("a", "b"))
    sharded = dict(tree, w=jax.device_put(tree["w"], NamedSharding(mesh, P("b", "a"))))
    want = checkpoint.state_checksum(tree)
    assert checkpoint.state_checksum(sharded) == want
    # The reference: the sums written out in NumPy.
    u = tree["w"].view(np.uint32).astype(np.uint64).ravel()
    pos = np.arange(u.size, dtype=np.uint64)
    assert want["['w']"] == [int(u.sum() % 2**32), int((u * (2 * pos + 1)).sum() % 2**32)]
    flipped = tree["w"].copy()
    flipped.view(np.uint32)[3, 5] ^= 1 << 7
    assert checkpoint.state_checksum(dict(tree, w=flipped))["['w']"] != want["['w']"]
    swapped = tree["w"].copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # same values, moved: only the weighted sum sees it
    got = checkpoint.state_checksum(dict(tree, w=swapped))["['w']"]
    assert got[0] == want["['w']"][0] and got[1] != want["['w']"][1]


# --------------------------------------------------------------------------
# One run per workdir


def _lock_path(workdir):
    return os.path.join(workdir, workdir_lock.LOCK_NAME)


def _wait_for(pred, timeout, proc=None, what=""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process exited before {what}: {proc.communicate()[0][-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"no {what} within {timeout}s")


@pytest.mark.slow
def test_second_launch_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path, capsys):
    workdir = str(tmp_path / "w")
    env = dict(subprocess_env(), SLURM_JOB_ID="4242")
    first = subprocess.Popen(train_cmd(workdir, total_steps=100_000, checkpoint_every=1),
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, cwd=ROOT)
    try:
        _wait_for(lambda: committed_steps(workdir), 300, first, "first checkpoint")
        # The second launch, as a user would start it, exits at once naming the holder.
        t0 = time.time()
        res = subprocess.run(train_cmd(workdir), env=subprocess_env(), capture_output=True,
                             text=True, cwd=ROOT, timeout=300)
        assert res.returncode == 1, res.stdout + res.stderr
        assert (f"workdir {workdir} is in use by another run (host {socket.gethostname()}, "
                f"pid {first.pid}, job 4242") in res.stderr, res.stderr
        assert "--config.takeover_lock=true" in res.stderr
        assert "resumed" not in res.stdout and time.time() - t0 < 60
        assert first.poll() is None  # the holder trains on, undisturbed
    finally:
        first.kill()
        out = first.communicate()[0]
    # SIGKILL left the lock behind; its pid is gone, so the next run takes
    # over, says so, and resumes.
    assert json.load(open(_lock_path(workdir)))["pid"] == first.pid, out[-2000:]
    last = committed_steps(workdir)[-1]
    summary = loop.run(tiny_config(total_steps=last + 1, checkpoint_every=1), workdir)
    said = capsys.readouterr().out
    assert (f"workdir lock: taking over {_lock_path(workdir)} from host {socket.gethostname()}, "
            f"pid {first.pid}, job 4242") in said and "is no longer running" in said, said
    assert f"resumed from {os.path.join(workdir, 'checkpoints')}/{last} " in said
    assert summary["step"] == last + 1
    assert not os.path.exists(_lock_path(workdir))  # released at the end


def _write_lock(workdir, **holder):
    with open(_lock_path(workdir), "w") as f:
        json.dump(holder, f)


def test_lock_from_another_host_is_refused_until_stale_or_taken_over(tmp_path):
    workdir = str(tmp_path)
    said = []
    _write_lock(workdir, host="node-17", pid=1, job_id="99", coordinator="node-17:1234",
                num_processes=2, started="then")
    with pytest.raises(workdir_lock.WorkdirBusy,
                       match="host node-17, pid 1, job 99, coordinator node-17:1234 of 2 "
                             "processes"):
        workdir_lock.acquire(workdir, log=said.append)
    # Not refreshed for longer than the bound: its node is gone.
    old = time.time() - 2 * workdir_lock.STALE_AFTER_S
    os.utime(_lock_path(workdir), (old, old))
    lock = workdir_lock.acquire(workdir, log=said.append)
    assert "taking over" in said[0] and "not refreshed for" in said[0]
    assert json.load(open(_lock_path(workdir)))["pid"] == os.getpid()
    lock.release()
    assert not os.path.exists(_lock_path(workdir))
    # Fresh, but the user says the holder is dead.
    _write_lock(workdir, host="node-17", pid=1, job_id="99")
    lock = workdir_lock.acquire(workdir, takeover=True, log=said.append)
    assert "--config.takeover_lock=true" in said[1]
    lock.release()


def test_a_held_lock_is_refreshed_so_other_hosts_see_it_alive(tmp_path):
    workdir = str(tmp_path)
    lock = workdir_lock.acquire(workdir, refresh_s=0.05)
    try:
        old = time.time() - 2 * workdir_lock.STALE_AFTER_S
        os.utime(_lock_path(workdir), (old, old))  # as if its holder had stopped refreshing
        _wait_for(lambda: os.stat(_lock_path(workdir)).st_mtime > old + 60, 10,
                  what="a refresh of the lock")
    finally:
        lock.release()


def test_lock_of_a_live_process_on_this_host_is_refused_a_recycled_pid_is_not(tmp_path):
    workdir = str(tmp_path)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = workdir_lock._proc_start(sleeper.pid)
        assert start is not None
        _write_lock(workdir, host=socket.gethostname(), pid=sleeper.pid, pid_start=start)
        with pytest.raises(workdir_lock.WorkdirBusy, match=f"pid {sleeper.pid}"):
            workdir_lock.acquire(workdir)
        # The same pid with another start time: a new process got the dead one's pid.
        _write_lock(workdir, host=socket.gethostname(), pid=sleeper.pid, pid_start="1")
        said = []
        workdir_lock.acquire(workdir, log=said.append).release()
        assert "is no longer running" in said[0]
    finally:
        sleeper.kill()
        sleeper.wait()


def _race(workdir, barrier, results):
    barrier.wait()
    try:
        workdir_lock.acquire(workdir, log=lambda _: None, refresh_s=3600)
        results.put(os.getpid())
        time.sleep(2)  # hold it while the others look
    except workdir_lock.WorkdirBusy:
        results.put(None)


@pytest.mark.parametrize("stale", [False, True])
def test_launches_racing_for_a_lock_one_wins(tmp_path, stale):
    workdir = str(tmp_path)
    if stale:  # all of them find a dead run's lock and try to take it over
        _write_lock(workdir, host=socket.gethostname(), pid=2**22 + 7, pid_start="1")
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(workdir, barrier, results)) for _ in range(6)]
    for p in procs:
        p.start()
    won = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert len([w for w in won if w is not None]) == 1, won


def test_taking_over_a_stale_lock_never_removes_a_fresh_one(tmp_path, monkeypatch):
    """The interleaving the racing test rarely hits: between our judging the
    lock stale and moving it aside, another launch took it over and wrote
    its own. What we moved is then not the lock we judged: it goes back."""
    workdir = str(tmp_path)
    _write_lock(workdir, host=socket.gethostname(), pid=2**22 + 7, pid_start="1")
    fresh = {"host": "node-3", "pid": 5, "job_id": "7"}
    judge = workdir_lock._stale_reason

    def judge_then_lose_the_race(*args):
        why = judge(*args)
        if why is not None and json.load(open(_lock_path(workdir)))["pid"] != 5:
            os.remove(_lock_path(workdir))
            _write_lock(workdir, **fresh)  # the other launch, just in time
        return why
    monkeypatch.setattr(workdir_lock, "_stale_reason", judge_then_lose_the_race)
    with pytest.raises(workdir_lock.WorkdirBusy, match="host node-3, pid 5, job 7"):
        workdir_lock.acquire(workdir, log=lambda _: None)
    assert json.load(open(_lock_path(workdir))) == fresh
    assert os.listdir(workdir) == [workdir_lock.LOCK_NAME]  # nothing left aside


# --------------------------------------------------------------------------
# Storage faults in a save


class _Inject:
    """Makes one file-system call fail for paths under step `step`'s temporary
    directory, as a full disk or a read-only directory would."""

    def __init__(self, monkeypatch, where, step, code):
        self.hits = 0
        err = OSError(code, os.strerror(code))
        if where == "write":  # an async save writing its files (the JSON items)
            orig = epath.Path.write_text

            def write_text(path, *a, **k):
                if f"/{step}.orbax-checkpoint-tmp" in os.fspath(path):
                    self.hits += 1
                    raise err
                return orig(path, *a, **k)
            monkeypatch.setattr(epath.Path, "write_text", write_text)
        else:  # creating the step's temporary directory, before anything is written
            orig = os.mkdir

            def mkdir(path, *a, **k):
                if f"/{step}.orbax-checkpoint-tmp" in os.fspath(path):
                    self.hits += 1
                    raise err
                return orig(path, *a, **k)
            monkeypatch.setattr(os, "mkdir", mkdir)


@pytest.mark.slow
@pytest.mark.parametrize("where,code", [("write", errno.ENOSPC), ("mkdir", errno.EACCES)])
def test_failed_save_stops_and_keeps_the_previous_checkpoint(ref_run, tmp_path, monkeypatch,
                                                             where, code):
    workdir = str(tmp_path / "w")
    fault = _Inject(monkeypatch, where, 4, code)
    t0 = time.time()
    with pytest.raises(loop.ConfigError) as err:
        loop.run(tiny_config(), workdir)
    assert fault.hits and time.time() - t0 < 120
    # Never a hang: no writer thread of the failed save is left waiting (for
    # the directory it never got, up to Orbax's 300 s), holding the exit.
    from orbax.checkpoint._src.futures import future as ocp_future
    waiting = [t for t in threading.enumerate() if isinstance(t, ocp_future._SignalingThread)]
    for t in waiting:
        # threading.Thread.join, not Orbax's override: that one raises
        # CancelledError for a thread that was cancelled, which is fine here.
        threading.Thread.join(t, timeout=10)
    assert not [t for t in waiting if t.is_alive()], waiting
    name = errno.errorcode[code]
    assert (f"saving the checkpoint of step 4 to {workdir}/checkpoints/4 failed ({name}: "
            f"{os.strerror(code)}); stopping (config.on_save_error='stop'): the checkpoint "
            "of step 2 is intact.") in str(err.value), err.value
    monkeypatch.undo()
    assert committed_steps(workdir) == [2]
    # Step 2 passes every check, and the same command resumes from it.
    summary = loop.run(tiny_config(), workdir)
    assert summary["step"] == 6
    ref, got = train_losses(ref_run), train_losses(workdir)
    assert [got[s] for s in range(3, 7)] == [ref[s] for s in range(3, 7)]


@pytest.mark.slow
def test_failed_save_with_skip_trains_on_and_saves_at_the_next_interval(ref_run, tmp_path,
                                                                       monkeypatch, capsys):
    workdir = str(tmp_path / "w")
    fault = _Inject(monkeypatch, "write", 4, errno.ENOSPC)
    summary = loop.run(tiny_config(on_save_error="skip"), workdir)
    out = capsys.readouterr().out
    assert fault.hits and summary["step"] == 6
    assert (f"warning: saving the checkpoint of step 4 to {workdir}/checkpoints/4 failed "
            "(ENOSPC: No space left on device); training on (the checkpoint of step 2 is "
            "intact)") in out, out
    assert committed_steps(workdir) == [2, 6]
    a, _ = restore_state(ref_run, 6)
    b, _ = restore_state(workdir, 6)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    # The run's final save has no next interval: its failure stops the run.
    monkeypatch.undo()
    final = str(tmp_path / "final")
    _Inject(monkeypatch, "write", 6, errno.EIO)
    with pytest.raises(loop.ConfigError, match=r"step 6 .* failed \(EIO: Input/output error\); "
                                               r"stopping \(the run's final save\)"):
        loop.run(tiny_config(on_save_error="skip"), final)
    assert committed_steps(final) == [2, 4]


# --------------------------------------------------------------------------
# Data changed between runs


def _text_file(path, seed):
    words = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "x", "y"]
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        f.write(" ".join(rng.choice(words, 6000)))


@pytest.mark.slow
def test_resume_on_changed_data_is_refused_unless_allowed(tmp_path, capsys):
    corpus = str(tmp_path / "corpus.txt")
    _text_file(corpus, 0)
    workdir = str(tmp_path / "w")
    text = {"data.source": "text", "data.path": corpus}
    loop.run(tiny_config(total_steps=2, **text), workdir)
    # The same data under another name is the same data.
    moved = str(tmp_path / "moved.txt")
    shutil.copy(corpus, moved)
    assert loop.run(tiny_config(total_steps=2, **{**text, "data.path": moved}),
                    workdir)["step"] == 2
    # One byte changed: refused before training, naming what changed and the way out.
    with open(corpus, "r+b") as f:
        f.seek(100)
        c = f.read(1)
        f.seek(100)
        f.write(b"#" if c != b"#" else b"$")
    capsys.readouterr()
    with pytest.raises(loop.ConfigError) as err:
        loop.run(tiny_config(total_steps=4, **text), workdir)
    msg = str(err.value)
    assert re.search(r"the data differ from what the checkpoint of step 2 in \S+ was trained on "
                     r"\(train_crc32 [0-9a-f]{8} -> [0-9a-f]{8}\; now text ", msg), msg
    assert "--config.allow_data_change=true" in msg
    assert committed_steps(workdir) == [2]
    assert not os.path.exists(_lock_path(workdir))  # the refused run let go of the workdir
    # Allowed deliberately: a warning, and it resumes.
    summary = loop.run(tiny_config(total_steps=4, allow_data_change=True, **text), workdir)
    out = capsys.readouterr().out
    assert "warning: the data differ from the checkpoint's (train_crc32" in out, out
    assert summary["step"] == 4 and "resumed from" in out


def test_data_fingerprint_sees_size_and_content_of_each_split():
    from jmoe.train import data
    cfg = tiny_config().data
    tokens = np.arange(10_000, dtype=np.uint16)
    fp = data.fingerprint(data.Corpus(tokens[:9000], tokens[9000:], 256, ""), cfg)
    assert fp["train_tokens"] == 9000 and fp["val_tokens"] == 1000
    import zlib
    assert fp["train_crc32"] == f"{zlib.crc32(tokens[:9000].tobytes()):08x}"
    changed = tokens.copy()
    changed[9500] += 1
    fp2 = data.fingerprint(data.Corpus(changed[:9000], changed[9000:], 256, ""), cfg)
    assert data.fingerprint_change(fp, fp2) == \
        f"val_crc32 {fp['val_crc32']} -> {fp2['val_crc32']}"
    fp3 = data.fingerprint(data.Corpus(tokens[:8000], tokens[8000:], 256, ""), cfg)
    assert "train_tokens 9000 -> 8000" in data.fingerprint_change(fp, fp3)


# --------------------------------------------------------------------------
# Messages


def test_nan_before_the_first_save_says_there_is_no_checkpoint(tmp_path):
    config = tiny_config(**{"opt.lr": 1e30, "opt.warmup_steps": 0, "opt.grad_clip": 0.0,
                            "checkpoint_every": 1000, "total_steps": 20})
    with pytest.raises(loop.NonFiniteLoss) as err:
        loop.run(config, str(tmp_path))
    msg = str(err.value)
    assert "None" not in msg, msg
    assert re.search(r"at step \d+: stopping; there is no checkpoint yet \(the first is due "
                     r"at step 1000\), so a rerun starts from step 0\.", msg), msg
    assert committed_steps(str(tmp_path)) == []


# --------------------------------------------------------------------------
# Kills and hangs


@pytest.mark.slow
def test_sigkill_at_seeded_moments_then_relaunch_ends_as_an_uninterrupted_run(ref_run, tmp_path):
    workdir = str(tmp_path / "w")
    ckpts = os.path.join(workdir, "checkpoints")
    rng = np.random.default_rng(15)
    # A save every step (asynchronous, as by default): a kill most likely
    # lands while one is being written.
    cmd = train_cmd(workdir, checkpoint_every=1)
    kills = in_save = 0
    for launch in range(8):
        if kills == 3:
            break
        proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        # Past compilation (a new training step logged), then a seeded delay.
        done = set(train_losses(workdir)) if os.path.exists(
            os.path.join(workdir, "metrics.jsonl")) else set()
        _wait_for(lambda: proc.poll() is not None or (
            os.path.exists(os.path.join(workdir, "metrics.jsonl"))
            and set(train_losses(workdir)) - done), 300, what="a new step")
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            proc.kill()
            kills += 1
            in_save += any("tmp" in d for d in os.listdir(ckpts))
        proc.communicate()
    print(f"SIGKILLs: {kills}, {in_save} of them during a save")
    assert kills >= 2 and in_save >= 1, (kills, in_save)
    # Relaunch until it finishes, as a user (or a requeue) would.
    res = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    ref, got = train_losses(ref_run), train_losses(workdir)
    assert [got[s] for s in range(1, 7)] == [ref[s] for s in range(1, 7)]
    a, da = restore_state(ref_run, 6)
    b, db = restore_state(workdir, 6)
    assert da == db == {"next_index": 6}
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow
def test_a_stopped_process_ends_the_two_process_job_within_the_heartbeat_bound(tmp_path):
    """SIGSTOP (a hung host: alive, silent) of either process: the other one
    exits non-zero once the heartbeats stop, as for a dead process."""
    from test_multihost import HEARTBEAT_S, Job
    fast = {"execution.ep_buckets": "()"}  # one exchange buffer: less compile
    jobs = [Job(str(tmp_path / f"stop{who}"), 2, total_steps=10_000, **fast) for who in (0, 1)]
    try:
        for job in jobs:
            job.wait_for_checkpoint(after=0)  # both processes compiled and training
        t0 = time.time()
        for who, job in enumerate(jobs):
            job.procs[who].send_signal(signal.SIGSTOP)
        ends = {}
        while len(ends) < 2 and time.time() - t0 < 120:
            for who, job in enumerate(jobs):
                if who not in ends and job.procs[1 - who].poll() is not None:
                    ends[who] = time.time() - t0
            time.sleep(0.1)
        for who, job in enumerate(jobs):
            other = job.procs[1 - who]
            assert who in ends, f"process {1 - who} still running 120 s after process {who} " \
                                f"was stopped:\n{job.output(1 - who)[-3000:]}"
            assert other.returncode != 0
            # The bound: the heartbeat timeout, plus the time to notice.
            assert ends[who] < HEARTBEAT_S + 20, (who, ends[who])
            assert "stopped sending heartbeats" in job.output(1 - who) or \
                "Terminating process because the JAX distributed service" in job.output(1 - who)
    finally:
        for job in jobs:
            job.kill()  # SIGKILL ends a stopped process too
