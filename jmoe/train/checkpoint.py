"""Orbax checkpoints of the train state, the data position and the config.

A checkpoint `workdir/checkpoints/<step>/` holds three items:

  state   TrainState (params, optimizer state, step, router biases), saved
          asynchronously; restored onto whatever mesh the abstract state
          carries, so a run saved on (data=1, expert=8) resumes on (2, 4).
  data    the Grain iterator state (JSON, `{"next_index": batches taken}`).
  config  the run's ConfigDict as JSON (read by `jmoe.train.sample`).

Orbax writes each step into a temporary directory and renames it only once
complete, so a process killed mid-save (even by SIGKILL) leaves the previous
checkpoints as they were; the half-written directory is removed on restart.

A fourth item makes each checkpoint verifiable (docs/reliability.md):

  integrity  JSON: the step, a checksum of every state leaf (two 32-bit
             sums of its bits, one position-weighted: exact integer sums,
             so the same on any mesh), and the data fingerprint.

Orbax's own finalisation (the rename) and the readability of each item's
metadata catch a checkpoint cut short or with a file removed; the checksums
catch bytes that changed and still decode (zstd carries no checksum: a few
overwritten bytes restore as wrong numbers without an error). `restore_intact`
walks back from the newest step to the newest one that passes every check.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import threading
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

try:  # private (orbax-checkpoint 0.12): the writer threads of a save, see _wake_orphaned_writers
    from orbax.checkpoint._src.futures import future as _ocp_future
except ImportError:
    _ocp_future = None

ITEMS = ("state", "data", "config", "integrity")
# Damaged steps are moved here (next to `checkpoints/`, outside Orbax's
# directory, so its step list and garbage collection never see them again).
DAMAGED_DIR = "checkpoints.damaged"
SAVE_ERROR_POLICIES = ("stop", "skip")


class _Manager(ocp.CheckpointManager):
    """Saves when the loop asks, never because of its own preemption check.

    In a multi-process run the loop picks the stop step with JAX's preemption
    service and saves there. Orbax's own check calls the same service, also
    from its background finalize thread with an older step, which would feed
    a stale step into the agreement between the processes.
    """

    def reached_preemption(self, step: int) -> bool:
        return False


def manager(workdir: str, *, every: int, keep: int, async_save: bool = True,
            read_only: bool = False) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(
        save_interval_steps=0 if read_only else max(1, every),
        max_to_keep=None if read_only else keep,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only,
        create=not read_only, read_only=read_only)
    return _Manager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                    options=opts, item_names=ITEMS)


def _bits_u32(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 (one per element; 8-byte elements fold their halves)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed keys: their uint32 words
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    bits = x.dtype.itemsize * 8
    u = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{min(bits, 32)}"))
    if bits == 64:  # bitcast to a narrower type adds a trailing dimension of 2
        u = u[..., 0] ^ (u[..., 1] * jnp.uint32(0x9E3779B1))
    return u.astype(jnp.uint32)


@jax.jit
def _leaf_sums(tree: Any) -> Any:
    def sums(x):
        u = _bits_u32(jnp.asarray(x))
        # Row-major position of each element, built from iotas (no reshape:
        # a sharded array stays where it is); odd weights, so that moved or
        # swapped values change the second sum even when the first stays.
        pos = jnp.zeros(u.shape, jnp.uint32)
        for axis in range(u.ndim):
            pos = pos * jnp.uint32(u.shape[axis]) + jax.lax.broadcasted_iota(
                jnp.uint32, u.shape, axis)
        return jnp.stack([u.sum(dtype=jnp.uint32),
                          (u * (pos * jnp.uint32(2) + jnp.uint32(1))).sum(dtype=jnp.uint32)])
    return jax.tree.map(sums, tree)


def state_checksum(state: Any) -> dict[str, list[int]]:
    """{leaf path: [sum of its bits, position-weighted sum]}, both mod 2^32.

    Integer sums are exact and order-free, so a state restored onto another
    mesh (or process count) gives the same numbers. Runs on every process
    (a global reduction); cost: one read of the state.
    """
    sums = jax.device_get(_leaf_sums(state))
    leaves = jax.tree_util.tree_flatten_with_path(sums)[0]
    return {jax.tree_util.keystr(path): [int(v) for v in np.asarray(s)] for path, s in leaves}


def integrity_record(step: int, state: Any, data_fingerprint: dict) -> dict:
    return {"step": int(step), "state_checksum": state_checksum(state),
            "data": data_fingerprint}


def save(mgr: ocp.CheckpointManager, step: int, state: Any, data_state: dict,
         config: ml_collections.ConfigDict, integrity: dict, force: bool = False) -> bool:
    """Starts a (possibly async) save; True when one was started."""
    return mgr.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(json.loads(config.to_json())),
        integrity=ocp.args.JsonSave(integrity)))


class SaveFailed(RuntimeError):
    """A checkpoint could not be written (disk full, permission, I/O error)."""


def describe_error(e: BaseException) -> str:
    """'ENOSPC: No space left on device' for OS errors, else the type and first line."""
    code = getattr(e, "errno", None)
    if isinstance(code, int) and code in errno.errorcode:
        return f"{errno.errorcode[code]}: {os.strerror(code)}"
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {first}"


def _wake_orphaned_writers() -> None:
    """Ends the writer threads a failed save left waiting.

    Orbax's per-item writer threads first wait for a signal ("the step
    directory exists") with a long timeout (300 s). When creating the
    directory failed, the signal never comes: they would keep the process
    from exiting for those minutes after the run stopped. Each is cancelled
    and then sent its signal, so it wakes, sees the cancellation and ends
    without writing. (Private Orbax API, 0.12; without it, only the delay.)
    """
    signaling = getattr(_ocp_future, "_SignalingThread", None)
    if signaling is None:
        return
    for t in [t for t in threading.enumerate() if isinstance(t, signaling) and t.is_alive()]:
        try:
            t.cancel()
            _ocp_future.set_signals(t._receive_signals, operation_id=t._operation_id)
        except AttributeError:  # another Orbax version: only the delay remains
            return


class Saver:
    """Saves through Orbax and decides what a failed save does.

    A save's error surfaces either at once (the synchronous part: the
    temporary directory, the copy to host) or, for an asynchronous save,
    when it is waited for: at the next save or at `finish()`. Either way it
    is pinned on the step it belonged to. A failed save was never committed
    (Orbax renames a step's directory only once every file is written), so
    the previous checkpoint is the newest one and stays restorable.

    `on_error="stop"` raises `error` (SaveFailed) naming the step, the error and the
    checkpoint to resume from; "skip" calls `warn` and lets the run go on
    (the next interval saves again). A failure of the run's final save
    always stops: there is no next interval.
    """

    def __init__(self, mgr: ocp.CheckpointManager, on_error: str = "stop",
                 warn: Callable[[str], None] = print, error: type = SaveFailed):
        self.mgr, self.on_error, self.warn, self.error = mgr, on_error, warn, error
        self.pending: Optional[tuple[int, bool]] = None  # (step, final) of an async save
        self.failed: list[int] = []

    def save(self, step: int, state: Any, data_state: dict,
             config: ml_collections.ConfigDict, integrity: dict, final: bool = False) -> None:
        self._collect()  # the previous save's error belongs to the previous step
        try:
            if save(self.mgr, step, state, data_state, config, integrity, force=final):
                self.pending = (step, final)
        except Exception as e:  # noqa: BLE001 - any failure of the write is the storage's
            self._failed(step, final, e)

    def finish(self) -> None:
        """Waits for a save in flight; its error is handled like any other."""
        self._collect()

    def _collect(self) -> None:
        if self.pending is None:
            return
        (step, final), self.pending = self.pending, None
        try:
            self.mgr.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._failed(step, final, e)

    def _failed(self, step: int, final: bool, e: BaseException) -> None:
        self.failed.append(step)
        # Orbax's asynchronous checkpointer keeps the error and raises it
        # again at the next save: take it out now that it is handled, and
        # forget the uncommitted step.
        try:
            self.mgr.check_for_errors()
        except Exception:  # noqa: BLE001 - the one being handled here
            pass
        _wake_orphaned_writers()
        self.mgr.reload()
        kept = self.mgr.latest_step()
        kept_msg = (f"the checkpoint of step {kept} is intact" if kept is not None
                    else "there is no earlier checkpoint")
        where = os.path.join(os.fspath(self.mgr.directory), str(step))
        if self.on_error == "stop" or final:
            why = ("the run's final save" if final and self.on_error == "skip" else
                   "config.on_save_error='stop'")
            raise self.error(
                f"saving the checkpoint of step {step} to {where} failed ({describe_error(e)}); "
                f"stopping ({why}): {kept_msg}. Free space or fix the file system, then rerun "
                "the same command to resume; --config.on_save_error=skip trains on and "
                "retries at the next interval instead.") from e
        self.warn(f"warning: saving the checkpoint of step {step} to {where} failed "
                  f"({describe_error(e)}); training on ({kept_msg}), the next save is "
                  f"retried at the next interval (config.on_save_error='skip').")


# --------------------------------------------------------------------------
# Restore: the newest intact step


class NoIntactCheckpoint(ValueError):
    """Every checkpoint in the directory failed its checks."""


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    data_state: dict
    config: ml_collections.ConfigDict
    integrity: Optional[dict]  # None: a checkpoint written before integrity records
    skipped: list[tuple[int, str]]  # (step, why) of the newer, damaged steps


def _all_processes_agree(ok: bool) -> bool:
    """True only where every process found its part intact (the same answer everywhere)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _read_records(mgr: ocp.CheckpointManager, step: int):
    """(data_state, config, integrity or None) of `step`; raises on any damage."""
    items = set(os.listdir(os.path.join(os.fspath(mgr.directory), str(step))))
    missing = [i for i in ("state", "data", "config") if i not in items]
    if missing:
        raise ValueError(f"item(s) {', '.join(missing)} missing")
    json_items = ["data", "config"] + (["integrity"] if "integrity" in items else [])
    out = mgr.restore(step, args=ocp.args.Composite(
        **{i: ocp.args.JsonRestore() for i in json_items}))
    record = out.get("integrity") if "integrity" in items else None
    if record is not None and record.get("step") != step:
        raise ValueError(f"its integrity record is of step {record.get('step')}")
    return out.data, ml_collections.ConfigDict(out.config), record


def _read_state(mgr: ocp.CheckpointManager, step: int, abstract_state: Any,
                record: Optional[dict]) -> Any:
    """The state of `step`, checked against its checksums; raises on any damage."""
    state = mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state))).state
    if record is not None:
        got = state_checksum(state)
        want = record["state_checksum"]
        bad = [k for k in want if got.get(k) != want[k]] + [k for k in got if k not in want]
        if bad:
            raise ValueError(f"checksum mismatch in {len(bad)} state array(s), e.g. {bad[0]}")
    return state


def restore_intact(mgr: ocp.CheckpointManager, abstract_state: Any,
                   check: Callable[[int, ml_collections.ConfigDict, Optional[dict]], None]
                   = lambda step, config, record: None) -> Optional[Restored]:
    """The newest step that passes every check, and the newer ones that did not.

    None when there is no checkpoint. Raises NoIntactCheckpoint (its args:
    the list of (step, why)) when every step is damaged. `check(step,
    config, integrity)` runs on a step's readable records before its state
    is read: what it raises (the run's config does not fit the checkpoint)
    is the user's to fix, not damage, and propagates. Runs on every
    process; a step is taken only where every process read its part intact.
    """
    skipped: list[tuple[int, str]] = []
    for step in sorted(mgr.all_steps(), reverse=True):
        try:
            data_state, config, record = _read_records(mgr, step)
        except Exception as e:  # noqa: BLE001 - any failure to read it is damage
            records, why = None, describe_error(e)
        else:
            records, why = (data_state, config, record), ""
        if not _all_processes_agree(records is not None):
            skipped.append((step, why or "damaged on another process"))
            continue
        check(step, config, record)
        try:
            state = _read_state(mgr, step, abstract_state, record)
        except Exception as e:  # noqa: BLE001
            state, why = None, describe_error(e)
        if _all_processes_agree(state is not None):
            return Restored(step, state, data_state, config, record, skipped)
        skipped.append((step, why or "damaged on another process"))
    if skipped:
        raise NoIntactCheckpoint(skipped)
    return None


def describe_skipped(skipped: list[tuple[int, str]]) -> str:
    """'step 6 (why); step 4 (why)'."""
    return "; ".join(f"step {s} ({why})" for s, why in skipped)


def set_aside(mgr: ocp.CheckpointManager, steps: list[tuple[int, str]]) -> str:
    """Moves damaged steps to `checkpoints.damaged/` (process 0; all wait), with a
    WHY.txt each; returns that directory. Orbax then never lists them again: a
    new save of the same step can be written, and garbage collection keeps
    counting intact checkpoints only."""
    root = os.fspath(mgr.directory)
    dest_root = os.path.join(os.path.dirname(root), DAMAGED_DIR)
    if jax.process_index() == 0:
        os.makedirs(dest_root, exist_ok=True)
        for step, why in steps:
            dest, n = os.path.join(dest_root, str(step)), 1
            while os.path.exists(dest):  # damaged again after a rerun: keep both
                dest, n = os.path.join(dest_root, f"{step}.{n}"), n + 1
            shutil.move(os.path.join(root, str(step)), dest)
            with open(os.path.join(dest, "WHY.txt"), "w") as f:
                f.write(why + "\n")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jmoe_checkpoints_set_aside")
    mgr.reload()
    return dest_root


def restore(mgr: ocp.CheckpointManager, abstract_state: Any,
            step: Optional[int] = None) -> tuple[int, Any, dict]:
    """(step, state, data_state) of `step` (default: the latest), unchecked."""
    step = mgr.latest_step() if step is None else step
    out = mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return step, out.state, out.data


def restore_config(workdir: str, step: Optional[int] = None) -> tuple[int, ml_collections.ConfigDict]:
    """The config saved with a checkpoint (default: the newest whose config reads)."""
    mgr = manager(workdir, every=1, keep=1, read_only=True)
    try:
        steps = [step] if step is not None else sorted(mgr.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}")
        errors = []
        for s in steps:
            try:
                out = mgr.restore(s, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
                return s, ml_collections.ConfigDict(out.config)
            except Exception as e:  # noqa: BLE001 - a damaged step: try the one before
                if step is not None:
                    raise
                errors.append((s, describe_error(e)))
        raise NoIntactCheckpoint(errors)
    finally:
        mgr.close()
