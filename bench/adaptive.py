"""Adaptive execution on 8 (virtual CPU) devices: fixed plans, the run-time
switch, the planner's static pick, and dynamic capacity.

    python bench/adaptive.py --json bench/results/adaptive.json

Trains a small GPT-MoE (2 layers, d=64, E=16 experts of 128, top-2, mesh
data=1 x expert=8, batch 32 x 64 tokens) with the trainer for `--steps`
steps, once per row, under two routings:

  balanced   sigmoid_topk router with a fast aux-loss-free bias update
             (bias_update_rate 0.05)
  skewed     softmax_topk router without load-balance loss (the routers
             drift to a busy expert); the busiest expert / mean each run
             reached (mean over its logged windows) is printed

Rows (dropless unless said):

  fixed: <plan>   each plan of the shortlist (`config.adaptive.plans`), fixed
  adaptive        `--config.adaptive.plans=N`: times each plan on real steps,
                  runs the fastest (re-timing every 50 steps)
  planner pick    the plan the planner predicts fastest (h100 profile; one of
                  the fixed rows, named above the table)
  capacity 0      capacity dispatch with `capacity_factor=0` (what each step
                  needs), the config's plan

Every row runs `--repeats` times, the rows taking turns (every other round
in reverse order); its step time is the median of its runs'.

Then the dynamic capacity's cost target on its own, without whole training
runs' noise: the trainer's MoE layer (the model's `MoEConfig`, 2048 tokens,
expert=8 mesh) forward and backward, dropless against capacity 0, timed
interleaved for `--layer_rounds` rounds (sigmoid_topk router; balanced: no
bias, skewed: a bias on expert 0 that gives it about 3.7x the mean load).
The ratio is the median over rounds of capacity 0's time / dropless's in
the same round (wall and process CPU time).

Columns: step time (median over the logged windows after the first, which
compiles; for the adaptive run, after its first timing round, which compiles
every plan and waits on each timed step: that warm-up is printed below the
table), its ratio to the best fixed plan of the routing, the dropped
fraction, the compiles counted after the warm-up (the adaptive row: train
steps compiled after its first timing round), and the final loss.

The 8 devices share the machine's cores: plans that overlap communication
with compute gain nothing here (XLA:CPU runs collectives synchronously), so
the comparison shows the switch's mechanics and overhead, not GPU gains.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import harness  # first: puts this checkout ahead of an installed jmoe

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

harness.setup(host_devices=8, platforms="cpu")  # before the first computation
import jmoe  # noqa: E402
from jmoe.sharding import make_mesh  # noqa: E402
from jmoe.train import cli, loop, plans  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = {"model.d_model": 64, "model.num_layers": 2, "model.num_heads": 4,
         "model.num_experts": 16, "model.top_k": 2, "model.d_ff": 128,
         "model.group_align": 8, "data.seq_len": 64, "batch_size": 32,
         "mesh.data": 1, "mesh.expert": 8, "log_every": 10, "eval_batches": 1}
ROUTINGS = {
    "balanced": {"model.router": "sigmoid_topk", "model.bias_update_rate": 0.05},
    "skewed": {"model.router": "softmax_topk", "loss.load_balance_weight": 0.0},
}


def _config(steps: int, **overrides):
    o = {**MODEL, "total_steps": steps, "eval_every": steps, "checkpoint_every": steps,
         "opt.schedule_steps": steps, **overrides}
    return cli.load_config(os.path.join(ROOT, "configs", "gpt_moe.py"), overrides=o)


def _run(config, workdir: str, counter: dict) -> dict:
    counter.update(warm=False, after=0)
    loop.run(config, workdir)
    recs = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [r for r in recs if r["split"] == "train"]
    rounds = [r for r in recs if r["split"] == "adaptive"]
    # Steady state: windows after the first (which compiles) and, for the
    # adaptive run, after its first timing round (which compiles every plan
    # and waits on each timed step); the warm-up is reported on its own.
    warm = rounds[0]["step"] if rounds else 0
    times = [r["step_time_s"] for r in train[1:] if "step_time_s" in r and r["step"] > warm + 1]
    warmup = [r["step_time_s"] for r in train[1:] if "step_time_s" in r and r["step"] <= warm + 1]
    loads = np.array([r["expert_load"] for r in train])
    return {"step_s": statistics.median(times),
            "warmup_step_s": statistics.median(warmup) if warmup else None,
            "dropped": float(np.mean([np.mean(r["dropped_fraction"]) for r in train])),
            "busiest_expert": float(loads.max(axis=-1).mean() * loads.shape[-1]),
            "loss": train[-1]["loss"], "compiles_after_warmup": counter["after"],
            "rounds": rounds}


def _busiest_over_mean(cfg, params, x_TD, bias) -> float:
    """The busiest expert's load / the mean under this routing of `x_TD`."""
    r = jmoe.routing.route(jmoe.routing.router_logits(x_TD, params["router"]["w_DE"]), cfg, bias)
    counts = np.asarray(jmoe.routing.expert_counts(r.experts_TK, cfg.num_experts))
    return float(counts.max() / counts.mean())


def _skew_bias(cfg, params, x_TD, target: float) -> jax.Array:
    """A selection bias on expert 0 that gives it about `target` times the
    mean load on these tokens (bisection over the bias)."""
    bias = lambda b: jnp.zeros((cfg.num_experts,)).at[0].set(b)
    lo, hi = 0.0, 4.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if _busiest_over_mean(cfg, params, x_TD, bias(mid)) < target:
            lo = mid
        else:
            hi = mid
    return bias(hi)


def layer_cost(moe, mesh, rounds: int) -> dict:
    """{routing: {busiest/mean, ms per call, capacity-0 / dropless ratios}}:
    the layer's forward and backward, dropless against capacity 0, timed
    interleaved."""
    cfg_dl = dataclasses.replace(moe, dispatch="dropless", router="sigmoid_topk")
    cfg_c0 = dataclasses.replace(cfg_dl, dispatch="capacity", capacity_factor=0.0)
    t = int(MODEL["batch_size"]) * int(MODEL["data.seq_len"])
    params = jmoe.init_params(jax.random.key(0), cfg_dl)
    x = jax.random.normal(jax.random.key(1), (t, cfg_dl.d_model))
    ct = jax.random.normal(jax.random.key(2), x.shape)
    out = {}
    for routing, target in (("balanced", None), ("skewed", 3.7)):
        bias = (jnp.zeros((cfg_dl.num_experts,)) if target is None
                else _skew_bias(cfg_dl, params, x, target))
        skew = _busiest_over_mean(cfg_dl, params, x, bias)
        rows = {name: (harness.fwd_bwd(lambda p, x, c=c: jmoe.moe_apply(
                    p, x, c, bias=bias, mesh=mesh)[0]), (ct, params, x))
                for name, c in (("dropless", cfg_dl), ("capacity 0", cfg_c0))}
        print(f"\n[layer, {routing}] {rounds} interleaved rounds", flush=True)
        samples = harness.sample_interleaved(rows, rounds, log=None)
        out[routing] = {
            "busiest_expert": float(skew),
            "ms": {k: 1e3 * float(np.median(v["wall"])) for k, v in samples.items()},
            "ratio_wall": harness.paired_ratio(samples, "capacity 0", "dropless", "wall"),
            "ratio_cpu": harness.paired_ratio(samples, "capacity 0", "dropless", "cpu")}
    return out


def main(argv=None):
    p = harness.parser(__doc__, repeats=1, quick=dict(steps=30, layer_rounds=10))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--plans", type=int, default=4)
    p.add_argument("--layer_rounds", type=int, default=60)
    a = p.parse_args(argv)
    # Train steps compiled after the adaptive run's first timing round.
    counter = {"warm": False, "after": 0, "in_train": False}

    def on_event(event, duration, **kw):
        if (event == "/jax/core/compile/backend_compile_duration" and counter["in_train"]
                and counter["warm"]):
            counter["after"] += 1
    jax.monitoring.register_event_duration_secs_listener(on_event)
    inner = plans.AdaptiveSteps.train

    def counted(self, *args):
        counter["in_train"] = True
        try:
            return inner(self, *args)
        finally:
            counter["in_train"] = False
            counter["warm"] = bool(self.switch.choices)
    plans.AdaptiveSteps.train = counted

    t0, load_before = time.perf_counter(), os.getloadavg()
    results = {}
    tmp = tempfile.mkdtemp(prefix="jmoe_adaptive_")
    for routing, extra in ROUTINGS.items():
        base = _config(a.steps, **extra)
        gpt = loop.validate_config(base)
        mesh = make_mesh(base.mesh, owner="config.mesh")
        predicted = {}
        shortlist = plans.shortlist(plans.AdaptiveConfig(plans=a.plans), gpt, base, mesh,
                                    predicted=predicted)
        rows, jobs = {}, {}
        for name, g in shortlist.items():
            ex = g.moe.execution
            jobs[f"fixed: {name}"] = _config(a.steps, **extra, **{
                "execution.overlap_chunks": ex.overlap_chunks,
                "execution.a2a_hierarchy": ex.a2a_hierarchy,
                "execution.ep_buckets": ex.ep_buckets,
                "execution.shadow_experts": ex.shadow_experts})
        jobs["adaptive"] = _config(a.steps, **extra, **{
            "adaptive.plans": a.plans, "adaptive.retime_every": 50})
        jobs["capacity 0"] = _config(a.steps, **extra, **{
            "model.dispatch": "capacity", "model.capacity_factor": 0.0})
        # Rows take turns, `--repeats` rounds, every other round in reverse
        # order (A B C, C B A): a drift in the machine's or the process's
        # speed then hits every row alike; a row's time is the median of its
        # runs' steady-state medians.
        runs = {k: [] for k in jobs}
        for rep in range(a.repeats):
            for k, cfg in (list(jobs.items()) if rep % 2 == 0 else list(jobs.items())[::-1]):
                print(f"\n[{routing}] {k} (run {rep + 1} of {a.repeats})", flush=True)
                runs[k].append(_run(cfg, os.path.join(tmp, f"{routing}_{len(runs[k])}_"
                                                      f"{list(jobs).index(k)}"), counter))
        for k, rs in runs.items():
            rows[k] = dict(rs[-1], step_s=statistics.median(r["step_s"] for r in rs),
                           step_s_runs=[r["step_s"] for r in rs],
                           compiles_after_warmup=max(r["compiles_after_warmup"] for r in rs))
        pick = min(predicted, key=predicted.get)
        results[routing] = {"rows": rows, "plans": list(shortlist), "predicted_s": predicted,
                            "planner_pick": f"fixed: {pick}"}
    base = _config(a.steps)
    layer = layer_cost(loop.validate_config(base).moe, make_mesh(base.mesh, owner="config.mesh"),
                       a.layer_rounds)
    load_after = os.getloadavg()
    for routing, res in results.items():
        rows = res["rows"]
        best = min(v["step_s"] for k, v in rows.items() if k.startswith("fixed"))
        print(f"\n{routing} routing ({a.steps} steps; planner pick: {res['planner_pick']})\n")
        harness.print_markdown(
            ["row", "step ms", "vs best fixed", "dropped", "busiest expert / mean",
             "compiles after warm-up", "final loss"],
            [[k, f"{1e3 * v['step_s']:.1f}", f"{v['step_s'] / best:.3f}x",
              f"{100 * v['dropped']:.2f}%", f"{v['busiest_expert']:.2f}",
              str(v["compiles_after_warmup"]) if k == "adaptive" else "-", f"{v['loss']:.4f}"]
             for k, v in rows.items()])
        first = f"fixed: {res['plans'][0]}"
        print(f"- capacity 0 vs the same plan dropless ({first}): "
              f"{rows['capacity 0']['step_s'] / rows[first]['step_s']:.3f}x")
        for r in rows["adaptive"]["rounds"]:
            print(f"- adaptive timing round ending at step {r['step']}: chose {r['chosen']}")
        w = rows["adaptive"]["warmup_step_s"]
        if w is not None:
            print(f"- adaptive warm-up windows (compiling and timing every plan): "
                  f"{1e3 * w:.1f} ms per step")
    print(f"\nthe MoE layer alone, forward + backward ({a.layer_rounds} interleaved rounds)\n")
    harness.print_markdown(
        ["routing", "busiest expert / mean", "dropless ms", "capacity 0 ms",
         "capacity 0 / dropless (wall)", "(CPU time)"],
        [[k, f"{v['busiest_expert']:.2f}", f"{v['ms']['dropless']:.2f}",
          f"{v['ms']['capacity 0']:.2f}", f"{v['ratio_wall']:.3f}x", f"{v['ratio_cpu']:.3f}x"]
         for k, v in layer.items()])
    print(f"\ntotal {time.perf_counter() - t0:.0f}s; 1-minute load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after")
    harness.write_json(a.json, {**harness.machine_info(), "steps": a.steps, "model": MODEL,
                                "results": results, "layer": layer,
                                "load_average_1min": [load_before[0], load_after[0]],
                                "seconds": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
