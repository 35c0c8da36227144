"""What every benchmark shares: set-up, flags, fwd+bwd timing, tables, JSON.

A benchmark is its own logic around these calls:

    import harness                  # before jmoe: puts this checkout's jmoe first
    harness.setup(host_devices=8)   # XLA flags, before the first computation
    p = harness.parser(__doc__, repeats=5, quick=dict(tokens=512, repeats=2))
    harness.add_layer_flags(p)      # --tokens --d_model --d_ff --experts --top_k --cf
    a = p.parse_args(argv)
    rows = {"dense": (harness.fwd_bwd(f), (ct, x, w)), ...}
    table = harness.compare(rows, a.repeats, reference="dense")
    harness.write_json(a.json, {**harness.machine_info(), "rows": table})

Times are interleaved (one call of each variant per round) so every variant
sees the same load on a shared machine; tables report medians and ratios
measured side by side in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `python bench/x.py` must time this checkout's jmoe, not an installed one.
sys.path.insert(0, ROOT)

import jmoe  # noqa: E402
from jmoe.runtime.xla_flags import configure_cpu_workarounds  # noqa: E402

Rows = Mapping[Any, tuple[Callable, Sequence]]  # name -> (fn, args): time fn(*args)


def _log(message: str) -> None:
    print(message, flush=True)


# Set-up and flags.

def setup(host_devices: int | None = None, platforms: str | None = None) -> None:
    """Sets XLA up for a benchmark that runs the MoE layer. Call it before the
    first computation: XLA reads its flags when its first backend starts
    (after `import jax`, so importing first is fine).

    host_devices: split the CPU into this many virtual devices (a mesh of 8 on
      one machine).
    platforms: the JAX platforms to use, e.g. "cpu"; a JAX_PLATFORMS the user
      set wins.

    On the CPU it also adds `jmoe.runtime.xla_flags.configure_cpu_workarounds`'
    flags, as `train.py` does (XLA:CPU crashes in the expert-parallel layer's
    backward without them).
    """
    if host_devices:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={host_devices}").strip()
    if platforms:
        os.environ.setdefault("JAX_PLATFORMS", platforms)
        # JAX read the variable at import; tell it again before its backend starts.
        jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])
    configure_cpu_workarounds()


def parser(doc: str, repeats: int | None = None,
           quick: Mapping[str, Any] | None = None) -> argparse.ArgumentParser:
    """An argument parser with the script's docstring as help, `--json PATH`,
    `--repeats` (when given a default) and `--quick` (when given `quick`).

    `quick` maps flags to the values `--quick` gives them (a smoke test);
    a flag set on the command line keeps the command line's value.
    """
    p = _QuickParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", type=str, default=None, help="write the results here")
    if repeats is not None:
        p.add_argument("--repeats", type=int, default=repeats,
                       help="timed rounds (default %(default)s)")
    if quick:
        shown = ", ".join(f"{k}={v}" for k, v in quick.items())
        p.add_argument("--quick", action="store_true", help=f"smoke test: {shown}")
        p.quick = dict(quick)
    return p


class _QuickParser(argparse.ArgumentParser):
    """Parses twice under `--quick`: its values become the defaults, so flags
    given on the command line still win."""

    quick: Mapping[str, Any] = {}

    def parse_args(self, args=None, namespace=None):
        a = super().parse_args(args, namespace)
        if not getattr(a, "quick", False):
            return a
        self.set_defaults(**self.quick)
        return super().parse_args(args, namespace)


def add_layer_flags(p: argparse.ArgumentParser, tokens: int = 4096, d_model: int = 512,
                    d_ff: int = 2048, experts: int = 8, top_k: int = 2,
                    cf: float = 1.25) -> None:
    """The MoE layer's shape: --tokens --d_model --d_ff --experts --top_k --cf."""
    p.add_argument("--tokens", type=int, default=tokens)
    p.add_argument("--d_model", type=int, default=d_model)
    p.add_argument("--d_ff", type=int, default=d_ff)
    p.add_argument("--experts", type=int, default=experts)
    p.add_argument("--top_k", type=int, default=top_k)
    p.add_argument("--cf", type=float, default=cf, help="capacity factor")


def layer_config(a: argparse.Namespace, **kw) -> jmoe.MoEConfig:
    """The gelu MoEConfig of `add_layer_flags`' flags; `kw` sets other fields."""
    return jmoe.MoEConfig(d_model=a.d_model, d_ff=a.d_ff, num_experts=a.experts,
                          top_k=a.top_k, activation="gelu", capacity_factor=a.cf, **kw)


def layer_shape(a: argparse.Namespace) -> dict:
    """{"T", "D", "F", "E", "K", "cf"} of `add_layer_flags`' flags (JSON "shape")."""
    return {"T": a.tokens, "D": a.d_model, "F": a.d_ff, "E": a.experts, "K": a.top_k,
            "cf": a.cf}


def describe(**fields) -> str:
    """The line a benchmark prints before timing: `k=v k=v ...`."""
    return " ".join(f"{k}={v}" for k, v in fields.items())


# Timing.

def fwd_bwd(f: Callable, diff_args: int | None = None) -> Callable:
    """`jit(ct, *args) -> (f(*args), cotangents)`, the backward via `jax.vjp`.

    Pass every weight in `args` and a random `ct`: weights closed over become
    compile-time constants, and a constant cotangent (`jax.grad` of a sum)
    lets XLA fold part of a dense backward; both flatter the baseline.
    Differentiates the first `diff_args` args (default all); the rest, such as
    integer group sizes, are passed through as arguments.
    """
    @jax.jit
    def run(ct, *args):
        n = len(args) if diff_args is None else diff_args
        y, vjp = jax.vjp(lambda *diff: f(*diff, *args[n:]), *args[:n])
        return y, vjp(ct)
    return run


def sample_interleaved(rows: Rows, repeats: int,
                       log: Callable[[str], None] | None = _log) -> dict:
    """{name: {"wall": seconds, "cpu": process CPU seconds}}, one per round.

    Each round calls every `fn(*args)` once, so all see the same machine load;
    the first call (compile + run) is not counted. Process CPU time sums the
    threads and moves less than wall time when other jobs share the cores.
    `log=None` is silent.
    """
    log = log or (lambda _: None)
    for name, (fn, args) in rows.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        log(f"  compiled + first run {name!s:18s} {time.perf_counter() - t0:7.2f}s")
    wall = {name: [] for name in rows}
    cpu = {name: [] for name in rows}
    for r in range(repeats):
        for name, (fn, args) in rows.items():
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(*args))
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - t0)
        log(f"  round {r + 1}/{repeats} done")
    return {name: {"wall": np.array(wall[name]), "cpu": np.array(cpu[name])} for name in rows}


def time_interleaved(rows: Rows, repeats: int, log: Callable[[str], None] | None = _log) -> dict:
    """Median wall seconds per call of each row (see `sample_interleaved`)."""
    samples = sample_interleaved(rows, repeats, log)
    return {name: float(np.median(s["wall"])) for name, s in samples.items()}


def paired_ratio(samples: Mapping, name: Any, reference: Any, clock: str = "wall") -> float:
    """Median over rounds of `name`'s time / `reference`'s in the same round:
    load that comes and goes cancels. `clock` is "wall" or "cpu"."""
    return float(np.median(samples[name][clock] / samples[reference][clock]))


def ratio_rows(medians: Mapping[str, float], reference: str) -> list:
    """[{"name", "median_s", "ratio"}]: each median over `reference`'s."""
    ref = medians[reference]
    return [{"name": n, "median_s": m, "ratio": m / ref} for n, m in medians.items()]


def compare(rows: Rows, repeats: int, reference: str) -> list:
    """Times `rows` interleaved, prints the ratio table, returns `ratio_rows`."""
    table = ratio_rows(time_interleaved(rows, repeats), reference)
    print_table(table, reference)
    return table


# Tables and JSON.

def print_markdown(header: Sequence[str], rows: Iterable[Sequence]) -> None:
    """A markdown table after a blank line; cells are printed with str()."""
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


def print_table(rows: Sequence[Mapping], reference: str) -> None:
    """The table of `ratio_rows`: variant, median fwd+bwd, ratio."""
    print_markdown(["variant", "median fwd+bwd (s)", f"ratio to {reference}"],
                   [[r["name"], f"{r['median_s']:.4f}", f"{r['ratio']:.2f}x"] for r in rows])


def machine_info(backend: bool = True) -> dict:
    """What a result was measured on, for its JSON. `backend=False` leaves out
    the platform and device kind, for a launcher whose workers compute (asking
    would start a backend of its own)."""
    info = {}
    if backend:
        info.update(platform=jax.default_backend(), device_kind=jax.devices()[0].device_kind)
    info.update(machine=platform.machine(), host=platform.processor() or platform.machine(),
                cpu_count=os.cpu_count(), jax=jax.__version__)
    return info


def write_json(path: str | None, result: Mapping) -> None:
    """Writes `result` as indented JSON to `path` (folders made); no path, no file."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {path}")
