"""The training loop: `run(config, workdir)`.

Order of work, chosen so every mistake surfaces before anything compiles:

  1. validate the config (ValueError naming the field), build the mesh, load
     the corpus (a missing path is a ValueError too);
  2. abstract state with `jax.eval_shape` -> shardings from the partition
     table -> `jit(init, out_shardings=...)`, or restore the latest checkpoint
     straight into those shardings (any mesh);
  3. loop: dispatch step s+1, then fetch step s's metrics (the host never
     waits on the step it just queued), raise on a non-finite loss with its
     step number, evaluate and save every N steps.

Rerunning the same command resumes from the latest checkpoint in `workdir`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jmoe import model as model_lib, model_config
from jmoe.config import Execution, FieldError
from jmoe.runtime import distributed as dist
from jmoe.sharding import make_mesh
from jmoe.sharding.checks import check_layer_on_mesh
from jmoe.train import checkpoint, data, mesh as mesh_lib, metrics as metrics_lib, step as step_lib
from jmoe.train import hf_model, plans, rebalance, workdir_lock
from jmoe.train import compile_report


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN/Inf; the message names the step."""


class ConfigError(ValueError):
    """A config, data path or workdir that cannot work, found before compiling."""


def _fail(field: str, value: Any, fix: str) -> None:
    raise ValueError(f"config.{field}={value!r} is invalid: {fix}")


def validate_config(config: ml_collections.ConfigDict) -> model_config.GPTConfig:
    """Every check that needs no devices; returns the model config."""
    gpt = model_config.from_config(config.model, config.get("execution"))
    validate_trainer(config)
    if gpt.execution.fsdp_collective_matmul and not config.mesh.get("fsdp", False):
        # Without FSDP the weights are replicated: there is nothing to gather.
        _fail("execution.fsdp_collective_matmul", True,
              "it gathers FSDP-sharded weights: set --config.mesh.fsdp=true, or "
              "--config.execution.fsdp_collective_matmul=false.")
    return gpt


def validate_trainer(config: ml_collections.ConfigDict) -> None:
    """The checks of the trainer's own fields (any model family)."""
    for f in ("batch_size", "grad_accum_steps", "total_steps", "eval_every", "eval_batches",
              "log_every", "checkpoint_every", "keep_checkpoints"):
        v = config[f]
        if not isinstance(v, int) or v <= 0:
            _fail(f, v, "must be a positive integer.")
    if config.batch_size % config.grad_accum_steps:
        _fail("grad_accum_steps", config.grad_accum_steps,
              f"must divide batch_size={config.batch_size}.")
    if config.data.seq_len <= 0:
        _fail("data.seq_len", config.data.seq_len, "must be a positive integer.")
    if config.data.source not in data.SOURCES:
        _fail("data.source", config.data.source, f"choose one of {data.SOURCES}.")
    if not 0 < config.data.val_percent < 50:
        _fail("data.val_percent", config.data.val_percent, "must be in (0, 50).")
    if config.data.source in ("text", "tokens") and not os.path.exists(config.data.path):
        _fail("data.path", config.data.path,
              f"does not exist (needed by data.source={config.data.source!r}).")
    o = config.opt
    if not o.lr > 0:
        _fail("opt.lr", o.lr, "must be > 0.")
    if o.warmup_steps < 0:
        _fail("opt.warmup_steps", o.warmup_steps, "must be >= 0.")
    if not 0 <= o.min_lr_ratio <= 1:
        _fail("opt.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1].")
    if o.grad_clip < 0:
        _fail("opt.grad_clip", o.grad_clip, "must be >= 0 (0 disables clipping).")
    if o.weight_decay < 0:
        _fail("opt.weight_decay", o.weight_decay, "must be >= 0.")
    for f in ("load_balance_weight", "z_loss_weight"):
        if config.loss[f] < 0:
            _fail(f"loss.{f}", config.loss[f], "must be >= 0.")
    fsdp = config.mesh.get("fsdp", False)
    if not isinstance(fsdp, bool):
        _fail("mesh.fsdp", fsdp, "must be a bool: --config.mesh.fsdp=true or false.")
    if config.on_save_error not in checkpoint.SAVE_ERROR_POLICIES:
        _fail("on_save_error", config.on_save_error,
              f"choose one of {checkpoint.SAVE_ERROR_POLICIES}: 'stop' ends the run when a "
              "checkpoint cannot be written, 'skip' warns and retries at the next interval.")
    for f in ("allow_data_change", "restart_if_all_damaged", "takeover_lock"):
        if not isinstance(config[f], bool):
            _fail(f, config[f], f"must be a bool: --config.{f}=true or false.")


def validate_mesh(config, gpt: model_config.GPTConfig, mesh) -> None:
    shards = mesh.shape["data"] * mesh.shape["expert"]  # the batch's row shards
    micro = config.batch_size // config.grad_accum_steps
    if micro % shards:
        _fail("batch_size", config.batch_size,
              f"each micro-batch ({micro} rows) must split evenly over the "
              f"{shards} data x expert shards: use a multiple of "
              f"{shards * config.grad_accum_steps}.")
    if gpt is not None and gpt.moe is not None and not gpt.dense:
        try:
            check_layer_on_mesh(gpt.moe, mesh)
        except FieldError as e:
            raise e.under("config.execution" if e.owner == "Execution" else "config.model")


def _canonical(v):
    # The checkpoint stores the config as JSON: tuples come back as lists.
    return [_canonical(x) for x in v] if isinstance(v, (list, tuple)) else v


def _check_same_model(saved: dict, config) -> None:
    """`config.model` (what the model computes) must match the checkpoint's;
    `config.execution` and the mesh may change between runs of one workdir."""
    now = config.model.to_dict()
    # Checkpoints written before `config.execution` existed kept its fields
    # under `config.model`; they never described the model.
    moved = {f.name for t in (model_config.ModelExecution, Execution) for f in dataclasses.fields(t)}
    saved = {k: v for k, v in saved.items() if k not in moved or k in now}
    for k in sorted(set(saved) | set(now)):
        if _canonical(saved.get(k)) != _canonical(now.get(k)):
            raise ValueError(
                f"config.model.{k}={now.get(k)!r} differs from the checkpoint in this workdir "
                f"({saved.get(k)!r}): use a new --workdir, or the checkpoint's value.")


def _resume(mgr, abstract: Any, config, fingerprint: dict, say,
            hf: Optional[hf_model.HFModel] = None) -> Optional[checkpoint.Restored]:
    """The newest intact checkpoint (None: none yet), damaged newer ones set
    aside with a message; ConfigError when the config or the data do not fit
    it, or when every checkpoint is damaged (unless told to start over)."""
    def fits(step: int, saved, record: Optional[dict]) -> None:
        try:
            if hf is not None:
                hf.check_same_model(saved)
            elif "model" not in saved:
                raise ValueError(
                    f"the checkpoint in {mgr.directory} is of an HF fine-tuning run "
                    "(configs/hf_finetune.py, config.hf): use its config, or a new --workdir.")
            else:
                _check_same_model(saved.model.to_dict(), config)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        change = data.fingerprint_change(record["data"], fingerprint) if record else ""
        if change and not config.allow_data_change:
            raise ConfigError(
                f"the data differ from what the checkpoint of step {step} in {mgr.directory} "
                f"was trained on ({change}; now {config.data.source} "
                f"{config.data.path or ''}): point config.data at that data, use a new "
                "--workdir, or rerun with --config.allow_data_change=true to go on "
                "deliberately with these data.")
        if change:
            say(f"warning: the data differ from the checkpoint's ({change}); resuming on "
                "them (config.allow_data_change).")

    try:
        restored = checkpoint.restore_intact(mgr, abstract, check=fits)
    except checkpoint.NoIntactCheckpoint as e:
        why = checkpoint.describe_skipped(e.args[0])
        if not config.restart_if_all_damaged:
            raise ConfigError(
                f"every checkpoint in {mgr.directory} is damaged: {why}. Nothing to resume "
                "from: restore them from a copy, or rerun with "
                "--config.restart_if_all_damaged=true to move them to "
                f"{checkpoint.DAMAGED_DIR}/ and train from step 0.") from None
        aside = checkpoint.set_aside(mgr, e.args[0])
        say(f"checkpoint: every step was damaged: {why}; moved to {aside}; training from "
            "step 0 (config.restart_if_all_damaged).")
        return None
    if restored is not None and restored.skipped:
        aside = checkpoint.set_aside(mgr, restored.skipped)
        say(f"checkpoint: skipped damaged {checkpoint.describe_skipped(restored.skipped)}; "
            f"moved to {aside}; resuming from step {restored.step}, the newest intact one.")
    if restored is not None and restored.integrity is None:
        say(f"checkpoint: step {restored.step} has no integrity record (written by an older "
            "jmoe): restored without checking its contents or its data.")
    return restored


class _Preempted:
    """SIGTERM (SLURM preemption, `kill`) -> save at the next step and exit.

    With several processes all must stop at the same step (collectives of a
    step only some of them run would deadlock): JAX's preemption service then
    owns SIGTERM and picks the step (`jmoe.runtime.distributed.stop_everywhere`).
    """

    def __init__(self, start_step: int = 0):
        self.flag = False
        self.prev = None
        self.multi = jax.process_count() > 1
        if self.multi:
            # Tell the service where we start: a SIGTERM during the first
            # compile then stops at start_step + 1, not at a step long past.
            dist.stop_everywhere(start_step)
            return
        try:
            self.prev = signal.signal(signal.SIGTERM, self._set)
        except ValueError:  # not the main thread (e.g. a test runner thread)
            self.prev = None

    def _set(self, *_):
        self.flag = True

    def stop(self, step: int, out_of_time: bool) -> bool:
        """Stop after `step`? The same answer on every process."""
        if self.multi:
            return dist.stop_everywhere(step, request=out_of_time)
        return self.flag or out_of_time

    def restore(self):
        if self.prev is not None:
            signal.signal(signal.SIGTERM, self.prev)


def _hold_workdir(workdir: str, config, say) -> Optional[workdir_lock.Lock]:
    """Process 0 takes the workdir's lock; every process learns whether it did,
    the others check they see it. ConfigError (on every process) if another
    run holds it."""
    multi = jax.process_count() > 1
    coordinator = dist.coordinator_address()
    lock, refused = None, ""
    if jax.process_index() == 0:
        try:
            lock = workdir_lock.acquire(workdir, takeover=config.takeover_lock,
                                        coordinator=coordinator,
                                        num_processes=jax.process_count(), log=say)
        except workdir_lock.WorkdirBusy as e:
            refused = str(e)
    if multi:
        # One answer on every process: a process that stops alone would leave
        # the others waiting for it in the first collective.
        if not multihost_utils.broadcast_one_to_all(np.int32(not refused)):
            refused = refused or ("another run holds the workdir (process 0 could not take "
                                  "its lock; see process 0's log).")
        else:
            if jax.process_index() != 0:
                try:
                    workdir_lock.check_held(workdir, coordinator)
                except workdir_lock.WorkdirBusy as e:
                    refused = str(e)
            seen = multihost_utils.process_allgather(np.int32(not refused))
            if not np.all(seen) and not refused:
                refused = (f"process(es) {list(np.flatnonzero(seen == 0))} do not see the "
                           "workdir lock process 0 took: see their logs.")
    if refused:
        if lock is not None:
            lock.release()
        raise ConfigError(refused)
    return lock


def maybe_initialize_distributed(**options) -> None:
    """Joins a multi-process job when the environment or `options` describe one.

    SLURM (`srun`, several tasks), explicit coordinator/num_processes/process_id
    and `JAX_COORDINATOR_ADDRESS` launches: see `jmoe.runtime.distributed`.
    """
    dist.initialize(**options)


def run(config: ml_collections.ConfigDict, workdir: str, *,
        distributed: bool | dict = False) -> dict:
    """Trains (or resumes) the model of `config` in `workdir`; returns a summary.

    `distributed=True` (or a dict of `jmoe.runtime.distributed.initialize`
    options) first joins a multi-process job if the environment or the options
    describe one (SLURM, explicit flags, JAX_COORDINATOR_ADDRESS); train.py
    passes it. Every process runs this same function.
    """
    t_start = time.time()
    # The model seam: the GPT-MoE (jmoe.model), or an imported HF checkpoint
    # (config.hf; jmoe.train.hf_model) trained by the same loop and step.
    hf = None
    try:
        # before any device work: errors come first
        if hf_model.is_hf(config):
            validate_trainer(config)
            gpt, hf = None, hf_model.validate_config(config)
        else:
            gpt = validate_config(config)
        if distributed:
            maybe_initialize_distributed(**(distributed if isinstance(distributed, dict) else {}))
        mesh = make_mesh(config.mesh, owner="config.mesh")
        validate_mesh(config, gpt, mesh)
        placement_cfg = rebalance.placement_config(config.get("placement"))
        adaptive_cfg = plans.adaptive_config(config.get("adaptive"))
        if hf is not None:
            hf_model.validate_mesh(config, hf, mesh)
            corpus = hf_model.load_corpus(config.data, hf)
        else:
            rebalance.check_model(placement_cfg, gpt, mesh.shape["expert"])
            corpus = data.load_corpus(config.data, gpt.vocab_size)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)

    def say(msg: str) -> None:
        if is_main:
            print(msg, flush=True)

    lock = _hold_workdir(workdir, config, say)  # before anything touches the checkpoints

    scfg = hf.step_config(config) if hf else step_lib.step_config(config)
    tx = step_lib.make_optimizer(config.opt, config.total_steps)
    schedule = step_lib.make_schedule(config.opt, config.total_steps)
    if hf is not None:
        init, abstract = None, hf.abstract_state(tx)
    else:
        init = step_lib.make_init(gpt, tx, config.seed)
        abstract = jax.eval_shape(init)
    fsdp = config.mesh.get("fsdp", False)
    shardings = mesh_lib.state_shardings(mesh, abstract, fsdp=fsdp)
    batch_sharding = mesh_lib.batch_sharding(mesh)
    graphdef = hf if hf else step_lib.graphdef_of(gpt, slot_weights=placement_cfg.enabled)
    saved_config = hf.describe(config) if hf else config  # what each checkpoint stores
    placer = None
    if placement_cfg.enabled:
        # Experts (and their Adam moments) live in slot order while training.
        placer = rebalance.OnlinePlacement(
            placement_cfg, gpt, mesh, abstract, fsdp=fsdp, logical_shardings=shardings,
            tokens_per_device=config.batch_size // config.grad_accum_steps * config.data.seq_len
            // (mesh.shape["data"] * mesh.shape["expert"]))

    mgr = checkpoint.manager(workdir, every=config.checkpoint_every,
                             keep=config.keep_checkpoints,
                             async_save=config.async_checkpointing)
    # A failed save is the user's to fix (space, permissions): one line, no traceback.
    saver = checkpoint.Saver(mgr, config.on_save_error, warn=say, error=ConfigError)
    fingerprint = data.fingerprint(corpus, config.data)
    seq_len, batch = config.data.seq_len, config.batch_size
    rows = data.local_rows(batch_sharding, batch, seq_len)
    train_it = data.train_iterator(corpus.train, seq_len=seq_len, global_batch=batch,
                                   seed=config.seed, local_rows=rows)
    eval_set = [data.to_global(b, batch_sharding, batch) for b in data.eval_batches(
        corpus.val, seq_len=seq_len, global_batch=batch, num_batches=config.eval_batches,
        local_rows=rows)]

    counts = hf.param_counts() if hf else model_config.param_count_formula(gpt)
    tokens_per_step = batch * seq_len
    flops_per_step = (hf.flops_per_token(seq_len) if hf else
                      model_config.flops_per_token(gpt, seq_len)) * tokens_per_step
    peak = metrics_lib.measure_peak_flops(hf.cfg.dtype if hf else gpt.dtype)
    moe_layers = hf.moe_layers if hf else list(gpt.moe_layers)
    model_name = f"{hf.cfg.model_type} from {hf.path}: " if hf else ""

    def make_reporter(start: int) -> metrics_lib.Reporter:
        rep = metrics_lib.Reporter(
            workdir, total_steps=config.total_steps, start_step=start,
            tokens_per_step=tokens_per_step, flops_per_step=flops_per_step,
            peak_flops=peak, enabled=is_main)
        rep.log(f"data: {corpus.description}: {len(corpus.train):,} train / "
                f"{len(corpus.val):,} val tokens")
        rep.log(f"model: {model_name}{counts['total'] / 1e6:.2f}M parameters, "
                f"{counts['active'] / 1e6:.2f}M active; MoE layers {moe_layers}; "
                f"mesh {dict(mesh.shape)}{' with FSDP' if fsdp else ''}; {len(jax.devices())} "
                f"{jax.devices()[0].platform} device(s) in {jax.process_count()} process(es); "
                f"{flops_per_step / 1e9:.1f} GFLOP/step, "
                f"measured peak {peak / 1e9:.0f} GFLOP/s")
        if start:
            rep.log(f"resumed from {mgr.directory}/{start} (data position "
                    f"{train_it.get_state()})")
        return rep

    with jax.set_mesh(mesh):
        try:
            restored = _resume(mgr, abstract_with(abstract, shardings), config, fingerprint, say,
                               hf)
        except ConfigError:
            if lock is not None:
                lock.release()  # the user's to fix; the next launch finds the workdir free
            raise
        saved_placement = None
        if restored is not None:
            start, state = restored.step, restored.state
            data_state = dict(restored.data_state)
            saved_placement = data_state.pop("placement", None)
            train_it.set_state(data_state)
        elif hf is not None:  # only a run with no checkpoint reads the HF tensors
            start = 0
            state = hf.import_state(tx, shardings)
            say(f"imported {hf.cfg.model_type} weights from {hf.path}")
        else:
            start = 0
            state = model_lib.compile_init(jax.jit(init, out_shardings=shardings))()
        if placer is not None:
            state, placed = placer.enter(state, saved_placement)
            say(f"placement: experts in slot order, {placer.rb.slots} slots per device "
                f"({placement_cfg.spare_slots} spare), re-placed every {placement_cfg.every} "
                f"steps (policy {placement_cfg.policy}); {placed}")
        def make_steps(graph):
            return step_lib.jit_steps(
                placer.shardings if placer else shardings, batch_sharding, graph, tx, schedule,
                scfg, placement_sharding=placer.replicated if placer else None,
                block_to_moe=placer.block_to_moe if placer else None)

        train_fn, eval_fn = make_steps(graphdef)
        # The placement is data: a new one reuses the compiled steps.
        place_args = lambda: (placer.arrays(),) if placer else ()
        adaptive = None
        if adaptive_cfg.enabled:
            # Plans that share the parameter layout; each compiles once, at
            # its first step, and the switch runs the fastest (jmoe.adaptive).
            variants = plans.shortlist(adaptive_cfg, gpt, config, mesh, placement_cfg.hardware)
            adaptive = plans.AdaptiveSteps(adaptive_cfg, {
                name: (train_fn, eval_fn) if g == gpt else make_steps(
                    step_lib.graphdef_of(g, slot_weights=placement_cfg.enabled))
                for name, g in variants.items()},
                on_choice=lambda c: rep.event(step, "adaptive", {
                    "medians_s": c.medians, "chosen": c.chosen,
                    "plans": adaptive.names}, c.message()))
            say(f"adaptive: switching among {len(variants)} plan(s) {list(variants)} "
                f"(timing {adaptive_cfg.trials} steps each)")
        train_call = adaptive.train if adaptive else train_fn
        eval_call = adaptive.evaluate if adaptive else eval_fn
        # Compiled here, before the first step, to print its compile time and
        # XLA's memory analysis (docs/scale.md); the first call reuses it.
        example_BT1 = jax.ShapeDtypeStruct((batch, seq_len + 1), np.int32,
                                           sharding=batch_sharding)
        say(compile_report.compile_step(train_fn, state, example_BT1, *place_args())[1].line())

        def evaluate(s: int) -> float:
            t0 = time.perf_counter()
            loss = float(np.mean([float(eval_call(state, b, *place_args())) for b in eval_set]))
            rep.eval(s, loss, time.perf_counter() - t0)
            return loss

        rep = make_reporter(start)
        stopped = "total_steps"  # or what stopped the run early
        preempt = _Preempted(start)
        pending: Optional[tuple[int, Any]] = None
        val_loss = float("nan")
        step = start
        train_t0 = time.time()
        first = True

        def drain() -> None:
            """Fetches the pending step's metrics; raises on a non-finite loss."""
            nonlocal pending, first
            if pending is None:
                return
            s, m = pending
            pending = None
            m = jax.device_get(m)
            if placer is not None:
                m = placer.observe(m)
            if adaptive is not None:
                m = adaptive.observe(m)
            for key in ("loss", "grad_norm"):  # a NaN gradient poisons the next state
                if not math.isfinite(float(m[key])):
                    kept = mgr.latest_step()
                    raise NonFiniteLoss(
                        f"{key} is {float(m[key])} at step {s}: stopping; " + (
                            f"the last good checkpoint (step {kept}) in {mgr.directory} is "
                            "untouched." if kept is not None else
                            f"there is no checkpoint yet (the first is due at step "
                            f"{config.checkpoint_every}), so a rerun starts from step 0."))
            rep.add(s, m)
            if first:  # the first step includes compilation: keep it out of tok/s
                first = False
                rep.flush(s, timed=False)
                rep.reset_clock(s)
            elif s % config.log_every == 0:
                rep.flush(s)

        try:
            if step >= config.total_steps:  # rerun of a finished run: report, don't train
                val_loss = evaluate(step)
            while step < config.total_steps:
                batch_BT1 = data.to_global(next(train_it), batch_sharding, batch)
                state, m = train_call(state, batch_BT1, *place_args())
                drain()  # the previous step's metrics, while this one runs
                step += 1
                pending = (step, m)
                out_of_time = config.max_time_s > 0 and time.time() - train_t0 > config.max_time_s
                last = step == config.total_steps or preempt.stop(step, out_of_time)
                if last and step < config.total_steps:
                    stopped = ("the time limit (config.max_time_s)" if out_of_time
                               else "SIGTERM (preemption)")
                replace_now = placer is not None and step % placement_cfg.every == 0 and not last
                if (step % config.checkpoint_every == 0 or step % config.eval_every == 0 or last
                        or replace_now):
                    drain()  # never save, evaluate or re-place on a step not checked
                if step % config.eval_every == 0 or last:
                    val_loss = evaluate(step)  # its time is left out of tok/s
                if replace_now:
                    state, decision = placer.maybe_move(state, step)
                    if decision is not None:
                        rep.placement(step, decision, placement_cfg.every)
                if step % config.checkpoint_every == 0 or last:
                    # Checkpoints hold experts in logical order (any mesh or
                    # placement resumes them) plus the placement in use.
                    saved = placer.for_checkpoint(state) if placer else state
                    data_state = train_it.get_state()
                    if placer is not None:
                        data_state = dict(data_state, placement=placer.state_dict())
                    saver.save(step, saved, data_state, saved_config,
                               checkpoint.integrity_record(step, saved, fingerprint), final=last)
                if hf is not None and (last or (config.hf.export_every
                                                and step % config.hf.export_every == 0)):
                    out = hf.export(hf_model.export_dir(config, workdir), state)
                    say(f"exported step {step}'s weights as an HF checkpoint to {out}")
                if last:
                    break
            drain()
        except BaseException:
            rep.close()
            raise
        finally:
            try:
                saver.finish()  # a save in flight completes even when we stop
            finally:
                mgr.close()
                preempt.restore()
                if lock is not None:
                    lock.release()
            rep.flush(step)

    wall = time.time() - t_start
    train_loss = float(rep.last.get("loss", float("nan")))
    summary = {"step": step, "train_loss": train_loss, "val_loss": val_loss,
               "wall_time_s": wall, "train_time_s": time.time() - train_t0,
               "tokens_per_s": float(rep.last.get("tokens_per_s", float("nan"))),
               "mfu": float(rep.last.get("mfu", float("nan"))),
               "params_total": counts["total"], "params_active": counts["active"],
               "stopped_by": stopped}
    if is_main and step == start:
        # A rerun of a finished run: keep the training run's summary.json.
        rep.log(f"already done: step {step} of total_steps={config.total_steps}; val loss "
                f"{val_loss:.4f} nats/token (re-evaluated). Raise --config.total_steps to "
                "train on, or use a new --workdir.")
    elif is_main:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        if stopped != "total_steps":
            rep.log(f"stopped early at step {step} of {config.total_steps} by {stopped}, with a "
                    "checkpoint: rerun the same command to resume.")
        rep.log(f"done: step {step}  train loss {train_loss:.4f}  val loss {val_loss:.4f} "
                f"nats/token  wall time {wall:.0f}s  ({summary['tokens_per_s']:,.0f} tok/s)")
    rep.close()
    return summary


def abstract_with(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (restore destination)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
