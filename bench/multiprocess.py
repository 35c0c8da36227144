"""Train-step time of 2 processes x 4 CPU devices against 1 process x 8 devices.

    python bench/multiprocess.py --json bench/results/multiprocess.json

The same jitted train step of the GPT-MoE trainer runs on the same 8 CPU
devices, laid out two ways, for two models (`MODELS`, changed further with
`--set field=value`):

  small  configs/gpt_moe.py's default (d=256, 8 experts of 256, top-2,
         dropless) cut to 2 layers and 16 x 128 tokens per step: compute-bound
         on a CPU (one layer of the full default with expert=8 took 8.5 s per
         step and 6.7 GB of memory on this 2-core machine);
  tiny   1 layer, d=32, 16 x 32 tokens: almost no compute, so the step time
         is the collectives' latency.

The layouts:

  1x8  one process with 8 devices: collectives stay inside XLA:CPU;
  2x4  two processes with 4 devices each, started the way `srun` starts
       tasks (emulated SLURM variables, `jmoe.runtime.distributed`): every
       collective that crosses the process boundary goes through gloo over
       TCP loopback.

for two meshes: `data=1, expert=8` (expert parallelism across the processes:
all-to-alls of the MoE layers cross them) and `data=8, expert=1` (pure data
parallelism: only the gradient all-reduce crosses them). The two layouts of a
mesh alternate, round by round, so load from other work on a shared machine
hits both alike; each launch compiles, runs 2 warm-up steps, then times
`--steps` steps, waiting for each step's loss; the median step of a launch,
then the median over rounds, counts.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import numpy as np

import harness
from harness import ROOT
from jmoe import model as model_lib
from jmoe.runtime import distributed as dist
from jmoe.sharding import make_mesh
from jmoe.train import data, loop, mesh as mesh_lib, step as step_lib
from jmoe.train.cli import load_config

LAYOUTS = {"1x8": (1, 8), "2x4": (2, 4)}  # processes x devices per process
MESHES = {"expert8": {"mesh.data": 1, "mesh.expert": 8},
          "data8": {"mesh.data": 8, "mesh.expert": 1}}
MODELS = {
    "small": ["model.num_layers=2", "data.seq_len=128", "batch_size=16"],
    "tiny": ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.d_ff=32",
             "model.group_align=8", "data.seq_len=32", "batch_size=16"],
}


def parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, text = item.partition("=")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


def worker(args) -> None:
    """One process of a layout: join the job, build the trainer's step, time it."""
    dist.initialize()  # emulated SLURM (2x4) or a single process (1x8); before any backend
    config = load_config(os.path.join(ROOT, "configs", "gpt_moe.py"),
                         overrides=parse_sets(args.set))
    gpt = loop.validate_config(config)
    mesh = make_mesh(config.mesh, owner="config.mesh")
    loop.validate_mesh(config, gpt, mesh)
    tx = step_lib.make_optimizer(config.opt, config.total_steps)
    schedule = step_lib.make_schedule(config.opt, config.total_steps)
    init = step_lib.make_init(gpt, tx, config.seed)
    shardings = mesh_lib.state_shardings(mesh, jax.eval_shape(init))
    bsh = mesh_lib.batch_sharding(mesh)
    b, t = config.batch_size, config.data.seq_len
    corpus = data.load_corpus(config.data, gpt.vocab_size)
    # Each process reads only its rows of the global batch, as in training.
    it = data.train_iterator(corpus.train, seq_len=t, global_batch=b, seed=config.seed,
                             local_rows=data.local_rows(bsh, b, t))
    batches = [data.to_global(next(it), bsh, b) for _ in range(4)]
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        state = model_lib.compile_init(jax.jit(init, out_shardings=shardings))()
        train_fn, _ = step_lib.jit_steps(shardings, bsh, step_lib.graphdef_of(gpt), tx,
                                         schedule, step_lib.step_config(config))
        for i in range(2):  # compile + warm-up
            state, m = train_fn(state, batches[i % 4])
            jax.device_get(m["loss"])
        compile_s = time.perf_counter() - t0
        times = []
        for i in range(args.steps):
            t1 = time.perf_counter()
            state, m = train_fn(state, batches[i % 4])
            jax.device_get(m["loss"])
            times.append(time.perf_counter() - t1)
    if jax.process_index() == 0:
        print("RESULT " + json.dumps({
            "step_s": float(np.median(times)), "compile_s": compile_s,
            "processes": jax.process_count(), "devices": jax.device_count(),
            "tokens_per_step": b * t}), flush=True)


def launch(layout: str, sets: list[str], steps: int, timeout: float) -> dict:
    import portpicker

    nproc, ndev = LAYOUTS[layout]
    port = portpicker.pick_unused_port()
    procs = []
    for i in range(nproc):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "JAX_COORDINATOR"))}
        env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={ndev}",
                   JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
        if nproc > 1:  # what srun gives each task (one node, `nproc` tasks)
            env.update(SLURM_JOB_ID="1", SLURM_STEP_NODELIST="localhost",
                       SLURM_NTASKS=str(nproc), SLURM_PROCID=str(i), SLURM_LOCALID=str(i),
                       SLURM_NODEID="0", SLURM_STEP_TASKS_PER_NODE=str(nproc),
                       JAX_COORDINATOR_PORT=str(port))
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--steps", str(steps)]
        cmd += [a for s in sets for a in ("--set", s)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"{layout} worker failed ({p.returncode}):\n{out[-3000:]}")
    line = next(l for l in outs[0].splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--steps", type=int, default=5, help="Timed steps per launch.")
    ap.add_argument("--rounds", type=int, default=2, help="Alternating launches per layout.")
    ap.add_argument("--set", action="append", default=[],
                    help="Config override field=value (repeatable), e.g. model.num_layers=2.")
    ap.add_argument("--meshes", default=",".join(MESHES), help="Subset of " + ",".join(MESHES))
    ap.add_argument("--models", default=",".join(MODELS), help="Subset of " + ",".join(MODELS))
    ap.add_argument("--timeout", type=float, default=900, help="Seconds per launch.")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    results = {}
    for model in args.models.split(","):
        for mesh_name in args.meshes.split(","):
            name = f"{model}/{mesh_name}"
            sets = ([f"{k}={v}" for k, v in MESHES[mesh_name].items()] + MODELS[model]
                    + args.set)
            runs = {layout: [] for layout in LAYOUTS}
            for r in range(args.rounds):
                for layout in LAYOUTS:
                    res = launch(layout, sets, args.steps, args.timeout)
                    runs[layout].append(res)
                    print(f"  {name} {layout} round {r + 1}: step {res['step_s']:.4f}s "
                          f"(compile {res['compile_s']:.1f}s)", flush=True)
            row = {layout: {"step_s": statistics.median(x["step_s"] for x in rs),
                            "rounds_step_s": [x["step_s"] for x in rs]}
                   for layout, rs in runs.items()}
            row.update(overrides=sets, tokens_per_step=runs["1x8"][0]["tokens_per_step"],
                       ratio_2x4_over_1x8=row["2x4"]["step_s"] / row["1x8"]["step_s"])
            results[name] = row

    table = []
    for name, r in results.items():
        model, mesh_name = name.split("/")
        mesh = ", ".join(f"{k.split('.')[1]}={v}" for k, v in MESHES[mesh_name].items())
        table.append([f"{model} / {mesh}", f"{r['1x8']['step_s']:.4f}",
                      f"{r['2x4']['step_s']:.4f}", f"{r['ratio_2x4_over_1x8']:.2f}x"])
    harness.print_markdown(["model / mesh", "1 process x 8 devices: step (s)",
                            "2 processes x 4 devices: step (s)", "ratio 2x4 / 1x8"], table)
    harness.write_json(args.json, {
        "what": "median train-step time (s), same 8 CPU devices as 1 process x 8 or "
                "2 processes x 4 (gloo over loopback)",
        # The workers computed; this process never starts a backend.
        **harness.machine_info(backend=False),
        "steps": args.steps, "rounds": args.rounds, "results": results})


if __name__ == "__main__":
    main()
