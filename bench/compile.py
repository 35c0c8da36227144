"""Compile time and memory of the train step against depth, scanned and unscanned.

    python bench/compile.py --json bench/results/compile.json
    python bench/compile.py --layers 4,8 --steps 1          # quicker

For 4, 8, 16 and 32 layers of the default config's width (configs/gpt_moe.py:
d=256, 16 experts of d_ff 256, top-2, seq 256, batch 32), with
`model.scan_layers` off and on, each in a fresh process on one device:

  compile (s)     lowering + XLA compilation of the trainer's train step
                  (jmoe.train.compile_report.compile_step)
  compile MB      peak compile memory: how far the compile raised the
                  process's peak RSS above its peak before it
  XLA MB          XLA's memory analysis of the compiled step, per device:
                  arguments + outputs - donated + temporaries
  planner MB      the planner's prediction (state + activations,
                  jmoe.planner.step_cost), and its ratio to XLA's
  step (s)        median train step time (--steps steps after one warm-up)

Targets (issue 17): the scanned 32-layer step compiles in at most 1.5x the
scanned 4-layer time (unscanned grows about linearly); step time scanned
within 5% of unscanned; the memory prediction within 20% of XLA's.
Each configuration runs in its own process (peak RSS is per process), one
after the other: on a shared machine their times see different loads.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import resource
import subprocess
import sys
import time

import harness  # first: puts this checkout's jmoe ahead of an installed one

SCRIPT = os.path.abspath(__file__)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KB


def measure_one(layers: int, scan: bool, steps: int, overrides: dict) -> dict:
    """Compile (and time) the default config's train step at `layers` layers."""
    harness.setup(host_devices=1, platforms="cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jmoe import model as model_lib
    from jmoe.planner.hardware import get as get_hardware
    from jmoe.planner.step_cost import Setting, step_cost
    from jmoe.sharding import make_mesh
    from jmoe.train import cli, compile_report, loop, mesh as mesh_lib, step as step_lib

    config = cli.load_config(os.path.join(harness.ROOT, "configs", "gpt_moe.py"),
                             overrides={"model.num_layers": layers, "model.scan_layers": scan,
                                        "mesh.data": 1, **overrides})
    gpt = loop.validate_config(config)
    mesh = make_mesh(config.mesh, owner="config.mesh")
    tx = step_lib.make_optimizer(config.opt, config.total_steps)
    sched = step_lib.make_schedule(config.opt, config.total_steps)
    init = step_lib.make_init(gpt, tx, config.seed)
    shard = mesh_lib.state_shardings(mesh, jax.eval_shape(init))
    bsh = mesh_lib.batch_sharding(mesh)
    b, t = config.batch_size, config.data.seq_len
    with jax.set_mesh(mesh):
        train, _ = step_lib.jit_steps(shard, bsh, step_lib.graphdef_of(gpt), tx, sched,
                                      step_lib.step_config(config))
        # Compiled first, for abstract arguments, in a fresh process: after
        # the initialiser's own (per-layer) compile, the scanned 32-layer
        # step's compile took about 2x as long (measured twice; cause not found).
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                jax.eval_shape(init), shard)
        rss0 = _rss_mb()
        _, report = compile_report.compile_step(
            train, abstract, jax.ShapeDtypeStruct((b, t + 1), jnp.int32, sharding=bsh))
        compile_mb = _rss_mb() - rss0
        state = model_lib.compile_init(jax.jit(init, out_shardings=shard))()
        batch = jax.device_put(np.random.default_rng(0).integers(
            0, gpt.vocab_size, (b, t + 1), np.int32), bsh)
        times = []
        for i in range(steps + 1 if steps else 0):  # the first call: warm-up
            t0 = time.perf_counter()
            state, m = train(state, batch)
            jax.block_until_ready((state, m))
            if i:
                times.append(time.perf_counter() - t0)
    setting = Setting(1, gpt.moe.dispatch, gpt.moe.capacity_factor, 1, 0, 0.0,
                      config.grad_accum_steps, False)
    mem = step_cost(gpt, setting, seq_len=t, batch_size=b, devices=1, hw=get_hardware("h100"),
                    backend="cpu").memory
    return {"layers": layers, "scan_layers": scan, **report.as_dict(),
            "compile_rss_mb": compile_mb, "planner_bytes": mem["total"],
            "planner_state_bytes": mem["state"], "planner_activation_bytes": mem["activations"],
            "planner_over_xla": mem["total"] / report.peak_bytes,
            "step_s": float(np.median(times)) if times else None, "steps": steps}


def main(argv=None) -> int:
    p = harness.parser(__doc__)
    p.add_argument("--layers", default="4,8,16,32", help="comma list of depths")
    p.add_argument("--steps", type=int, default=3, help="timed train steps (0: none)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="config override, e.g. --set batch_size=8 (repeatable)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child's configuration
    a = p.parse_args(argv)
    overrides = {k: _value(v) for k, v in (kv.split("=", 1) for kv in a.set)}
    if a.one:  # a child: one configuration, its result as one JSON line
        layers, scan = a.one.split(",")
        print("RESULT " + json.dumps(measure_one(int(layers), scan == "1", a.steps, overrides)),
              flush=True)
        return 0

    rows, failed = [], []
    for layers in (int(v) for v in a.layers.split(",")):
        for scan in (False, True):
            cmd = [sys.executable, SCRIPT, "--one", f"{layers},{int(scan)}", "--steps",
                   str(a.steps)] + [f"--set={kv}" for kv in a.set]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode or not line:
                # Carry on with the other depths (a 32-layer step needs ~12 GB;
                # on a shared machine the kernel's OOM killer may take it).
                print(f"  layers={layers} scan={scan}: failed, exit status {proc.returncode}"
                      + (" (killed: out of memory?)" if proc.returncode == -9 else ""),
                      proc.stdout[-2000:] + proc.stderr[-4000:], file=sys.stderr, flush=True)
                failed.append({"layers": layers, "scan_layers": scan,
                               "returncode": proc.returncode})
                continue
            r = json.loads(line[0][len("RESULT "):])
            r["process_s"] = time.perf_counter() - t0
            rows.append(r)
            # Written after every configuration: a long run keeps what it measured.
            harness.write_json(a.json, {**harness.machine_info(backend=False),
                                        "overrides": overrides, "steps": a.steps, "rows": rows,
                                        "failed": failed})
            print(f"  layers={layers} scan={scan}: compile {r['compile_s']:.1f} s, "
                  f"process {r['process_s']:.0f} s", flush=True)

    by = {(r["layers"], r["scan_layers"]): r for r in rows}
    mb = lambda n: f"{n / 2**20:,.0f}"
    table = []
    for r in rows:
        base = by.get((min(by)[0], r["scan_layers"]), r)
        unscanned = by.get((r["layers"], False), {"step_s": None})
        table.append([r["layers"], "scan" if r["scan_layers"] else "unrolled",
                      f"{r['lower_s'] + r['compile_s']:.1f}",
                      f"{(r['lower_s'] + r['compile_s']) / (base['lower_s'] + base['compile_s']):.2f}x",
                      f"{r['compile_rss_mb']:,.0f}", mb(r["peak_bytes"]), mb(r["temp_bytes"]),
                      mb(r["planner_bytes"]), f"{r['planner_over_xla']:.2f}",
                      "" if r["step_s"] is None else f"{r['step_s']:.3f}",
                      "" if r["step_s"] is None or unscanned["step_s"] is None
                      else f"{r['step_s'] / unscanned['step_s']:.3f}"])
    harness.print_markdown(
        ["layers", "blocks", "lower+compile (s)", f"x {min(by)[0]} layers", "compile MB",
         "XLA MB", "XLA temp MB", "planner MB", "planner / XLA", "step (s)", "step / unrolled"],
        table)
    harness.write_json(a.json, {**harness.machine_info(backend=False), "overrides": overrides,
                                "steps": a.steps, "rows": rows, "failed": failed})
    return 1 if failed else 0


def _value(text: str):
    """A --set value as Python: true/false, numbers and tuples literally, else the string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


if __name__ == "__main__":
    sys.exit(main())
