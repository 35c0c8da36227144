"""XLA flags that let collectives overlap compute on GPU, set only if the
installed jaxlib knows them.

XLA aborts the process at start-up on a flag it does not know, and flag names
change between releases (`--xla_gpu_enable_async_all_to_all` and
`--xla_gpu_enable_async_collectives` are gone from jaxlib 0.10, where async
collectives are the default). So every candidate is first tried in a short
subprocess (`import jax; jax.devices()` with only that flag); the answers are
cached per jaxlib version under `~/.cache/jmoe/`.

Call `configure_gpu_overlap()` before JAX initialises its backend (the
trainer does, first thing). Verify overlap in a compiled step with
`overlap_report(compiled.as_text())`: async all-to-all start/done pairs with
compute scheduled between them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Sequence

# Latency-hiding scheduler + async collectives on their own stream; the
# pipelined collectives move FSDP all-gathers / reduce-scatters out of loops.
GPU_OVERLAP_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_highest_priority_async_stream=true",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
    # Names from older jaxlibs; kept so older installs still get async
    # all-to-all. Filtered out where unknown.
    "--xla_gpu_enable_async_all_to_all=true",
    "--xla_gpu_enable_async_collectives=true",
)


def _cache_path() -> str:
    import jaxlib

    base = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return os.path.join(base, "jmoe", f"xla_flags-{jaxlib.__version__}.json")


def _probe(flag: str, timeout: float) -> bool:
    env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
    try:
        r = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return r.returncode == 0


def supported_flags(flags: Iterable[str], timeout: float = 120.0) -> list:
    """The subset of `flags` the installed jaxlib accepts (probed, cached)."""
    flags = list(flags)
    path = _cache_path()
    try:
        with open(path) as fh:
            known = json.load(fh)
    except (OSError, ValueError):
        known = {}
    todo = [f for f in flags if f.split("=")[0] not in known]
    if todo:
        with ThreadPoolExecutor(max_workers=4) as pool:
            for f, ok in zip(todo, pool.map(lambda f: _probe(f, timeout), todo)):
                known[f.split("=")[0]] = ok
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as fh:
                json.dump(known, fh, indent=1)
        except OSError:
            pass  # a read-only home only costs a re-probe next time
    return [f for f in flags if known.get(f.split("=")[0])]


# XLA:CPU in jaxlib 0.10.2 segfaults inside a YNNPACK fusion (an element-wise
# or reduce fusion around a dot) in the backward pass of the chunked dropless
# expert-parallel layer at some shapes (D=256, 4096 tokens, 8 devices; a gdb
# backtrace ends in ynn::dot_fp32_*). Limiting YNNPACK to individual dots
# avoids it; the MoE layer's forward+backward ran 0.636 s against 0.628 s
# with the default (T=4096, D=512, F=2048, one device), within noise.
CPU_WORKAROUND_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=individual_dot",)


def gpu_present() -> bool:
    """True when a CUDA/ROCm JAX plugin is installed and not disabled by JAX_PLATFORMS."""
    platforms = os.environ.get("JAX_PLATFORMS", "").lower()
    if platforms and not any(p in platforms for p in ("cuda", "gpu", "rocm")):
        return False
    return any(importlib.util.find_spec(m) is not None for m in
               ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                "jax_rocm7_plugin"))


def _add_supported(flags: Sequence[str]) -> list:
    """Appends to XLA_FLAGS those of `flags` the user has not set and the
    installed jaxlib accepts; returns them."""
    current = os.environ.get("XLA_FLAGS", "")
    already = {t.split("=")[0] for t in current.split()}
    wanted = [f for f in flags if f.split("=")[0] not in already]
    added = supported_flags(wanted) if wanted else []
    if added:
        os.environ["XLA_FLAGS"] = " ".join([current] + added).strip()
    return added


def configure_gpu_overlap(extra: Sequence[str] = (), force: bool = False) -> list:
    """Appends the supported overlap flags to XLA_FLAGS, on GPU only.

    Must run before JAX initialises a backend. Flags the user already set
    keep the user's value. Returns the flags it added.
    """
    if not (force or gpu_present()):
        return []
    return _add_supported(list(GPU_OVERLAP_FLAGS) + list(extra))


def configure_cpu_workarounds() -> list:
    """Appends `CPU_WORKAROUND_FLAGS` to XLA_FLAGS when JAX will compute on
    the CPU (no GPU plugin, or JAX_PLATFORMS=cpu). Must run before JAX
    initialises a backend; a value the user set wins. Returns what it added.
    `train.py`, the tests and the benchmarks call it; call it first thing in
    your own CPU programs that run the expert-parallel layer.
    """
    if gpu_present():
        return []
    return _add_supported(CPU_WORKAROUND_FLAGS)


def overlap_report(hlo_text: str) -> dict:
    """Counts async all-to-all pairs in compiled HLO and the ops between them.

    Returns {"all_to_all": n sync, "async_pairs": n, "compute_between": n pairs
    with at least one fusion/dot/custom-call scheduled between start and done}.
    """
    lines = [l.strip() for l in hlo_text.splitlines()]
    sync = sum(1 for l in lines if re.search(r"\ball-to-all\(", l))
    pairs, overlapped = 0, 0
    for i, l in enumerate(lines):
        m = re.search(r"^(?:ROOT\s+)?(%?[\w.\-]+)\s*=.*\b(all-to-all-start|async-start)\(", l)
        if not m or ("async-start" in l and "all-to-all" not in l):
            continue
        name = m.group(1).lstrip("%")
        for j in range(i + 1, len(lines)):
            if ("-done(" in lines[j]) and re.search(rf"%?{re.escape(name)}\b", lines[j]):
                pairs += 1
                between = lines[i + 1:j]
                if any(re.search(r"\b(fusion|dot|custom-call|convolution)\(", b) for b in between):
                    overlapped += 1
                break
    return {"all_to_all": sync, "async_pairs": pairs, "compute_between": overlapped}
