"""Load-aware expert placement on 8 (virtual CPU) devices under a skewed router.

    python bench/placement.py --json bench/results/placement.json

For each E (default 16 and 64; mesh data=1 x expert=8, K=2, sigmoid_topk
router) and each routing:

  balanced   a selection bias tuned until every expert gets the same rows
  2x, 3x     that bias plus `s * g_E` (g_E a fixed standard-normal vector),
             `s` bisected until the busiest expert / mean hits 2x / 3x; the
             skew achieved is printed

the rows are layouts of the same layer (the same function, forward and
gradients):

  static         no placement: expert e on device e // (E/8)
  static, placed path  `placement=Placement.static(E, 8).as_arrays()` with the
                 weights in slot order (`params["slots"]`): the static layout
                 through the placed code path, so its time is the cost of
                 that path (rows assigned to replicas) with no change of balance
  re-placed      `jmoe.balance.balance(load_E, 8, E/8)`: R = 0 redundant
                 slots, weights in slot order
  re-placed+R=4  `balance(load_E, 8, E/8 + 1, replicas=4)`: one spare slot per
                 device, of which 4 may carry rows (the other 4 are idle: a
                 share-0 copy; every device has the same slot count)
  re-placed+R=8  `balance(load_E, 8, E/8 + 1)`: one spare slot per device,
                 weights in slot order (replicas tied: their gradients summed)
  re-placed+R=16 `balance(load_E, 8, E/8 + 2)`: two spare slots per device
                 (for the capacity columns: 8 replicas do not reach every
                 expert above 1.25x the mean at E=64)
  re-placed+R=8, gathered  the same placement with the weights left in
                 logical order, gathered into slot order on every call (an
                 all-gather of every expert and an all-reduce of their
                 gradients): the path that slot-ordered storage replaces
  shadowed s=1/2 static layout with `Execution.shadow_experts=s` (FasterMoE):
                 the step's s hottest experts computed on every device for its
                 own tokens; dropless only, so no capacity columns

all chosen from the loads MEASURED on this batch (`aux.expert_load` of the
static layer).
Recorded loads (`--recorded`, default bench/fixtures/default_run_expert_load.jsonl:
the per-layer `expert_load` the default training run logged every 10 steps):
busiest device / mean of each layer, static and under online re-placement
replayed on the windows (`jmoe.planner.placement_search`: R = 0 and R = 8 at
N = 10 and 50 steps, shadow experts s = 1, 2), mean over windows and layers;
and the planner's predicted step time on 8 x H100 and 4 x 8 H100 for the
`mixtral_8x7b` and `deepseek` variants (their configs' plans) under those
loads, static against the best option (loads mapped onto the variants as
`python -m jmoe.plan --load` maps them).

A move (`--move`, on by default): the trainer's re-placement step
(`jmoe.train.rebalance.reindex_experts`) on one layer's expert weights and
two Adam moments in slot order, from the placement of the 2x routing to that
of the 3x routing, timed against the balanced static layer's forward+backward.

Columns:
  busiest device / mean   rows each device computes, from
                          `Placement.device_loads(measured loads)`
                          (`Placement.static` for the static row)
  dropped, cf 1.0 / 1.25  `aux.dropped_fraction` of the capacity layer (each
                          slot holds one expert's capacity ceil(cf*T*K/E)
                          per token shard, so replicas add capacity)
  dropped, cf 1.25 batch  the same with `capacity_scope='batch'`: the
                          capacity counts over the whole batch, as on one
                          device (no per-shard overflow)
  exchange rows / min     dropless rows a device sends to other devices
                          (the ragged all-to-all of GPUs), mean over devices,
                          against the analytic minimum T_local*K*(ep-1)/ep of
                          uniform routing; computed from the routing and the
                          placement's split rule, not timed
  CPU bucket              the dense emulation's exchange bucket the mesh
                          takes (`Execution.ep_buckets`: 1.5x, 3x the balanced
                          pair, else the worst case), which sizes XLA:CPU's
                          buffers
  fwd+bwd vs balanced     dropless forward+backward (`jax.vjp`, random
                          cotangent, weights as arguments), median over
                          interleaved rounds of its time / the balanced
                          static layer's in the same round

The 8 devices share the machine's cores, so a CPU time follows the total
work (and the bucket), not the busiest device: time differences here
understate what balance gains on GPUs, where the step waits for the busiest
device.
"""

from __future__ import annotations

import argparse
import os
import time

import harness  # first: puts this checkout ahead of an installed jmoe

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

harness.setup(host_devices=8, platforms="cpu")  # before the first computation
import jmoe  # noqa: E402
from jmoe import routing  # noqa: E402
from jmoe.balance import balance  # noqa: E402
from jmoe.layer import place_assignments  # noqa: E402
from jmoe.placement import Placement, move_source, to_slots  # noqa: E402
from jmoe.sharding import make_mesh, moe_shardings  # noqa: E402

EP = 8
LAYOUTS = ("static", "static, placed path", "re-placed", "re-placed+R=4", "re-placed+R=8",
           "re-placed+R=16", "re-placed+R=8, gathered", "shadowed s=1", "shadowed s=2")
SHADOWS = {"shadowed s=1": 1, "shadowed s=2": 2}
GATHERED = "re-placed+R=8, gathered"
NOTES = [
    "R = ep/2 = 4: every device has the same number of slots S, so 4 of the 8 "
    "spare slots are idle (a share-0 copy of an expert on the same device).",
    "Placed rows keep the weights in slot order (params['slots']) except the "
    "'gathered' row, which gathers logical-order weights into slots on every call.",
    "8 virtual devices share the CPU's cores: times follow the total work and the "
    "exchange bucket, not the busiest device, so they understate GPU gains.",
]


# Routing: a balanced bias, and skew on top of it.

def count_fn(cfg, params, x_TD):
    """jit(bias_E) -> int32 [E] assignments per expert on the whole batch."""
    logits_TE = routing.router_logits(x_TD, params["router"]["w_DE"])

    @jax.jit
    def counts(bias_E):
        r = routing.route(logits_TE, cfg, bias_E)
        return routing.expert_counts(r.experts_TK, cfg.num_experts)
    return lambda b: np.asarray(counts(jnp.asarray(b, jnp.float32)))


def balanced_bias(counts, num_experts: int, steps: int = 300) -> np.ndarray:
    """A selection bias under which the experts' loads are (nearly) equal:
    proportional steps against each expert's excess, shrinking geometrically."""
    b = np.zeros(num_experts)
    best, best_ratio = b.copy(), np.inf
    for i in range(steps):
        c = counts(b)
        ratio = c.max() / c.mean()
        if ratio < best_ratio:
            best, best_ratio = b.copy(), ratio
        if ratio == 1.0:
            break
        b = b + 0.05 * 0.98 ** i * (c.mean() - c) / c.mean()
    return best


def skewed_bias(counts, base: np.ndarray, pattern: np.ndarray, target: float,
                steps: int = 40) -> tuple:
    """(bias, achieved busiest / mean): `base + s * pattern` with `s`
    bisected until the busiest expert carries `target` x the mean."""
    def skew(s):
        c = counts(base + s * pattern)
        return float(c.max() / c.mean())
    lo, hi = 0.0, 0.05
    while skew(hi) < target:
        lo, hi = hi, 2 * hi
    best = hi
    for _ in range(steps):
        mid = (lo + hi) / 2
        r = skew(mid)
        if abs(r - target) < abs(skew(best) - target):
            best = mid
        if abs(r - target) < 1e-3:
            break
        lo, hi = (mid, hi) if r < target else (lo, mid)
    return base + best * pattern, skew(best)


# The exchange a placement implies (host side, from the routing).

def exchange(cfg, experts_TK: np.ndarray, place: Placement) -> dict:
    """Rows each device sends off-device per dropless exchange (the ragged
    all-to-all), mean over devices, against T_local*K*(ep-1)/ep; the bucket
    the dense emulation takes; rows each device computes (the integer split
    per source shard, as the layer does it)."""
    arrays, s = place.as_arrays(), place.slots_per_device
    return _pair_stats(cfg, experts_TK, lambda src, mine_TK: np.asarray(
        place_assignments(jnp.asarray(mine_TK), arrays)).reshape(-1) // s)


def exchange_shadowed(cfg, experts_TK: np.ndarray, shadows: int) -> dict:
    """`exchange` for shadow experts on the static layout: the batch's
    `shadows` most-assigned experts stay on each source device, the rest go
    to their owners (expert e on device e // (E/ep))."""
    el = cfg.num_experts // EP
    counts = np.bincount(experts_TK.reshape(-1), minlength=cfg.num_experts)
    hot = np.argsort(-counts, kind="stable")[:shadows]
    return _pair_stats(cfg, experts_TK, lambda src, mine_TK: np.where(
        np.isin(mine_TK, hot), src, mine_TK // el).reshape(-1))


def _pair_stats(cfg, experts_TK: np.ndarray, dest_of) -> dict:
    """The exchange's statistics when `dest_of(src, experts_TK of src's
    shard)` gives the device of each of its assignments."""
    t_local = experts_TK.shape[0] // EP
    a_local = t_local * cfg.top_k
    sent, pair_PP = [], np.zeros((EP, EP), np.int64)
    for src in range(EP):
        dest = dest_of(src, experts_TK[src * t_local:(src + 1) * t_local])
        pair_PP[src] = np.bincount(dest, minlength=EP)
        sent.append(int(np.sum(dest != src)))
    minimum = a_local * (EP - 1) / EP
    busiest_pair = int(pair_PP.max())
    slots = cfg.ep_bucket_slots(a_local, EP)
    factors = [f for f, slot in zip(cfg.execution.ep_buckets, slots) if slot >= busiest_pair]
    rows_P = pair_PP.sum(axis=0)
    return {"ragged_rows": float(np.mean(sent)), "analytic_min_rows": minimum,
            "ragged_vs_min": float(np.mean(sent)) / minimum,
            "busiest_pair_rows": busiest_pair,
            "cpu_bucket": f"{factors[0]}x" if factors else "worst case",
            "device_rows_split": rows_P.tolist(),
            "busiest_device_split": float(rows_P.max() / rows_P.mean())}


# The layer, static and placed.

def fwd_bwd_fns(cfg, mesh) -> dict:
    """{layout: fwd+bwd jit}: one per slot count, reused across routings (a
    placement is data, so another placement of the same sizes reuses it)."""
    static = lambda c: lambda x, p, b: jmoe.moe_apply(p, x, c, bias=b, mesh=mesh)[0]
    placed = lambda x, p, b, arr: jmoe.moe_apply(p, x, cfg, bias=b, mesh=mesh, placement=arr)[0]
    same_slots = harness.fwd_bwd(placed, diff_args=2)
    spare = harness.fwd_bwd(placed, diff_args=2)
    fns = {"static": harness.fwd_bwd(static(cfg), diff_args=2),
           "static, placed path": same_slots, "re-placed": same_slots,
           "re-placed+R=4": spare, "re-placed+R=8": spare,
           "re-placed+R=16": harness.fwd_bwd(placed, diff_args=2),
           GATHERED: harness.fwd_bwd(placed, diff_args=2)}
    for layout, s in SHADOWS.items():
        fns[layout] = harness.fwd_bwd(static(cfg.with_execution(shadow_experts=s)), diff_args=2)
    return fns


def capacity_fns(cfg, mesh, cf: float, scope: str = "shard") -> dict:
    """{layout: jit(x, params, bias[, arrays]) -> (dropped_fraction, expert_load)}."""
    cap = cfg.replace(dispatch="capacity", capacity_factor=cf, capacity_scope=scope)

    def stats(aux):
        return aux.dropped_fraction, aux.expert_load
    static = jax.jit(lambda x, p, b: stats(jmoe.moe_apply(p, x, cap, bias=b, mesh=mesh)[1]))
    placed = lambda: jax.jit(lambda x, p, b, arr: stats(
        jmoe.moe_apply(p, x, cap, bias=b, mesh=mesh, placement=arr)[1]))
    same_slots, spare, two_spare = placed(), placed(), placed()
    # Shadow experts run on the dropless path only: no capacity row.
    return {"static": static, "static, placed path": same_slots, "re-placed": same_slots,
            "re-placed+R=4": spare, "re-placed+R=8": spare, "re-placed+R=16": two_spare,
            GATHERED: spare}


def run_experts(a, num_experts: int, mesh) -> dict:
    cfg = jmoe.MoEConfig(d_model=a.d_model, d_ff=a.d_ff, num_experts=num_experts,
                         top_k=a.top_k, activation="gelu", router="sigmoid_topk",
                         dispatch="dropless")
    params = jmoe.init_params(jax.random.key(0), cfg)
    tok = NamedSharding(mesh, P(("data", "expert"), None))
    rep = NamedSharding(mesh, P())
    x_TD = jax.random.normal(jax.random.key(1), (a.tokens, a.d_model))
    x = jax.device_put(x_TD, tok)
    ct = jax.device_put(jax.random.normal(jax.random.key(2), x.shape), tok)
    sharded = jax.device_put(params, moe_shardings(cfg, mesh))
    num_a = a.tokens * a.top_k

    counts = count_fn(cfg, params, x_TD)
    base = balanced_bias(counts, num_experts)
    pattern = np.asarray(jax.random.normal(jax.random.key(3), (num_experts,)))
    routings = {"balanced": (base, float(counts(base).max() / counts(base).mean()))}
    for target in a.skews:
        routings[f"{target:g}x"] = skewed_bias(counts, base, pattern, target)

    slots = {"static": num_experts // EP, "static, placed path": num_experts // EP,
             "re-placed": num_experts // EP,
             "re-placed+R=4": num_experts // EP + 1,
             "re-placed+R=8": num_experts // EP + 1, "re-placed+R=16": num_experts // EP + 2,
             GATHERED: num_experts // EP + 1,
             **{layout: num_experts // EP for layout in SHADOWS}}
    expert_sharding = NamedSharding(mesh, P("expert"))

    def layer_params(layout, place):
        """Logical-order weights for the static and gathered rows, else slot order."""
        if layout in ("static", GATHERED) or layout in SHADOWS:
            return sharded
        return {"router": sharded["router"],
                "slots": jax.device_put(to_slots(params["experts"], place), expert_sharding)}
    caps = {f"{cf:g}": capacity_fns(cfg, mesh, cf) for cf in a.cfs}
    caps.update({f"{cf:g} batch": capacity_fns(cfg, mesh, cf, "batch") for cf in a.batch_cfs})
    layer = fwd_bwd_fns(cfg, mesh)
    timed, results, places = {}, {}, {}
    for name, (bias, achieved) in routings.items():
        bias = jax.device_put(jnp.asarray(bias, jnp.float32), rep)
        # The measured loads: the static layer's aux.expert_load on this batch.
        _, load_frac = caps[f"{a.cfs[0]:g}"]["static"](x, sharded, bias)
        load_E = np.asarray(load_frac, np.float64) * num_a
        r = routing.route(routing.router_logits(x_TD, params["router"]["w_DE"]), cfg, bias)
        experts_TK = np.asarray(r.experts_TK)
        rows = {}
        for layout in LAYOUTS:
            t0 = time.perf_counter()
            place = (Placement.static(num_experts, EP)
                     if layout.startswith("static") or layout in SHADOWS
                     else balance(load_E, EP, slots[layout],
                                  replicas=EP // 2 if layout == "re-placed+R=4" else None))
            balance_s = time.perf_counter() - t0
            # Uncommitted (default device), as jmoe's tests pass them: arrays
            # replicated on the mesh with a NamedSharding fail inside the
            # layer's shard_map (an Auto-mesh sharding in a Manual context).
            arrays = (None if layout == "static" or layout in SHADOWS
                      else place.as_arrays())
            extra = () if arrays is None else (arrays,)
            p_layout = layer_params(layout, place)
            if layout in SHADOWS:
                dropped = {key: float("nan") for key in caps}
                ex = exchange_shadowed(cfg, experts_TK, SHADOWS[layout])
            else:
                dropped = {key: float(fns[layout](x, p_layout, bias, *extra)[0])
                           for key, fns in caps.items()}
                ex = exchange(cfg, experts_TK, place)
            rows[layout] = {
                "slots_per_device": slots[layout], "redundant": int((place.share_PS > 0).sum()) - num_experts,
                "busiest_device": (ex["busiest_device_split"] if layout in SHADOWS
                                   else place.imbalance(load_E)),
                "dropped": dropped, **ex,
                "balance_s": 0.0 if layout.startswith("static") else balance_s}
            timed[(name, layout)] = (layer[layout], (ct, x, p_layout, bias) + extra)
            places[(name, layout)] = place
        results[name] = {"busiest_expert": achieved,
                         "measured_busiest_expert": float(load_E.max() / load_E.mean()),
                         "load_E": load_E.tolist(), "rows": rows}

    if a.move and len(a.skews) >= 2:
        # One move of a layer's expert state (weights + Adam's mu and nu, in
        # slot order) between the placements of the two skews, as the trainer
        # runs it; timed next to the layer's fwd+bwd.
        src_name, dst_name = f"{a.skews[0]:g}x", f"{a.skews[1]:g}x"
        old, new = places[(src_name, "re-placed+R=8")], places[(dst_name, "re-placed+R=8")]
        state = {k: jax.device_put(jnp.stack([v] * 3), NamedSharding(mesh, P(None, "expert")))
                 for k, v in to_slots(params["experts"], old).items()}
        move = jax.jit(lambda st, src: {k: jnp.take(v, src, axis=1) for k, v in st.items()},
                       out_shardings=NamedSharding(mesh, P(None, "expert")))
        src = jnp.asarray(move_source(old, new))
        moved_slots = int(np.sum(old.slot_expert_PS != new.slot_expert_PS))
        timed[("move", "R=8 weights+moments")] = (move, (state, src))
    print(f"\nE={num_experts}: timing {len(timed)} variants, {a.repeats} interleaved rounds",
          flush=True)
    samples = harness.sample_interleaved(timed, a.repeats)
    ref = ("balanced", "static")
    move_row = None
    if ("move", "R=8 weights+moments") in timed:
        key = ("move", "R=8 weights+moments")
        move_row = {"median_s": float(np.median(samples[key]["wall"])),
                    "vs_balanced_static": harness.paired_ratio(samples, key, ref),
                    "moved_slots": moved_slots, "slots": new.num_slots}
        print(f"\nE={num_experts}: one move ({moved_slots} of {new.num_slots} slots change "
              f"expert; weights + 2 moments) {1e3 * move_row['median_s']:.1f} ms = "
              f"{move_row['vs_balanced_static']:.2f}x the balanced static layer's fwd+bwd")
    for (name, layout) in timed:
        if name == "move":
            continue
        row = results[name]["rows"][layout]
        row["median_s"] = float(np.median(samples[(name, layout)]["wall"]))
        row["vs_balanced_static"] = harness.paired_ratio(samples, (name, layout), ref)
        # Process CPU seconds move less than wall time with other jobs on the cores.
        row["vs_balanced_static_cpu"] = harness.paired_ratio(samples, (name, layout), ref, "cpu")
    for name, res in results.items():
        print(f"\nE={num_experts}, routing {name}: busiest expert / mean "
              f"{res['measured_busiest_expert']:.2f} (measured)")
        print_table(res["rows"], [f"{cf:g}" for cf in a.cfs]
                    + [f"{cf:g} batch" for cf in a.batch_cfs])
    return {"E": num_experts, "routings": results, "move": move_row}


def recorded_section(path: str) -> dict:
    """Placement on the recorded loads of a training run, and the planner's
    predictions for the GPU variants under them (module docstring)."""
    from jmoe.model_config import from_config
    from jmoe.planner import hardware, placement_search as ps
    from jmoe.planner.cli import current_setting, describe
    from jmoe.planner.step_cost import step_cost
    from jmoe.train import cli as train_cli

    rec = ps.read_recorded_loads(path)
    w, num_layers, e = rec.load_WLE.shape
    rows = []
    for spare, every in ((0, 10), (0, 50), (1, 10), (1, 50)):
        r = ps.replay(rec, EP, spare, every)
        rows.append({"option": f"re-placed R={spare * EP}, every {every} steps",
                     "static": float(np.mean(r.busiest_static_L)),
                     "placed": float(np.mean(r.busiest_placed_L)), "moves": r.moves})
    for sh in (1, 2):
        r = ps.replay_shadows(rec, EP, sh)
        rows.append({"option": f"shadowed s={sh}", "static": float(np.mean(r.busiest_static_L)),
                     "placed": float(np.mean(r.busiest_placed_L)), "moves": 0})
    print(f"\nRecorded loads: {w} windows x {num_layers} layers x {e} experts from {path}; "
          f"busiest device / mean on {EP} devices (mean over windows and layers)\n")
    harness.print_markdown(["option", "static", "placed", "layer moves"],
                           [[r["option"], f"{r['static']:.2f}", f"{r['placed']:.2f}",
                             str(r["moves"])] for r in rows])
    hw = hardware.get("h100")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    preds = []
    for variant in ("mixtral_8x7b", "deepseek"):
        config = train_cli.load_config(os.path.join(root, "configs", "gpt_moe.py"), variant)
        gpt = from_config(config.model, config.get("execution"))
        mapped = ps.map_loads(rec, len(gpt.moe_layers), gpt.moe.num_experts)
        load = mapped.load_WLE.mean(axis=(0, 1)).tolist()
        seq, batch = int(config.data.seq_len), int(config.batch_size)
        for nodes in (1, 4):
            devices = nodes * hw.devices_per_node
            cur = current_setting(config, devices)
            sc = step_cost(gpt, cur, seq_len=seq, batch_size=batch, devices=devices, hw=hw,
                           load=load, backend="gpu")
            micro = cur.grad_accum_steps
            opts = ps.placement_options(gpt.moe, mapped, ep=cur.ep, hw=hw, micro_batches=micro,
                                        tokens_per_device=batch * seq // micro // devices,
                                        param_dtype=gpt.param_dtype)
            best = opts[0]
            r = best.replay
            option = (f"shadow s={r.shadows}" if r.shadows else
                      f"R={r.spare_slots * cur.ep}, every {r.every}")
            preds.append({"variant": variant, "cluster": f"{nodes} x 8 H100",
                          "plan": describe(cur), "static_s": sc.time, "option": option,
                          "placed_s": sc.time - max(best.net_per_step_s, 0.0),
                          "mapping": mapped.mapping})
    print("\nPredicted step time (planner, h100 profile) under the recorded loads:\n")
    harness.print_markdown(
        ["variant", "cluster", "plan", "static s", "best option", "placed s", "speed-up"],
        [[p["variant"], p["cluster"], p["plan"], f"{p['static_s']:.3f}", p["option"],
          f"{p['placed_s']:.3f}", f"{p['static_s'] / p['placed_s']:.2f}x"] for p in preds])
    for p in preds[::2]:
        print(f"- {p['variant']}: loads mapped: {p['mapping']}")
    return {"source": path, "replay": rows, "predictions": preds}


def print_table(rows: dict, keys) -> None:
    header = (["layout", "busiest device / mean"]
              + [f"dropped, cf {key}" for key in keys]
              + ["exchange rows / min", "CPU bucket", "fwd+bwd vs balanced static"])
    body = []
    for layout, r in rows.items():
        body.append([f"{layout} (S={r['slots_per_device']})", f"{r['busiest_device']:.2f}"]
                    + [f"{100 * r['dropped'][key]:.1f}%"
                       if np.isfinite(r["dropped"][key]) else "n/a" for key in keys]
                    + [f"{r['ragged_vs_min']:.2f}x", r["cpu_bucket"],
                       f"{r['vs_balanced_static']:.2f}x"])
    harness.print_markdown(header, body)


def main(argv=None):
    p = harness.parser(__doc__, repeats=5,
                       quick=dict(tokens=512, d_model=32, d_ff=64, repeats=2))
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--d_ff", type=int, default=512)
    p.add_argument("--top_k", type=int, default=2)
    p.add_argument("--experts", type=int, nargs="+", default=[16, 64])
    p.add_argument("--skews", type=float, nargs="+", default=[2.0, 3.0],
                   help="busiest expert / mean of the skewed routings")
    p.add_argument("--cfs", type=float, nargs="+", default=[1.0, 1.25],
                   help="capacity factors of the dropped-fraction columns")
    p.add_argument("--batch_cfs", type=float, nargs="+", default=[1.25],
                   help="capacity factors of the dropped-fraction columns with a batch-wide "
                        "capacity (capacity_scope='batch'; [] = none)")
    p.add_argument("--move", action=argparse.BooleanOptionalAction, default=True,
                   help="time one move of weights and moments between two placements")
    p.add_argument("--recorded", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "fixtures", "default_run_expert_load.jsonl"),
        help="a run's metrics.jsonl (or workdir) whose expert loads to replay ('' = skip)")
    a = p.parse_args(argv)
    mesh = make_mesh(data=1, expert=EP)
    print(f"platform={jax.default_backend()} mesh data=1 expert={EP} "
          + harness.describe(T=a.tokens, D=a.d_model, F=a.d_ff, E=a.experts, K=a.top_k,
                             repeats=a.repeats), flush=True)
    t0, load_before = time.perf_counter(), os.getloadavg()
    out = [run_experts(a, e, mesh) for e in a.experts]
    recorded = recorded_section(a.recorded) if a.recorded else None
    load_after = os.getloadavg()
    print(f"\ntotal {time.perf_counter() - t0:.0f}s; 1-minute load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after")
    for note in NOTES:
        print(f"- {note}")
    result = {**harness.machine_info(),
              "shape": {"T": a.tokens, "D": a.d_model, "F": a.d_ff, "K": a.top_k,
                        "data": 1, "expert": EP, "router": "sigmoid_topk",
                        "activation": "gelu", "repeats": a.repeats},
              "load_average_1min": {"before": load_before[0], "after": load_after[0]},
              "seconds": time.perf_counter() - t0, "results": out, "recorded": recorded,
              "notes": NOTES}
    harness.write_json(a.json, result)
    return result


if __name__ == "__main__":
    main()
