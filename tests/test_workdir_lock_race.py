"""The workdir lock's takeover never leaves a moment without a lock file.

A launch that judged a lock stale acts on what it read; by the time it acts
another launch may have taken the workdir over and hold a fresh lock. The
takeover must then leave that lock alone, and at no point may the lock
file be missing or hold anything else: in such a moment a third launch
creates its own lock with O_EXCL and two runs share the workdir (seen once
under load in the 6-launch race of tests/test_faults.py, with the old
move-aside-and-compare takeover)."""

import json
import os
import socket

import pytest

from jmoe.train import workdir_lock


def _path(workdir):
    return os.path.join(workdir, workdir_lock.LOCK_NAME)


def test_a_late_takeover_never_moves_or_removes_the_new_holders_lock(tmp_path, monkeypatch):
    workdir = str(tmp_path)
    stale = {"host": socket.gethostname(), "pid": 2 ** 22 + 7, "pid_start": "1"}
    # Another launch already took the stale lock over: a live run on node-3
    # (refreshed just now) holds the workdir.
    fresh = {"host": "node-3", "pid": 5, "job_id": "7"}
    with open(_path(workdir), "w") as f:
        json.dump(fresh, f)
    # This launch read the stale lock a moment before that takeover and
    # judged it dead: replay that view (its first read), judge the rest as usual.
    reads = iter([stale])
    real_read, real_judge = workdir_lock._read, workdir_lock._stale_reason
    monkeypatch.setattr(workdir_lock, "_read", lambda p: next(reads, None) or real_read(p))
    monkeypatch.setattr(workdir_lock, "_stale_reason", lambda path, holder, *a: (
        "replayed: judged dead" if holder == stale else real_judge(path, holder, *a)))

    def intact(what):
        assert os.path.exists(_path(workdir)), f"no lock file after {what}"
        assert real_read(_path(workdir)) == fresh, f"lock replaced after {what}"
    real_os = workdir_lock.os

    class CheckedOs:
        """os, checking after every rename/remove/link that the holder's lock is there."""

        def __getattr__(self, name):
            fn = getattr(real_os, name)
            if name not in ("rename", "remove", "link", "replace", "unlink"):
                return fn

            def checked(*args, **kw):
                out = fn(*args, **kw)
                intact(f"os.{name}{args}")
                return out
            return checked
    monkeypatch.setattr(workdir_lock, "os", CheckedOs())
    with pytest.raises(workdir_lock.WorkdirBusy, match="host node-3, pid 5, job 7"):
        workdir_lock.acquire(workdir, log=lambda _: None)
    intact("the late launch")
    assert sorted(os.listdir(workdir)) == [workdir_lock.LOCK_NAME]  # no mutex left behind
