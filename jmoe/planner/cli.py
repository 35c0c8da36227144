r"""Predict a training step and pick the MoE plan, before booking the cluster.

  python -m jmoe.plan --config configs/gpt_moe.py:mixtral_8x7b --hardware h100 --nodes 4
  python -m jmoe.plan --config configs/gpt_moe.py:deepseek --hardware a100 --nodes 2 \
      --load zipf:0.5 --config.model.param_dtype=bfloat16
  python -m jmoe.plan --config configs/gpt_moe.py --hardware cpu-local --devices 8

Prints the predicted step (compute, exposed and overlapped communication),
the share of the step spent in all-to-all, per-layer forward+backward times,
and the recommended settings as `--config.*` overrides that train.py takes
verbatim. `--config.*` flags given here are applied first, exactly as
train.py would apply them. Hardware profiles: a100, a800, a30, h100, h200
(public datasheets; see jmoe/planner/hardware.py) and cpu-local (measured now, ~15 s).
`--set FIELD=VALUE` changes a profile field (e.g. `--set inter_bw_gbit=200`).
`--help` lists the flags.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Optional, Sequence

from absl import flags
import numpy as np
from ml_collections import config_flags

from jmoe.config import Execution, MoEConfig
from jmoe.model_config import flops_per_token, from_config, param_count_formula
from jmoe.planner import hardware, placement_search, search
from jmoe.planner.step_cost import Setting, StepCost

# The layer's knobs the planner turns, and the config section each lives in:
# `config.model` for the maths (`MoEConfig`), `config.execution` for how it
# runs (`Execution`), with the dataclasses' defaults where a config omits one.
MOE_KNOBS = ("dispatch", "capacity_factor", "overlap_chunks", "a2a_hierarchy", "ep_recv_factor")
_FIELDS = {f.name: (section, f.default) for section, cls in (("model", MoEConfig),
                                                             ("execution", Execution))
           for f in dataclasses.fields(cls)}
SECTION = {k: _FIELDS[k][0] for k in MOE_KNOBS}
HELP_FLAGS = ("-h", "-help", "--help", "--helpshort", "--helpfull")


def _define(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    # config_flags finds `--config.*` overrides in argv itself (sys.argv unless given).
    config_flags.DEFINE_config_file("config", "configs/gpt_moe.py", "Config file[:variant].",
                                    flag_values=fv, lock_config=True, sys_argv=list(argv))
    flags.DEFINE_string("hardware", "h100", f"one of {hardware.NAMES}", flag_values=fv)
    flags.DEFINE_integer("nodes", 1, "nodes (devices = nodes x devices_per_node)",
                         flag_values=fv)
    flags.DEFINE_integer("devices", 0, "total devices (overrides --nodes)", flag_values=fv)
    flags.DEFINE_integer("devices_per_node", 0, "override the profile's devices per node",
                         flag_values=fv)
    flags.DEFINE_string("load", "uniform",
                        "expert load: uniform | zipf:S | hot:R | comma list of E weights | a "
                        "run's workdir or metrics.jsonl (its recorded loads: also recommends "
                        "online re-placement, config.placement)",
                        flag_values=fv)
    flags.DEFINE_float("drop_budget", 0.005, "max expected share of dropped assignments",
                       flag_values=fv)
    flags.DEFINE_multi_string("set", [], "hardware field override FIELD=VALUE",
                              flag_values=fv)
    flags.DEFINE_integer("top", 5, "alternatives to list", flag_values=fv)
    flags.DEFINE_string("json", None, "also write the prediction here", flag_values=fv)


def _knob(config, key: str):
    """`config.model.<key>` or `config.execution.<key>`, else the dataclass default."""
    section, default = _FIELDS[key]
    return (config.get(section) or {}).get(key, default)


def current_setting(config, devices: int) -> Setting:
    """The plan the config asks for now (missing layer fields take the defaults
    of `MoEConfig` and `Execution`)."""
    expert = int(config.mesh.get("expert", 1))
    data = int(config.mesh.get("data", -1))
    if expert == -1:
        expert = devices // data if data > 0 else devices
    return Setting(ep=expert, dispatch=_knob(config, "dispatch"),
                   capacity_factor=float(_knob(config, "capacity_factor")),
                   overlap_chunks=int(_knob(config, "overlap_chunks")),
                   a2a_hierarchy=int(_knob(config, "a2a_hierarchy")),
                   ep_recv_factor=float(_knob(config, "ep_recv_factor")),
                   grad_accum_steps=int(config.get("grad_accum_steps", 1)),
                   fsdp=bool(config.mesh.get("fsdp", False)))


def overrides(config, best: Setting, devices: int) -> list:
    """`--config.*` flags turning `config` into `best` (only what changes)."""
    out = []
    want = {"dispatch": best.dispatch, "overlap_chunks": best.overlap_chunks,
            "a2a_hierarchy": best.a2a_hierarchy, "ep_recv_factor": best.ep_recv_factor}
    if best.dispatch == "capacity":
        want["capacity_factor"] = best.capacity_factor
    for key in MOE_KNOBS:
        if key not in want:
            continue
        have = _knob(config, key)
        if have != want[key] and not (isinstance(have, float) and
                                      abs(have - float(want[key])) < 1e-9):
            out.append(f"--config.{SECTION[key]}.{key}={want[key]}")
    data = int(config.mesh.get("data", -1))
    expert = int(config.mesh.get("expert", 1))
    if expert != best.ep:
        out.append(f"--config.mesh.expert={best.ep}")
    if data != -1 and data * best.ep != devices:
        out.append(f"--config.mesh.data={devices // best.ep}")
    if int(config.get("grad_accum_steps", 1)) != best.grad_accum_steps:
        out.append(f"--config.grad_accum_steps={best.grad_accum_steps}")
    if bool(config.mesh.get("fsdp", False)) != best.fsdp:
        out.append(f"--config.mesh.fsdp={best.fsdp}")
    return out


def missing_fields(config, flags_: Sequence[str]) -> list:
    """Overrides naming a field the (locked) config does not have."""
    miss = []
    for f in flags_:
        path = f.split("=", 1)[0][len("--config."):].split(".")
        node = config
        for part in path:
            if part not in node:
                miss.append(".".join(path))
                break
            node = node[part]
    return miss


def _ms(x: float) -> str:
    return f"{x * 1e3:,.1f}"


def describe(s: Setting) -> str:
    parts = [f"ep={s.ep}", s.dispatch]
    if s.dispatch == "capacity":
        parts.append(f"cf={s.capacity_factor:g}")
    elif s.ep_recv_factor:
        parts.append(f"recv={s.ep_recv_factor:g}")
    parts.append(f"chunks={s.overlap_chunks}")
    parts.append(f"2DH({s.a2a_hierarchy})" if s.a2a_hierarchy > 1 else "flat")
    if s.grad_accum_steps > 1:
        parts.append(f"accum={s.grad_accum_steps}")
    if s.fsdp:
        parts.append("fsdp")
    return " ".join(parts)


def _layer_rows(cur: StepCost, best: StepCost) -> list:
    """(layer, count, region, kind, current ms, recommended ms) per device per
    step: one layer's time x micro-batches (the two may differ in accumulation)."""
    rows = []
    m0, m1 = cur.micro_batches, best.micro_batches
    for key, (lc, count) in best.layers.items():
        lc0 = cur.layers[key][0]
        ops0 = {o.name: o for o in lc0.ops}
        for o in lc.ops:
            o0 = ops0.get(o.name)
            rows.append((key, count, o.name, o.kind, m0 * o0.total if o0 else 0.0,
                         m1 * o.total))
        if key == "moe":
            rows.append((key, count, "overlap (hidden)", "comm", -m0 * lc0.hidden,
                         -m1 * lc.hidden))
        rows.append((key, count, "= layer", "", m0 * lc0.time, m1 * lc.time))
    return rows


def _count(n: float) -> str:
    """A parameter count as people write it: 46.7B, 125.3M, 12.0K."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def report(config, variant: str, hw, devices: int, result: dict, load: str,
           gpt, seq_len: int, batch_size: int) -> str:
    cur, best = result["current"], result["best"]
    counts = param_count_formula(gpt)
    nodes = -(-devices // hw.devices_per_node)
    lines = [
        f"jmoe plan: {variant} ({_count(counts['total'])} parameters, "
        f"{_count(counts['active'])} active) on {nodes} x {min(devices, hw.devices_per_node)} "
        f"{hw.name} = {devices} devices",
        f"  hardware: {hw.description}",
        f"  batch {batch_size} x {seq_len} tokens per step, dtype {gpt.dtype}, params "
        f"{gpt.param_dtype}, remat {gpt.execution.remat}, expert load {load}",
        "",
        f"current:     {describe(cur.setting)}",
        f"recommended: {describe(best.setting)}",
        "",
        "Per-layer forward+backward, ms per step per device (one layer, all micro-batches):",
        "| layer (x count) | region | kind | current | recommended |",
        "|---|---|---|---:|---:|",
    ]
    for key, count, name, kind, t0, t1 in _layer_rows(cur, best):
        lines.append(f"| {key} (x{count}) | {name} | {kind} | {_ms(t0)} | {_ms(t1)} |")

    model_flops = flops_per_token(gpt, seq_len) * batch_size * seq_len
    peak = devices * hw.flops(gpt.dtype)

    def col(sc):
        tok = batch_size * seq_len / sc.time
        return [sc.compute, sc.exposed_comm, sc.overlapped_comm, sc.a2a, sc.a2a_exposed,
                sc.time, tok, sc.memory["total"], sc.drop_fraction,
                model_flops / (peak * sc.time)]

    def mem(x):
        return f"{x / 1e9:.1f}" + ("" if x <= hw.mem_bytes else " (over)")

    c0, c1 = col(cur), col(best)
    names = ["compute", "exposed communication", "overlapped communication",
             "all-to-all (total)", "all-to-all (exposed)", "step time"]
    lines += ["", "Predicted step, seconds per device:",
              "| | current | recommended |", "|---|---:|---:|"]
    for i, nm in enumerate(names):
        lines.append(f"| {nm} | {c0[i]:.3f} | {c1[i]:.3f} |")
    lines += [
        f"| all-to-all share of step (total / exposed) | {c0[3] / c0[5]:.1%} / "
        f"{c0[4] / c0[5]:.1%} | {c1[3] / c1[5]:.1%} / {c1[4] / c1[5]:.1%} |",
        f"| tokens per second (cluster) | {c0[6]:,.0f} | {c1[6]:,.0f} |",
        f"| model FLOPs utilisation | {c0[9]:.1%} | {c1[9]:.1%} |",
        f"| memory per device, GB (estimate; {hw.mem_bytes / 1e9:.0f} available) | "
        f"{mem(c0[7])} | {mem(c1[7])} |",
        f"| expected dropped assignments | {c0[8]:.2%} | {c1[8]:.2%} |",
        "",
        f"speed-up over current: {cur.time / best.time:.2f}x",
    ]
    for n in result["notes"]:
        lines.append(f"note: {n}")
    ovr = overrides(config, best.setting, devices)
    lines += ["", "Recommended overrides (train.py accepts them verbatim):"]
    lines.append("  " + (" ".join(ovr) if ovr else "(none: the config is already the best plan)"))
    miss = missing_fields(config, ovr)
    if miss:
        lines.append(f"  warning: this config has no field {', '.join(miss)}: add it to the "
                     "config file (a jmoe.MoEConfig field under config.model, a jmoe.Execution "
                     "field under config.execution) before passing the flag")
    lines += ["", f"Fastest alternatives (of {len(result['ranked'])} feasible):",
              "| setting | step s | exposed comm s | a2a share | drops | memory GB |",
              "|---|---:|---:|---:|---:|---:|"]
    seen = 0
    for sc in result["ranked"]:
        if seen >= result.get("top", 5):
            break
        seen += 1
        lines.append(f"| {describe(sc.setting)} | {sc.time:.3f} | {sc.exposed_comm:.3f} | "
                     f"{sc.a2a / sc.time:.1%} | {sc.drop_fraction:.2%} | "
                     f"{sc.memory['total'] / 1e9:.1f} |")
    return "\n".join(lines)


def run(argv: Sequence[str]) -> dict:
    """Parses `argv` (program name first), prints the report, returns the result."""
    fv = flags.FlagValues()
    _define(fv, argv)
    fv(list(argv))
    config = fv.config
    cfg_name = config_flags.get_config_filename(fv["config"])
    variant = fv["config"].config_filename if hasattr(fv["config"], "config_filename") else ""
    variant = variant.partition(":")[2] or "default"
    # Raises ValueError naming bad fields as the user sets them.
    gpt = from_config(config.model, config.get("execution"))
    overrides_hw = dict(s.split("=", 1) for s in fv.set)
    hw = hardware.get(fv.hardware, **overrides_hw)
    if fv.devices_per_node:
        hw = hw.replace(devices_per_node=fv.devices_per_node)
    devices = fv.devices or fv.nodes * hw.devices_per_node
    if fv.hardware.lower() in ("cpu-local", "cpu") and not fv.devices:
        devices = hw.devices_per_node
    seq_len, batch = int(config.data.seq_len), int(config.batch_size)
    if int(config.mesh.get("tensor", 1)) != 1:
        raise ValueError(f"config.mesh.tensor={config.mesh.tensor}: the cost model covers "
                         "meshes without expert tensor parallelism; plan with tensor=1.")
    cur = current_setting(config, devices)
    if devices % cur.ep:
        cur = dataclasses.replace(cur, ep=1, a2a_hierarchy=0)
    if (batch // cur.grad_accum_steps) % devices:
        raise ValueError(f"config.batch_size={batch} with grad_accum_steps="
                         f"{cur.grad_accum_steps} does not split over {devices} devices: "
                         "use a batch size that is a multiple of the device count.")
    backend = "cpu" if hw.name == "cpu-local" else "gpu"
    load, recorded = fv.load, None
    if gpt.moe is not None and (os.path.isdir(fv.load) or fv.load.endswith(".jsonl")):
        recorded = placement_search.map_loads(placement_search.read_recorded_loads(fv.load),
                                              len(gpt.moe_layers), gpt.moe.num_experts)
        # The ranking prices every MoE layer with one load: the recorded
        # loads' mean over windows and layers (expert identities kept).
        load = recorded.load_WLE.mean(axis=(0, 1)).tolist()
    result = search.rank_settings(gpt, devices=devices, hw=hw, batch_size=batch,
                                  seq_len=seq_len, current=cur, load=load,
                                  drop_budget=fv.drop_budget, backend=backend)
    result["top"] = fv.top
    print(report(config, variant, hw, devices, result, fv.load if recorded is None else
                 f"recorded in {recorded.source}", gpt, seq_len, batch))
    result["overrides"] = overrides(config, result["best"].setting, devices)
    if recorded is not None:
        # Placement for the recommended plan; if it has no expert
        # parallelism, for the current one (say which).
        plan, which = result["best"], "recommended"
        if plan.setting.ep == 1 and result["current"].setting.ep > 1:
            plan, which = result["current"], "current"
        micro = plan.setting.grad_accum_steps
        result["placement"] = placement_search.placement_options(
            gpt.moe, recorded, ep=plan.setting.ep, hw=hw, micro_batches=micro,
            tokens_per_device=batch * seq_len // micro // devices,
            param_dtype=gpt.param_dtype)
        print(placement_report(result["placement"], recorded, plan.time, fv.top,
                               f"{which} plan ({describe(plan.setting)})"))
        result["overrides"] += placement_overrides(result["placement"])
    result["config"] = cfg_name
    if fv.json:
        with open(fv.json, "w") as fh:
            json.dump(_jsonable(result), fh, indent=2)
    return result


def placement_overrides(options: list) -> list:
    """The best replayed option as `--config.placement.*` flags (none if no gain)."""
    if not options or options[0].net_per_step_s <= 0:
        return []
    r = options[0].replay
    if r.shadows:
        return [f"--config.execution.shadow_experts={r.shadows}"]
    return [f"--config.placement.every={r.every}", f"--config.placement.spare_slots={r.spare_slots}"]


def placement_report(options: list, rec, step_s: float, top: int, plan: str) -> str:
    """The online re-placement section of the report (`--load` a recorded run)."""
    lines = ["", f"Online expert re-placement for the {plan}, replayed on the "
             f"{len(rec.steps_W)} recorded windows (steps {rec.steps_W[0]}-{rec.steps_W[-1]}) "
             f"of {rec.source}:"]
    if rec.mapping:
        lines.append(f"  loads mapped onto this model: {rec.mapping}")
    if not options:
        lines.append("  (no expert parallelism in the recommended plan: nothing to place)")
        return "\n".join(lines)
    lines += ["| option | busiest device / mean, static -> placed "
              "| saved ms | sync ms | moves ms | net ms per step | predicted step s |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for o in options[:max(top, 1) * 2]:
        r = o.replay
        option = (f"{r.shadows} shadow expert(s)" if r.shadows else
                  f"{r.spare_slots} spare slot(s)/device, every {r.every} steps")
        lines.append(
            f"| {option} | {np.mean(r.busiest_static_L):.2f} -> "
            f"{np.mean(r.busiest_placed_L):.2f} | {_ms(o.saved_per_step_s)} | "
            f"{_ms(o.sync_per_step_s)} | {_ms(o.move_per_step_s)} | {_ms(o.net_per_step_s)} | "
            f"{step_s - o.net_per_step_s:.3f} |")
    ovr = placement_overrides(options)
    lines += ["", "Re-placement: " + (" ".join(ovr) + f" (predicted step {step_s:.3f} s -> "
                                      f"{step_s - options[0].net_per_step_s:.3f} s)" if ovr else
                                      "keep the static layout (no option gains here)"),
              "  (sync: replicas' gradient all-reduce, or the shadows' weight and gradient "
              "all-reduces; moves amortised over the recorded steps)"]
    return "\n".join(lines)


def _jsonable(result: dict) -> dict:
    def sc(c: StepCost) -> dict:
        return {"setting": c.setting.__dict__, "step_s": c.time, "compute_s": c.compute,
                "exposed_comm_s": c.exposed_comm, "overlapped_comm_s": c.overlapped_comm,
                "a2a_s": c.a2a, "drop_fraction": c.drop_fraction, "memory": c.memory,
                "layers_ms": {k: {o.name: o.total * 1e3 for o in lc.ops}
                              for k, (lc, _) in c.layers.items()}}
    return {"config": result["config"], "best": sc(result["best"]),
            "current": sc(result["current"]), "overrides": result["overrides"],
            "notes": result["notes"], "ranked": [sc(c) for c in result["ranked"][:20]]}


def usage() -> str:
    """This module's docstring and every flag with its default."""
    fv = flags.FlagValues()
    _define(fv, ["plan"])
    return (__doc__.strip() + "\n\nFlags (any --config.<section>.<field>=VALUE override as "
            "well):\n" + fv.get_help())


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = sys.argv if argv is None else argv
    # absl defines --help only on the global FLAGS (absl.app), not on ours.
    if any(a in HELP_FLAGS for a in argv[1:]):
        print(usage())
        return
    try:
        run(argv)
    except (ValueError, flags.Error) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
