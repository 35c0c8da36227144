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

Taking over removes the old file only while it is still the one judged
stale, under a short-lived takeover mutex (`_remove_if_same`); then every
launch races for a new lock with O_EXCL, so two launches that both find a
stale lock cannot both win.
"""

from __future__ import annotations

import atexit
import contextlib
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
# A takeover mutex lives for milliseconds; one this old was left by a launch
# that died while taking over.
TAKEOVER_STALE_S = 30.0
TRIES = 20  # looks at the lock before giving up on a workdir others keep taking

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


def _remove_if_same(path: str, old: Optional[dict], workdir: str) -> bool:
    """Removes the lock file if it still holds `old` (the holder judged gone);
    True if this call removed it.

    Under a takeover mutex (`jmoe.lock.takeover`, O_EXCL): while the stale
    lock exists no launch can create a new one, and only the mutex holder
    may remove it, so between reading it and removing it nothing can take
    its place; one launch removes it, and all then race for a new one with
    O_EXCL, which exactly one wins. (Moving the file aside to compare it
    left a moment with no lock file, in which a third launch could create
    one and a second winner put it back over.) A mutex left by a launch
    that died inside this function is cleared after TAKEOVER_STALE_S."""
    mutex = path + ".takeover"
    if not _create(mutex, {"host": socket.gethostname(), "pid": os.getpid()}):
        try:
            age = _fs_now(workdir) - os.stat(mutex).st_mtime
        except FileNotFoundError:
            return False
        if age > TAKEOVER_STALE_S:
            with contextlib.suppress(FileNotFoundError):  # another launch cleared it
                os.remove(mutex)
        return False
    try:
        try:
            current = _read(path)
        except FileNotFoundError:
            return False  # removed by its holder meanwhile
        except (OSError, ValueError):
            current = None
        if current != old:
            return False  # not the lock judged stale: a new holder's
        os.remove(path)
        return True
    finally:
        os.remove(mutex)


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
    for _ in range(TRIES):  # a lost race with another launch: look again
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
        # Take over: remove the stale file, but only while it is still the
        # one judged stale, and then race for a fresh one like any launch.
        if _remove_if_same(path, old, workdir):
            log(f"workdir lock: taking over {path} from "
                f"{describe(old) if old else 'an unreadable lock'} ({why}).")
        else:
            time.sleep(0.05)  # another launch is taking it over: let it finish
    raise WorkdirBusy(f"workdir {workdir}: could not take the lock {path} after {TRIES} tries "
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
