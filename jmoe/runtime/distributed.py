"""Joining a multi-process JAX job: from SLURM, from explicit settings, or not at all.

Every process (one per host, or one per GPU) runs the same program;
`initialize()` connects them through JAX's coordination service before any
device is touched, after which `jax.devices()` lists the devices of all
processes and a mesh can span them. Where the settings come from (first match
wins):

  flags   `coordinator_address`, `num_processes`, `process_id` given
          (train.py --coordinator_address=host:port --num_processes=2
          --process_id=0): any launcher, any cluster;
  slurm   an `srun` task of a step with SLURM_NTASKS > 1: process id
          SLURM_PROCID, coordinator the step's first node (SLURM_STEP_NODELIST)
          on port JAX_COORDINATOR_PORT, else, as JAX's own SLURM detection
          picks it, 61440 + SLURM_JOB_ID % 4096;
  env     JAX_COORDINATOR_ADDRESS set: JAX's cluster detection (Open MPI, ...)
          fills in the rest;
  single  none of these: one process, nothing to initialise.

Devices of each process (`local_device_ids`, GPU ids on the node): an explicit
list or "all" wins (also read from JAX_LOCAL_DEVICE_IDS). Under SLURM:

  one task per node                      every GPU the task sees;
  tasks bound to their own GPUs by SLURM every GPU the task sees
    (--gpus-per-task, --gpu-bind: CUDA_VISIBLE_DEVICES lists fewer GPUs than
    SLURM_GPUS_ON_NODE, or fewer than the tasks on the node);
  several tasks sharing the node's GPUs  an equal slice each, by SLURM_LOCALID
    (8 tasks on 8 GPUs: GPU i for local task i; 2 tasks: 0-3 and 4-7).

On CPU the ids do not matter; the device count of each process comes from
XLA_FLAGS=--xla_force_host_platform_device_count=N, and cross-process
collectives run over gloo (TCP).

Failure behaviour (when a process dies, the others must not hang):

  * a process that stops sending heartbeats for `heartbeat_timeout_s` is
    declared dead by the coordination service, which terminates every other
    process with "Terminating process because the JAX distributed service
    detected fatal errors. This most likely indicates that another task died"
    (SIGABRT); if process 0, which hosts the service, dies, the others notice
    at their next heartbeat;
  * a collective that notices first (gloo: "Connection closed by peer") raises
    in the survivor, which `exit_promptly_on_error` turns into exit status 1
    with "another process has probably died";
  * a Python error on one process ends that process at once (the same
    helper) instead of leaving it at JAX's shutdown barrier, waiting for peers
    that are stuck in a collective waiting for it;
  * a process that never connects fails the others after `init_timeout_s`.

Checkpoints are committed by an atomic rename, so an abort leaves the last
complete one intact. A deliberate stop (SIGTERM, a time limit) must happen at
the same step on every process, or the collectives of the step only some of
them run deadlock: `stop_everywhere` agrees on the step through JAX's
preemption service.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import sys
import traceback
from typing import Iterator, Mapping, Optional, Sequence

import jax
from jax._src import distributed as _jax_distributed  # the job's coordinator address
from jax.experimental import multihost_utils

# A process silent this long is declared dead and the job aborts. JAX's
# default is 100 s; heartbeats come from a background thread, so compiles and
# checkpoint writes do not delay them, and a shorter bound frees a broken
# allocation sooner.
HEARTBEAT_TIMEOUT_S = 60
# Every process must have connected by then (slow node start-up, container pulls).
INIT_TIMEOUT_S = 300
# At exit each process waits this long for the others to finish too.
SHUTDOWN_TIMEOUT_S = 120

MODES = ("flags", "slurm", "env", "single")
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")  # what JAX's SLURM detection requires


class DistributedError(RuntimeError):
    """The multi-process job could not form (a process missing, coordinator unreachable)."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """How this process joins the job (`resolve`'s answer)."""

    mode: str  # one of MODES
    num_processes: Optional[int] = 1  # None in "env" mode until JAX has found it
    process_id: Optional[int] = 0
    coordinator_address: Optional[str] = None  # host:port; None in "env" mode (JAX finds it)
    local_device_ids: Optional[tuple[int, ...]] = None  # None: every device the process sees

    @property
    def multi_process(self) -> bool:
        return self.mode != "single"

    def describe(self) -> str:
        if not self.multi_process:
            return "single process"
        devs = "all devices" if self.local_device_ids is None else (
            "devices " + ",".join(map(str, self.local_device_ids)))
        who = ("process ?" if self.process_id is None
               else f"process {self.process_id} of {self.num_processes}")
        return (f"{who} ({self.mode}), "
                f"coordinator {self.coordinator_address or 'from the environment'}, {devs}")


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ValueError(f"{name}={environ[name]!r} is not an integer.") from None


def parse_device_ids(text: str | Sequence[int] | None) -> Optional[tuple[int, ...]]:
    """"all" / "" / None -> None (every device); "0,1,2" or [0, 1, 2] -> (0, 1, 2)."""
    if text is None:
        return None
    if not isinstance(text, str):
        return tuple(int(i) for i in text)
    text = text.strip()
    if text in ("", "all"):
        return None
    try:
        ids = tuple(int(i) for i in text.split(","))
    except ValueError:
        raise ValueError(f"local_device_ids={text!r} is invalid: give 'all' or a comma-"
                         "separated list of GPU ids on this node, e.g. '0,1,2,3'.") from None
    if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"local_device_ids={text!r} is invalid: ids must be distinct and >= 0.")
    return ids


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list ('gpu[003-010,012],cpu1' -> 'gpu003')."""
    m = re.match(r"([^,\[]*)(?:\[([^\],\-]*))?", nodelist.strip())
    host = (m.group(1) + (m.group(2) or "")) if m else ""
    if not host:
        raise ValueError(f"SLURM_STEP_NODELIST={nodelist!r} names no host.")
    return host


def slurm_coordinator(environ: Mapping[str, str]) -> str:
    """host:port of the coordinator: the step's first node, port as JAX picks it."""
    port = environ.get("JAX_COORDINATOR_PORT")
    if not port:
        # JAX's SLURM rule: a job-specific port in [61440, 65535], the same on every task.
        port = str(_int(environ, "SLURM_JOB_ID") % 2**12 + (65535 - 2**12 + 1))
    return f"{first_host(environ['SLURM_STEP_NODELIST'])}:{port}"


def _expand_counts(spec: str) -> list[int]:
    """SLURM's compressed per-node counts: '4(x2),3' -> [4, 4, 3]."""
    out = []
    for part in filter(None, spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return []
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def slurm_tasks_on_node(environ: Mapping[str, str]) -> Optional[int]:
    """How many tasks of this step run on this node (None: SLURM does not say)."""
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        counts = _expand_counts(environ.get(name, ""))
        if counts:
            node = int(environ.get("SLURM_NODEID", "0") or 0)
            return counts[min(node, len(counts) - 1)]
    if environ.get("SLURM_NTASKS_PER_NODE", "").isdigit():
        return int(environ["SLURM_NTASKS_PER_NODE"])
    return None


def _visible_gpus(environ: Mapping[str, str]) -> Optional[int]:
    for name in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"):
        v = environ.get(name)
        if v is not None and v not in ("", "NoDevFiles"):
            return len(v.split(","))
    return None


def slurm_local_device_ids(environ: Mapping[str, str]) -> Optional[tuple[int, ...]]:
    """This task's GPUs under SLURM (rules in the module docstring); None = all it sees."""
    local = _int(environ, "SLURM_LOCALID")
    tasks = slurm_tasks_on_node(environ)
    if tasks == 1:
        return None  # one task per node drives all of the node's GPUs
    visible = _visible_gpus(environ)
    on_node = int(environ["SLURM_GPUS_ON_NODE"]) if environ.get(
        "SLURM_GPUS_ON_NODE", "").isdigit() else None
    if visible is not None and ((on_node is not None and visible < on_node)
                                or (tasks is not None and visible < tasks)):
        return None  # SLURM already bound this task to its own GPUs
    gpus = visible if visible is not None else on_node
    if tasks is None or not gpus:
        return (local,)  # JAX's default: one device per task, by local rank
    if gpus % tasks:
        raise ValueError(f"{gpus} GPUs on this node do not split evenly over its {tasks} "
                         "tasks: launch one task per GPU or one per node, or give "
                         "--local_device_ids.")
    per = gpus // tasks
    return tuple(range(local * per, (local + 1) * per))


def _is_slurm_task(environ: Mapping[str, str]) -> bool:
    return all(v in environ for v in _SLURM_VARS) and _int(environ, "SLURM_NTASKS") > 1


def resolve(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
            process_id: Optional[int] = None,
            local_device_ids: str | Sequence[int] | None = None,
            environ: Optional[Mapping[str, str]] = None) -> Spec:
    """Decides how this process joins the job; touches no device, raises ValueError."""
    env = os.environ if environ is None else environ
    ids = parse_device_ids(local_device_ids if local_device_ids is not None
                           else env.get("JAX_LOCAL_DEVICE_IDS"))
    explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes,
                "process_id": process_id}
    given = {k: v for k, v in explicit.items() if v is not None}
    if given:
        if num_processes == 1 and process_id in (None, 0):
            return Spec("single")
        missing = [f"--{k}" for k in explicit if k not in given]
        if missing:
            raise ValueError(f"{', '.join(f'--{k}={v}' for k, v in given.items())} given "
                             f"without {' and '.join(missing)}: an explicit launch needs "
                             "all three (or none, under SLURM).")
        if not isinstance(num_processes, int) or num_processes < 1:
            raise ValueError(f"--num_processes={num_processes!r} is invalid: use a positive "
                             "integer.")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} is out of range: use 0 .. "
                             f"{num_processes - 1} for --num_processes={num_processes}.")
        if not re.fullmatch(r"\[?[\w.\-:]+\]?:\d+", coordinator_address):
            raise ValueError(f"--coordinator_address={coordinator_address!r} is invalid: "
                             "use host:port of process 0, e.g. node001:12345.")
        return Spec("flags", num_processes, process_id, coordinator_address, ids)
    if _is_slurm_task(env):
        n, pid = _int(env, "SLURM_NTASKS"), _int(env, "SLURM_PROCID")
        if not 0 <= pid < n:
            raise ValueError(f"SLURM_PROCID={pid} is out of range for SLURM_NTASKS={n}.")
        if ids is None and local_device_ids is None and "JAX_LOCAL_DEVICE_IDS" not in env:
            ids = slurm_local_device_ids(env)
        return Spec("slurm", n, pid, slurm_coordinator(env), ids)
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return Spec("env", None, None, env["JAX_COORDINATOR_ADDRESS"], ids)
    return Spec("single")


def initialize(coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None, process_id: Optional[int] = None,
               local_device_ids: str | Sequence[int] | None = None, *,
               heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
               init_timeout_s: int = INIT_TIMEOUT_S,
               shutdown_timeout_s: int = SHUTDOWN_TIMEOUT_S) -> Spec:
    """Joins the job `resolve` describes (no-op for one process, or if already joined).

    Must run before anything initialises a JAX backend (`jax.devices()`, any
    computation). Raises ValueError for settings that cannot work, and
    DistributedError (with the coordinator and a hint) when the job cannot form.
    """
    spec = resolve(coordinator_address, num_processes, process_id, local_device_ids)
    if not spec.multi_process or jax.distributed.is_initialized():
        return spec
    for name, v in (("heartbeat_timeout_s", heartbeat_timeout_s),
                    ("init_timeout_s", init_timeout_s),
                    ("shutdown_timeout_s", shutdown_timeout_s)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"--{name}={v!r} is invalid: use a positive number of seconds.")
    # Cross-process collectives of the CPU backend (tests, CPU clusters); must
    # be chosen before the backend exists. GPU collectives are NCCL regardless.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(initialization_timeout=init_timeout_s,
                  heartbeat_timeout_seconds=heartbeat_timeout_s,
                  shutdown_timeout_seconds=shutdown_timeout_s)
    if spec.mode == "env":
        # JAX's cluster detection (Open MPI, SLURM, ...) fills whatever is unset.
        call = dict(num_processes=num_processes, process_id=process_id,
                    local_device_ids=(None if spec.local_device_ids is None
                                      else list(spec.local_device_ids)))
    else:
        # Everything is known; "deactivate" keeps JAX from overriding the
        # device choice with its one-device-per-task SLURM default.
        call = dict(coordinator_address=spec.coordinator_address,
                    num_processes=spec.num_processes, process_id=spec.process_id,
                    local_device_ids=(None if spec.local_device_ids is None
                                      else list(spec.local_device_ids)),
                    cluster_detection_method="deactivate")
    # One line per process: if the job cannot form, JAX aborts the process
    # (after init_timeout_s) with a generic message, and this says what it tried.
    print(f"jmoe: joining as {spec.describe()}; all must connect within "
          f"{init_timeout_s}s", file=sys.stderr, flush=True)
    try:
        jax.distributed.initialize(**call, **kwargs)
    except RuntimeError as e:  # JaxRuntimeError: DEADLINE_EXCEEDED, connection refused, ...
        raise DistributedError(
            f"{spec.describe()}: could not join the job within {init_timeout_s}s ({e}). "
            f"Check that all {spec.num_processes or 'N'} processes were started (srun with "
            "one task per process), that the coordinator host is reachable from every "
            "node and its port is free (set JAX_COORDINATOR_PORT to choose another).") from e
    if spec.mode == "env":
        spec = dataclasses.replace(spec, num_processes=jax.process_count(),
                                   process_id=jax.process_index())
    return spec


def coordinator_address() -> Optional[str]:
    """host:port of the joined job's coordinator; None when not a multi-process job.

    Read from JAX's distributed state (JAX keeps no public accessor): the
    address every process of the job connected to, so it names the job.
    """
    if not jax.distributed.is_initialized():
        return None
    return _jax_distributed.global_state.coordinator_address


_stop_requested = False


def stop_everywhere(step: int, request: bool = False) -> bool:
    """Whether all processes stop after `step`: the same answer on every one of them.

    Call at every step, from the same start step, on every process. After a
    SIGTERM to any process (SLURM preemption, `scancel --signal=TERM`), or
    `request=True` on any process (e.g. its time limit), JAX's preemption
    service picks one later step and this returns True there on all processes.
    In a multi-process job the service owns SIGTERM: install no Python handler
    for it. One process: always False (the caller handles its own signals).
    """
    global _stop_requested
    if not jax.distributed.is_initialized():
        return False
    if request and not _stop_requested:
        _stop_requested = True
        # A preemption notice to ourselves: the service's SIGTERM handler
        # (not Python's) receives it and starts the agreement.
        os.kill(os.getpid(), signal.SIGTERM)
    return multihost_utils.reached_preemption_sync_point(step)


@contextlib.contextmanager
def exit_promptly_on_error(expected: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """In a multi-process job, an unexpected error ends this process at once.

    Left to a normal exit, the failing process would wait at JAX's shutdown
    barrier (`shutdown_timeout_s`) for peers that are stuck in a collective
    waiting for it. Exiting at once (status 1, traceback printed) stops its
    heartbeats, so the coordination service ends the others within the
    heartbeat timeout (at once if this was process 0). `expected` errors,
    raised alike on every process (config errors, a NaN loss: the loss is
    global), propagate normally.
    """
    try:
        yield
    except expected:
        raise
    except BaseException as e:
        if not jax.distributed.is_initialized() or isinstance(e, SystemExit) and not e.code:
            raise
        traceback.print_exc()
        first_line = (str(e).strip().splitlines() or [""])[0][:300]
        why = ("a collective failed, so another process has probably died (see its log)"
               if isinstance(e, jax.errors.JaxRuntimeError) else
               "the other processes stop within the heartbeat timeout")
        print(f"error: process {jax.process_index()} of {jax.process_count()} failed "
              f"({type(e).__name__}: {first_line}); exiting now: {why}.",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
