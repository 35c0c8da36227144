"""Measures this machine for the `cpu-local` hardware profile: compiled
micro-benchmarks on virtual CPU devices (`CpuCalibrator`), run in this
process when it has the devices, else in a child process

  python -m jmoe.planner.calibrate --calibrate 8 --budget 20

(the device count is fixed when jax starts). `jmoe.planner.hardware`
turns the numbers into a profile.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P


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
        devices = jax.devices("cpu")
        if len(devices) < num_devices:
            raise ValueError(
                f"calibrating cpu-local needs {num_devices} CPU devices but this process has "
                f"{len(devices)}: set XLA_FLAGS=--xla_force_host_platform_device_count="
                f"{num_devices} before importing jax (or call jmoe.planner.hardware.cpu_local()).")
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
                jax.block_until_ready(out)
        jax.block_until_ready(out)
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


def measure_cpu(num_devices: int = 8, budget_s: float = 20.0) -> dict:
    """`calibrate_cpu`'s numbers: in this process when jax already has
    `num_devices` CPU devices, otherwise in a child process with XLA_FLAGS set."""
    if len(jax.devices("cpu")) >= num_devices:
        return calibrate_cpu(num_devices, budget_s)
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={num_devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    res = subprocess.run([sys.executable, "-m", "jmoe.planner.calibrate", "--calibrate",
                          str(num_devices), "--budget", str(budget_s)],
                         env=env, capture_output=True, text=True, check=False)
    if res.returncode:
        raise RuntimeError(f"cpu-local calibration failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _main(argv) -> None:
    p = argparse.ArgumentParser(description="Calibrate the cpu-local profile.")
    p.add_argument("--calibrate", type=int, default=8, help="virtual CPU devices")
    p.add_argument("--budget", type=float, default=20.0)
    a = p.parse_args(argv)
    print(json.dumps(calibrate_cpu(a.calibrate, a.budget)))


if __name__ == "__main__":
    _main(sys.argv[1:])
