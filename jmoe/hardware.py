"""Hardware profiles for the cost model: datasheet peaks, stated assumptions,
and `cpu-local`, measured on the running machine.

A profile describes one accelerator and how it is wired:

  peak_flops     dense matmul FLOP/s per device, by compute dtype (no sparsity)
  mem_bw         device memory bandwidth, bytes/s
  mem_bytes      device memory capacity, bytes
  devices_per_node
  intra_bw       all-to-all bandwidth inside a node, bytes/s per device per
                 direction (NVLink / PCIe)
  inter_bw       bandwidth across nodes, bytes/s per device per direction
                 (the device's share of the node's InfiniBand NICs)
  *_alpha        fixed cost of one collective call on that fabric, seconds
  *_peer         extra cost per peer message (what makes many small messages
                 slow: the reason for Tutel's two-level all-to-all), seconds

Datasheet numbers carry their source on the line. Everything a datasheet
does not give (achieved efficiencies, latencies, NIC counts where no
reference system exists) is an *assumption*, marked as such; override any
field with `profile.replace(...)` or `python -m jmoe.plan --set FIELD=VALUE`.

Sources (NVIDIA product datasheets and DGX system datasheets):
  [A100]  NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM column), nvidia.com
  [A800]  NVIDIA A800 Tensor Core GPU datasheet (A800 80GB SXM column), nvidia.com
  [A30]   NVIDIA A30 Tensor Core GPU datasheet, nvidia.com
  [H100]  NVIDIA H100 Tensor Core GPU datasheet (H100 SXM column), nvidia.com
  [H200]  NVIDIA H200 Tensor Core GPU datasheet (H200 SXM column), nvidia.com
  [DGXA]  NVIDIA DGX A100 datasheet: 8x single-port ConnectX-6 200 Gb/s HDR
          InfiniBand for the compute fabric, one per GPU
  [DGXH]  NVIDIA DGX H100 / DGX H200 datasheets: 8x single-port ConnectX-7
          400 Gb/s InfiniBand, one per GPU
Datasheets quote Tensor Core FLOP/s "with sparsity" (2:4); the dense figure
used here is half of it. NVLink figures are totals over both directions; the
per-direction bandwidth used here is half.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Optional

GB = 1e9
TERA = 1e12
GBIT = 1e9 / 8  # bytes/s in one Gb/s


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    description: str
    peak_flops: dict  # dtype name -> FLOP/s per device
    mem_bw: float
    mem_bytes: float
    devices_per_node: int
    intra_bw: float
    inter_bw: float
    intra_alpha: float
    intra_peer: float
    inter_alpha: float
    inter_peer: float
    # Achieved fraction of the peaks (assumptions on GPUs, 1.0 where measured).
    mm_eff: float = 0.7  # large dense matmuls (cuBLAS-class GEMM)
    gmm_eff: float = 0.55  # grouped matmul over experts (jmoe's Triton kernel)
    attn_eff: float = 0.45  # flash attention forward + backward
    mem_eff: float = 0.8  # streaming elementwise kernels
    gather_eff: float = 0.6  # row gathers (permute / un-permute), as a share of mem_bw
    scatter_eff: float = 0.4  # row scatters (ragged emulation, gather transposes)
    comm_eff: float = 0.75  # share of link bandwidth an NCCL all-to-all reaches
    kernel_overhead: float = 4e-6  # per kernel launch, seconds
    launch_overhead: float = 50e-6  # per jitted step call, seconds
    async_collectives: bool = True  # can an all-to-all run while compute runs
    causal_skip: bool = True  # attention skips masked blocks (flash attention)
    sources: tuple = ()
    measured: Optional[dict] = None  # raw calibration numbers (cpu-local)

    def replace(self, **kw) -> "Hardware":
        return dataclasses.replace(self, **kw)

    def flops(self, dtype: str) -> float:
        """Peak matmul FLOP/s for `dtype` (float16 falls back to bfloat16)."""
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]
        if dtype == "float16" and "bfloat16" in self.peak_flops:
            return self.peak_flops["bfloat16"]
        return self.peak_flops["float32"]


# Assumed latencies (not in any datasheet): NCCL-class collectives.
_NVLINK_LAT = dict(intra_alpha=10e-6, intra_peer=0.5e-6)
_IB_LAT = dict(inter_alpha=20e-6, inter_peer=2e-6)


def _a100_like(name, desc, nvlink_total_gbs, sources):
    return Hardware(
        name=name, description=desc,
        # [A100]/[A800]: BF16/FP16 Tensor 624 TFLOPS with sparsity -> 312 dense;
        # TF32 312 with sparsity -> 156 dense (what XLA uses for fp32 dots on
        # Ampere unless precision=highest; fp32 non-tensor is 19.5).
        peak_flops={"bfloat16": 312 * TERA, "float16": 312 * TERA, "float32": 156 * TERA},
        mem_bw=2039 * GB,  # [A100]/[A800] 80GB SXM: HBM2e 2,039 GB/s
        mem_bytes=80 * GB,  # 80 GB HBM2e
        devices_per_node=8,  # HGX/DGX A100 baseboard: 8 GPUs on NVSwitch
        intra_bw=nvlink_total_gbs / 2 * GB,  # NVLink total / 2 directions
        inter_bw=200 * GBIT,  # [DGXA] one 200 Gb/s HDR NIC per GPU (A800: assumed same)
        **_NVLINK_LAT, **_IB_LAT, sources=sources)


PROFILES = {
    "a100": _a100_like("a100", "A100 80GB SXM4, 8 per node on NVLink/NVSwitch, 200 Gb/s HDR IB per GPU",
                       600, ("[A100] NVLink 600 GB/s", "[DGXA] 200 Gb/s HDR per GPU")),
    "a800": _a100_like("a800", "A800 80GB SXM4 (NVLink capped at 400 GB/s), 8 per node, 200 Gb/s IB per GPU",
                       400, ("[A800] NVLink 400 GB/s",
                             "assumption: 200 Gb/s HDR per GPU as in [DGXA]")),
    "a30": Hardware(
        name="a30", description="A30 24GB PCIe, 8 per node on PCIe Gen4, 200 Gb/s NIC per 2 GPUs",
        # [A30]: BF16 Tensor 330 TFLOPS with sparsity -> 165 dense; TF32 165 -> 82.5.
        peak_flops={"bfloat16": 165 * TERA, "float16": 165 * TERA, "float32": 82.5 * TERA},
        mem_bw=933 * GB,  # [A30] HBM2 933 GB/s
        mem_bytes=24 * GB,  # [A30] 24 GB HBM2
        devices_per_node=8,  # assumption: 8-GPU PCIe server
        intra_bw=32 * GB,  # [A30] PCIe Gen4 x16: 64 GB/s total -> 32 per direction
        # assumption: no reference system; one 200 Gb/s HDR NIC per two GPUs.
        inter_bw=200 * GBIT / 2,
        intra_alpha=15e-6, intra_peer=2e-6,  # assumption: PCIe P2P through switches
        **_IB_LAT,
        sources=("[A30] PCIe Gen4 64 GB/s, HBM2 933 GB/s",
                 "assumption: 200 Gb/s HDR per 2 GPUs, 8 GPUs per node")),
    "h100": Hardware(
        name="h100", description="H100 80GB SXM5, 8 per node on NVLink/NVSwitch, 400 Gb/s NDR IB per GPU",
        # [H100] SXM: BF16 Tensor 1,979 TFLOPS with sparsity -> 989.5 dense;
        # TF32 989 with sparsity -> 494.5 dense; FP8 3,958 -> 1,979 dense.
        peak_flops={"bfloat16": 989.5 * TERA, "float16": 989.5 * TERA,
                    "float32": 494.5 * TERA, "float8": 1979 * TERA},
        mem_bw=3350 * GB,  # [H100] SXM: HBM3 3.35 TB/s
        mem_bytes=80 * GB,  # [H100] SXM: 80 GB
        devices_per_node=8,  # [DGXH] 8 GPUs
        intra_bw=450 * GB,  # [H100] NVLink 900 GB/s total -> 450 per direction
        inter_bw=400 * GBIT,  # [DGXH] one 400 Gb/s ConnectX-7 per GPU = 50 GB/s
        **_NVLINK_LAT, **_IB_LAT,
        sources=("[H100] SXM: 989.5 dense BF16 TFLOPS, HBM3 3.35 TB/s, NVLink 900 GB/s",
                 "[DGXH] 400 Gb/s InfiniBand per GPU")),
    "h200": Hardware(
        name="h200", description="H200 141GB SXM, 8 per node on NVLink/NVSwitch, 400 Gb/s NDR IB per GPU",
        # [H200] SXM: same Tensor Core peaks as H100 SXM (BF16 1,979 sparse).
        peak_flops={"bfloat16": 989.5 * TERA, "float16": 989.5 * TERA,
                    "float32": 494.5 * TERA, "float8": 1979 * TERA},
        mem_bw=4800 * GB,  # [H200] HBM3e 4.8 TB/s
        mem_bytes=141 * GB,  # [H200] 141 GB
        devices_per_node=8,  # [DGXH] DGX H200: 8 GPUs
        intra_bw=450 * GB,  # [H200] NVLink 900 GB/s total -> 450 per direction
        inter_bw=400 * GBIT,  # [DGXH] 400 Gb/s ConnectX-7 per GPU
        **_NVLINK_LAT, **_IB_LAT,
        sources=("[H200] SXM: 989.5 dense BF16 TFLOPS, HBM3e 4.8 TB/s, NVLink 900 GB/s",
                 "[DGXH] 400 Gb/s InfiniBand per GPU")),
}

ALIASES = {"a100-80gb": "a100", "h100-sxm": "h100", "h200-sxm": "h200", "cpu": "cpu-local"}
NAMES = tuple(PROFILES) + ("cpu-local",)


# ------------------------------------------------------------------ cpu-local

def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


class CpuCalibrator:
    """Compiled micro-benchmarks of this machine on `num_devices` virtual CPU
    devices running at once (they share the host's cores, exactly as in a
    multi-device CPU run). `time_once()` times each case once; `measure`
    takes medians. Benchmarks interleave `time_once()` with their own
    timings so that both see the same load on a shared machine.

    A case is one small jitted program (one matmul forward + backward, one
    elementwise op, one gather, one all-to-all), called `reps` times back to
    back, each call consuming the previous one's output, for about
    `target_s` seconds. Separate calls, like the ops of a real program, pay
    for fresh output buffers (on CPU: page faults and zeroing); a run as long
    as real work is needed because the OS scheduler gives a short burst more
    than its share of a busy machine's cores.

    Work rates are taken in CPU time (core-seconds, robust to other
    processes) and turned into elapsed time by `share`, measured with the
    "share" case: one long program looping matmuls and an all-to-all, i.e.
    compute phases between barriers like a layer's forward and backward.

    Per-device quantities (see `rates`):
      mm_flops   FLOP/s of matmuls, forward + both backward products (`vjp`)
      mem_bw     bytes/s of a streaming elementwise kernel (read + write)
      gather_bw  bytes/s of a row gather x[idx] (read + write)
      scatter_bw bytes/s of a row scatter zeros.at[idx].set(x) (zeros, read, write)
      a2a_alpha  seconds per all-to-all call (fixed part)
      a2a_bw     bytes/s per device of an all-to-all (bytes leaving the device)
      launch     seconds per jitted call of a trivial program on all devices
      share      cores per device a long 8-device program gets (<= 1)
    """

    MM = (1024, 256, 512)  # m, k, n of the calibration matmul
    ELEMS = 1 << 21  # 8 MB per device
    GATHER = (8192, 256)  # 8 MB per device
    A2A_ROWS = (64, 8192)  # x 256 floats: 64 KB and 8 MB per device

    def __init__(self, num_devices: int = 8, target_s: float = 0.1):
        import jax
        import jax.numpy as jnp
        import numpy as np
        from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

        devices = jax.devices("cpu")
        if len(devices) < num_devices:
            raise ValueError(
                f"calibrating cpu-local needs {num_devices} CPU devices but this process has "
                f"{len(devices)}: set XLA_FLAGS=--xla_force_host_platform_device_count="
                f"{num_devices} before importing jax (or call cpu_local()).")
        self.jax = jax
        self.n = num_devices
        mesh = jax.sharding.Mesh(np.asarray(devices[:num_devices]), ("x",),
                                 axis_types=(AxisType.Explicit,))
        spec = NamedSharding(mesh, P("x"))

        def put(shape, seed):
            return jax.device_put(jax.random.normal(
                jax.random.key(seed), (num_devices * shape[0],) + shape[1:]), spec)

        def sm(f, nargs):
            return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("x"),) * nargs,
                                         out_specs=(P("x"),) * nargs))

        def mm_step(x, w, dy):
            y, vjp = jax.vjp(lambda a, b: a @ b, x, w)
            dx, dw = vjp(dy)
            return dx, dw, y  # same shapes as the inputs: calls chain

        m, k, n = self.MM
        r, d = self.GATHER
        idx = jax.device_put(jnp.tile(jax.random.permutation(jax.random.key(5), r)
                                      .astype(jnp.int32), num_devices), spec)
        a2a = sm(lambda a: (jax.lax.all_to_all(a, "x", 0, 0, tiled=True),), 1)

        def probe_step(x, w, dy):
            x, w, dy = mm_step(x, w, dy)
            x = jax.lax.all_to_all(x[::-1], "x", 0, 0, tiled=True)
            return x, w, dy

        def looped_mm(reps, x, w, dy):
            return jax.lax.fori_loop(0, reps[0], lambda i, c: probe_step(*c), (x, w, dy))

        share = jax.jit(jax.shard_map(looped_mm, mesh=mesh, in_specs=(P(),) + (P("x"),) * 3,
                                      out_specs=(P("x"),) * 3))
        self._share_reps = np.ones((1,), np.int32)
        self.cases = {
            "share": (lambda *a: share(self._share_reps, *a),
                      (put((m, k), 9), put((k, n), 10), put((m, n), 11))),
            "launch": (sm(lambda a: (a + 1.0,), 1), (put((8,), 3),)),
            "mm": (sm(mm_step, 3), (put((m, k), 0), put((k, n), 1), put((m, n), 2))),
            "mem": (sm(lambda a: (a * 0.999 + 1e-3,), 1), (put((self.ELEMS,), 4),)),
            "gather": (sm(lambda a, i: (a[i], i), 2), (put((r, d), 6), idx)),
            "scatter": (sm(lambda a, i: (jnp.zeros_like(a).at[i].set(
                a, mode="drop", unique_indices=True), i), 2), (put((r, d), 12), idx)),
            "a2a_small": (a2a, (put((self.A2A_ROWS[0], 256), 7),)),
            "a2a_big": (a2a, (put((self.A2A_ROWS[1], 256), 8),)),
        }
        self.reps = {}
        for name, (fn, args) in self.cases.items():
            jax.block_until_ready(fn(*args))  # compile
            if name == "share":
                # One long program (~2 x target_s): the loop runs inside it.
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*args))
                dt = time.perf_counter() - t0
                self._share_reps = np.full((1,), max(1, int(2 * target_s / max(dt, 1e-6))),
                                           np.int32)
                self.reps[name] = 1
                continue
            reps = 1
            while True:  # grow the chain until it lasts about target_s
                dt = self._run(name, reps)
                if dt >= target_s / 2 or reps >= 4096:
                    break
                reps *= 4 if dt < target_s / 8 else 2
            self.reps[name] = max(1, int(round(reps * target_s / max(dt, 1e-6))))

    def _run(self, name: str, reps: int) -> float:
        fn, args = self.cases[name]
        # Queued collective programs can deadlock XLA:CPU's rendezvous, so
        # those wait for each call; the others are dispatched back to back.
        sync = name.startswith("a2a")
        t0 = time.perf_counter()
        out = args
        for _ in range(reps):
            out = fn(*out)
            if sync:
                self.jax.block_until_ready(out)
        self.jax.block_until_ready(out)
        return time.perf_counter() - t0

    def time_once(self, clock: str = "wall") -> dict:
        """Seconds per call of each case, launch cost removed (launch: per call).

        clock="wall" (elapsed time) or "both": {"wall": {...}, "cpu": {...}},
        where "cpu" is this process's CPU time (all threads) divided by the
        device count: what each device's work costs in core-seconds, nearly
        independent of other processes' load on a shared machine.
        """
        wall, cpu = {}, {}
        for name in self.cases:
            reps = self.reps[name]
            c0 = time.process_time()
            wall[name] = self._run(name, reps) / reps
            cpu[name] = (time.process_time() - c0) / reps / self.n
        for d in (wall, cpu):
            launch = d["launch"]
            for name in d:
                if name != "launch":
                    d[name] = max(d[name] - launch, 1e-9)
        return {"wall": wall, "cpu": cpu} if clock == "both" else wall

    def rates(self, secs: dict) -> dict:
        """Per-device rates from (median) `time_once("both")` seconds.

        Work rates come from CPU time (robust on a shared machine) and are
        scaled by `share`: the cores per device that one long 8-device
        program gets right now (its CPU time over its elapsed time), which
        turns core-seconds back into elapsed seconds.
        """
        wall, cpu = secs["wall"], secs["cpu"]
        m, k, n = self.MM
        r, d = self.GATHER
        share = min(1.0, cpu["share"] / max(wall["share"], 1e-9))
        small, big = (4 * rw * 256 * (self.n - 1) / self.n for rw in self.A2A_ROWS)
        a2a_bw = (big - small) / max(cpu["a2a_big"] - cpu["a2a_small"], 1e-9) * share
        return {
            "num_devices": self.n,
            "share": share,
            "mm_flops": 3 * 2 * m * k * n / cpu["mm"] * share,
            "mem_bw": 8 * self.ELEMS / cpu["mem"] * share,
            "gather_bw": 2 * 4 * r * d / cpu["gather"] * share,
            "scatter_bw": 3 * 4 * r * d / cpu["scatter"] * share,
            "a2a_bw": a2a_bw,
            "a2a_alpha": max(cpu["a2a_small"] / share - small / max(a2a_bw, 1.0), 1e-7),
            "launch": wall["launch"],
        }

    def measure(self, repeats: int) -> dict:
        samples = [self.time_once("both") for _ in range(repeats)]
        return self.rates({c: {k: _median([s[c][k] for s in samples]) for k in samples[0][c]}
                           for c in ("wall", "cpu")})


def calibrate_cpu(num_devices: int = 8, budget_s: float = 20.0) -> dict:
    """Measures this machine (see `CpuCalibrator`): medians of repeated
    samples, compile included, within about `budget_s` seconds."""
    t0 = time.perf_counter()
    cal = CpuCalibrator(num_devices, target_s=0.05)
    t1 = time.perf_counter()
    one = cal.time_once()
    per = sum(one[k] * cal.reps[k] for k in one) + 2 * 0.1
    left = budget_s - (time.perf_counter() - t0)
    reps = int(max(3, min(15, left / max(per, 1e-4))))
    out = cal.measure(reps)
    out["seconds"] = time.perf_counter() - t0
    out["compile_seconds"] = t1 - t0
    out["repeats"] = reps
    return out


def cpu_profile_from(measured: dict) -> Hardware:
    """The `cpu-local` profile from `calibrate_cpu`'s numbers.

    XLA:CPU runs collectives synchronously, so nothing overlaps
    (`async_collectives=False`) and the chunk pipeline buys nothing; the
    virtual devices form one "node" joined by memory copies.
    """
    ndev = measured["num_devices"]
    return Hardware(
        name="cpu-local",
        description=f"this machine as {ndev} virtual CPU devices (measured, "
                    f"{measured['mm_flops'] / 1e9:.1f} GFLOP/s and "
                    f"{measured['mem_bw'] / 1e9:.2f} GB/s per device)",
        peak_flops={"float32": measured["mm_flops"], "bfloat16": measured["mm_flops"],
                    "float16": measured["mm_flops"]},
        mem_bw=measured["mem_bw"], mem_bytes=64 * GB, devices_per_node=ndev,
        # a2a_bw counts the bytes that leave a device, as the model's links do.
        intra_bw=measured["a2a_bw"], inter_bw=measured["a2a_bw"],
        intra_alpha=measured["a2a_alpha"], intra_peer=0.0,
        inter_alpha=measured["a2a_alpha"], inter_peer=0.0,
        mm_eff=1.0, gmm_eff=1.0, attn_eff=1.0, mem_eff=1.0,
        gather_eff=measured["gather_bw"] / measured["mem_bw"],
        scatter_eff=measured.get("scatter_bw", measured["gather_bw"]) / measured["mem_bw"],
        comm_eff=1.0,
        kernel_overhead=0.0, launch_overhead=measured["launch"],
        async_collectives=False, causal_skip=False,
        sources=("measured on this machine by jmoe.hardware.calibrate_cpu",),
        measured=dict(measured))


_CPU_CACHE: dict = {}


def cpu_local(num_devices: int = 8, budget_s: float = 20.0) -> Hardware:
    """Calibrates (once per process) and returns the `cpu-local` profile.

    Runs in this process when jax already has `num_devices` CPU devices,
    otherwise in a child process with XLA_FLAGS set (the device count is
    fixed when jax starts).
    """
    if num_devices in _CPU_CACHE:
        return _CPU_CACHE[num_devices]
    measured = None
    if "jax" in sys.modules:
        import jax

        if len(jax.devices("cpu")) >= num_devices:
            measured = calibrate_cpu(num_devices, budget_s)
    if measured is None:
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={num_devices}").strip()
        env["JAX_PLATFORMS"] = "cpu"
        res = subprocess.run([sys.executable, "-m", "jmoe.hardware", "--calibrate",
                              str(num_devices), "--budget", str(budget_s)],
                             env=env, capture_output=True, text=True, check=False)
        if res.returncode:
            raise RuntimeError(f"cpu-local calibration failed:\n{res.stderr[-2000:]}")
        measured = json.loads(res.stdout.strip().splitlines()[-1])
    hw = cpu_profile_from(measured)
    _CPU_CACHE[num_devices] = hw
    return hw


def get(name: str, **overrides) -> Hardware:
    """A profile by name (`a100`, `a800`, `a30`, `h100`, `h200`, `cpu-local`)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key == "cpu-local":
        hw = cpu_local()
    elif key in PROFILES:
        hw = PROFILES[key]
    else:
        raise ValueError(f"hardware={name!r} is unknown: choose one of {NAMES}.")
    return apply_overrides(hw, overrides) if overrides else hw


def apply_overrides(hw: Hardware, overrides: dict) -> Hardware:
    """`FIELD=VALUE` overrides; bandwidths in GB/s and FLOP/s in TFLOP/s are
    accepted through the `*_gbs` / `tflops_<dtype>` spellings."""
    kw, flops = {}, dict(hw.peak_flops)
    fields = {f.name: f for f in dataclasses.fields(Hardware)}
    for key, value in overrides.items():
        if key.startswith("tflops_"):
            flops[key[len("tflops_"):]] = float(value) * TERA
        elif key.endswith("_gbs") and key[:-4] in fields:
            kw[key[:-4]] = float(value) * GB
        elif key.endswith("_gbit") and key[:-5] in fields:
            kw[key[:-5]] = float(value) * GBIT
        elif key in fields and key not in ("name", "peak_flops", "sources", "measured"):
            cur = getattr(hw, key)
            if isinstance(cur, bool):
                kw[key] = str(value).lower() in ("1", "true", "yes")
            elif isinstance(cur, int):
                kw[key] = int(value)
            elif isinstance(cur, float):
                kw[key] = float(value)
            else:
                kw[key] = value
        else:
            raise ValueError(
                f"hardware override {key}={value!r}: unknown field; use one of "
                f"{sorted(k for k in fields if k not in ('name', 'peak_flops', 'sources', 'measured'))}"
                ", tflops_<dtype>, or <bandwidth field>_gbs / _gbit.")
    kw["peak_flops"] = flops
    return hw.replace(**kw)


def _main(argv) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Calibrate the cpu-local profile.")
    p.add_argument("--calibrate", type=int, default=8, help="virtual CPU devices")
    p.add_argument("--budget", type=float, default=20.0)
    a = p.parse_args(argv)
    print(json.dumps(calibrate_cpu(a.calibrate, a.budget)))


if __name__ == "__main__":
    _main(sys.argv[1:])
