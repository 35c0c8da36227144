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
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import ml_collections
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "config")


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


def save(mgr: ocp.CheckpointManager, step: int, state: Any, data_state: dict,
         config: ml_collections.ConfigDict, force: bool = False) -> bool:
    """Starts a (possibly async) save; True when one was started."""
    return mgr.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(json.loads(config.to_json()))))


def restore(mgr: ocp.CheckpointManager, abstract_state: Any,
            step: Optional[int] = None) -> tuple[int, Any, dict]:
    """(step, state, data_state) of `step` (default: the latest)."""
    step = mgr.latest_step() if step is None else step
    out = mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return step, out.state, out.data


def restore_config(workdir: str, step: Optional[int] = None) -> tuple[int, ml_collections.ConfigDict]:
    """The config saved with a checkpoint (default: the latest)."""
    mgr = manager(workdir, every=1, keep=1, read_only=True)
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}")
    out = mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    mgr.close()
    return step, ml_collections.ConfigDict(out.config)
