"""Shared timing for the benchmarks: compile, interleave, take medians, write JSON."""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Mapping, Sequence

import jax
import numpy as np

from jmoe.sharding.xla_flags import configure_cpu_workarounds

# Benchmarks import this module before their first computation, so the flags
# still apply (XLA reads them when the first backend starts).
configure_cpu_workarounds()


def time_interleaved(rows: Mapping[str, tuple[Callable, Sequence]], repeats: int,
                     log: Callable = print) -> dict:
    """Median seconds per call of each `fn(*args)`, one call of each per round.

    Interleaving makes every variant see the same machine load (the machines
    are shared); the first call (compile + run) is not counted.
    """
    for name, (fn, args) in rows.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        log(f"  compiled + first run {name:18s} {time.perf_counter() - t0:7.2f}s")
    samples = {name: [] for name in rows}
    for r in range(repeats):
        for name, (fn, args) in rows.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            samples[name].append(time.perf_counter() - t0)
        log(f"  round {r + 1}/{repeats} done")
    return {name: float(np.median(s)) for name, s in samples.items()}


def ratio_rows(medians: Mapping[str, float], reference: str) -> list:
    ref = medians[reference]
    return [{"name": n, "median_s": m, "ratio": m / ref} for n, m in medians.items()]


def print_table(rows: Sequence[Mapping], reference: str) -> None:
    print(f"\n| variant | median fwd+bwd (s) | ratio to {reference} |\n|---|---|---|")
    for row in rows:
        print(f"| {row['name']} | {row['median_s']:.4f} | {row['ratio']:.2f}x |")


def write_json(path: str | None, result: Mapping) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {path}")
