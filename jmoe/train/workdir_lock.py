"""One run per workdir: a lock file that a live run holds.

`workdir/jmoe.lock` is created with O_CREAT | O_EXCL, which is atomic on
local file systems and on NFS v3 and later, and holds JSON naming its
holder: host, pid (and the process's start time, so a recycled pid is not
taken for the holder), job id (SLURM_JOB_ID), the multi-process job's
coordinator address and process count, and when it started. A holder
refreshes the file's modification time every `REFRESH_S` seconds.

Only process 0 of a multi-process job takes the lock; the others check,
after it did, that they see it (their workdir is the same shared one).

A second launch finds the file and decides:

  * held by a live process (same host, the pid runs with the same start
    time; or another host, refreshed within `STALE_AFTER_S`): refuse,
    naming the holder and how to take over (`--config.takeover_lock=true`
    once the holder is known to be dead, or delete the file);
  * left by a dead run (same host, the pid gone or recycled; or another
    host and not refreshed for `STALE_AFTER_S`): take it over, and say so.

Taking over renames the old file to a private name and checks that it is
still the one judged stale, so two launches that both find a stale lock
cannot both win.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
from typing import Optional

LOCK_NAME = "jmoe.lock"
# The holder touches the lock this often; a lock from another host that has
# not been touched for STALE_AFTER_S belongs to a run that is gone (a dead
# node cannot refresh it). Timed on the file system's own clock (a probe
# file's mtime), so clock skew between hosts does not count.
REFRESH_S = 30.0
STALE_AFTER_S = 300.0

_held: dict[str, "Lock"] = {}  # path -> lock held by this process (released at exit)


class WorkdirBusy(ValueError):
    """Another live run holds the workdir; the message names it and the way out."""


def _proc_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux), else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    now = _proc_start(pid)
    return start is None or now is None or now == start


def _fs_now(directory: str) -> float:
    """The file system's current time (mtime of a new file), not this host's clock."""
    probe = os.path.join(directory, f".{LOCK_NAME}.probe.{socket.gethostname()}.{os.getpid()}")
    with open(probe, "w"):
        pass
    try:
        return os.stat(probe).st_mtime
    finally:
        os.remove(probe)


def describe(holder: dict) -> str:
    job = holder.get("job_id") or "none"
    multi = (f", coordinator {holder['coordinator']} of {holder.get('num_processes')} processes"
             if holder.get("coordinator") else "")
    return (f"host {holder.get('host')}, pid {holder.get('pid')}, job {job}{multi}, "
            f"since {holder.get('started')}")


class Lock:
    """A held workdir lock; `release()` removes it (only if it is still ours)."""

    def __init__(self, path: str, holder: dict, refresh_s: float):
        self.path, self.holder = path, holder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, args=(refresh_s,),
                                        name="jmoe-workdir-lock", daemon=True)
        self._thread.start()

    def _refresh(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                os.utime(self.path)
            except OSError:  # a transient file-system error: try again next time
                pass

    def release(self) -> None:
        self._stop.set()
        _held.pop(self.path, None)
        try:
            if _read(self.path) == self.holder:
                os.remove(self.path)
        except (OSError, ValueError):
            pass


@atexit.register
def _release_all() -> None:
    """A run that raised before its own release frees the workdir at exit."""
    for lock in list(_held.values()):
        lock.release()


def _read(path: str) -> dict:
    with open(path) as f:
        return json.loads(f.read())


def _create(path: str, holder: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(holder))
        f.flush()
        os.fsync(f.fileno())
    return True


def _stale_reason(path: str, holder: Optional[dict], workdir: str,
                  stale_after_s: float) -> Optional[str]:
    """Why the lock's holder is gone, or None if it may be alive."""
    if holder is None:
        # Unreadable: its writer died between creating and writing it, or
        # the file was damaged. Only its age can tell.
        age = _fs_now(workdir) - os.stat(path).st_mtime
        return f"unreadable and {age:.0f}s old" if age > stale_after_s else None
    if holder.get("host") == socket.gethostname():
        pid = int(holder.get("pid", -1))
        if pid == os.getpid():
            # One run per process at a time (the trainer is not reentrant):
            # an earlier run here stopped by an error before releasing it.
            stale = _held.pop(path, None)
            if stale is not None:
                stale._stop.set()
            return "left by an earlier run in this same process"
        if not _alive(pid, holder.get("pid_start")):
            return f"process {pid} is no longer running"
        return None
    age = _fs_now(workdir) - os.stat(path).st_mtime
    if age > stale_after_s:
        return f"not refreshed for {age:.0f}s (a live holder refreshes it every {REFRESH_S:.0f}s)"
    return None


def acquire(workdir: str, *, takeover: bool = False, coordinator: Optional[str] = None,
            num_processes: int = 1, log=print, refresh_s: float = REFRESH_S,
            stale_after_s: float = STALE_AFTER_S) -> Lock:
    """Takes `workdir`'s lock or raises WorkdirBusy (see the module docstring)."""
    path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
    holder = {"host": socket.gethostname(), "pid": os.getpid(),
              "pid_start": _proc_start(os.getpid()),
              "job_id": os.environ.get("SLURM_JOB_ID"), "coordinator": coordinator,
              "num_processes": num_processes,
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    for _ in range(5):  # a lost race with another launch: look again
        if _create(path, holder):
            lock = Lock(path, holder, refresh_s)
            _held[path] = lock
            return lock
        try:
            old = _read(path)
        except FileNotFoundError:
            continue  # released in between
        except (OSError, ValueError):
            old = None
        why = "--config.takeover_lock=true" if takeover else _stale_reason(
            path, old, workdir, stale_after_s)
        if why is None:
            who = describe(old) if old else "an unreadable lock"
            raise WorkdirBusy(
                f"workdir {workdir} is in use by another run ({who}; lock file {path}). "
                "Two runs on one workdir overwrite each other's checkpoints: use another "
                "--workdir, or, once that run is known to be dead (e.g. its SLURM job is "
                "gone from squeue), rerun with --config.takeover_lock=true or delete the "
                "lock file.")
        # Take over: move the stale file aside, and go on only if what moved
        # is the lock judged stale (not one a concurrent launch just made).
        aside = f"{path}.stale.{socket.gethostname()}.{os.getpid()}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            continue
        try:
            moved = _read(aside)
        except (OSError, ValueError):
            moved = None
        if moved != old:
            try:
                os.link(aside, path)  # put the newer lock back, never over another
            except OSError:
                pass
            os.remove(aside)
            continue
        os.remove(aside)
        log(f"workdir lock: taking over {path} from "
            f"{describe(old) if old else 'an unreadable lock'} ({why}).")
    raise WorkdirBusy(f"workdir {workdir}: could not take the lock {path} after 5 tries "
                      "(other launches keep taking it): start one run per workdir.")


def check_held(workdir: str, coordinator: Optional[str]) -> None:
    """Processes other than 0: the lock process 0 took is visible here and is this job's."""
    path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
    try:
        holder = _read(path)
    except (OSError, ValueError) as e:
        raise WorkdirBusy(
            f"workdir {workdir}: this process does not see the lock process 0 took ({path}: "
            f"{e}). Every process must see the same workdir: put it on a file system "
            "shared by all hosts.") from None
    if holder.get("coordinator") != coordinator:
        raise WorkdirBusy(f"workdir {workdir} is held by another job ({describe(holder)}), "
                          f"not by this one (coordinator {coordinator}).")
