"""Recommends online re-placement settings from a run's recorded expert loads.

`python -m jmoe.plan ... --load runs/NAME` (or `.../metrics.jsonl`) reads the
per-layer expert loads the trainer logged (`expert_load`, [L, E] per log
window) and replays online re-placement on them for every candidate pair of
spare slots per device and interval N (`config.placement.spare_slots`,
`config.placement.every`): at each decision the balancer (`jmoe.balance`)
places the experts for the mean load since the last decision, and the
following windows are scored under that placement, as the trainer does. The
replay gives each layer's busiest device / mean over time, static and
placed, and how many slots moved; `jmoe.planner.layer_cost.placement_price`
turns those into seconds per step on the target hardware.

Loads recorded on another model are mapped onto the planned one, and the
report says so: planned layer l takes recorded layer l mod L; with
E_planned = k * E_recorded each recorded expert becomes k experts sharing its
load (same busiest / mean), with E_recorded = k * E_planned each group of k
consecutive recorded experts becomes one (that evens the loads out).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence

import numpy as np

from jmoe.balance import balance
from jmoe.config import MoEConfig
from jmoe.placement import Placement
from jmoe.planner.hardware import Hardware
from jmoe.planner.layer_cost import placement_price, shadow_price, shadowed_device_loads


@dataclasses.dataclass(frozen=True)
class RecordedLoads:
    steps_W: np.ndarray  # int [W] step of each log window
    load_WLE: np.ndarray  # float [W, L, E] each expert's share of a layer's assignments
    source: str
    mapping: str = ""  # how the loads were mapped onto the planned model ("" = as recorded)


def read_recorded_loads(path: str) -> RecordedLoads:
    """The `expert_load` records of a run (a workdir or its metrics.jsonl)."""
    file = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise ValueError(f"--load {path}: no metrics.jsonl there; give a run's workdir or its "
                         "metrics.jsonl (or uniform | zipf:S | hot:R | E weights).")
    recs = {}
    with open(file) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if r.get("split") == "train" and "expert_load" in r:
                recs[r["step"]] = r["expert_load"]  # a resumed run's record wins
    if not recs:
        raise ValueError(f"--load {path}: {file} has no expert_load records (a dense run, "
                         "or one that logged nothing yet).")
    steps = np.array(sorted(recs))
    return RecordedLoads(steps, np.array([recs[s] for s in steps], np.float64), file)


def map_loads(rec: RecordedLoads, num_layers: int, num_experts: int) -> RecordedLoads:
    """The recorded loads on a model of `num_layers` MoE layers and
    `num_experts` experts (module docstring); raises when E does not map."""
    w, lr, er = rec.load_WLE.shape
    load = rec.load_WLE[:, [l % lr for l in range(num_layers)], :]
    notes = []
    if num_layers != lr:
        notes.append(f"{num_layers} layers from the {lr} recorded (layer l <- l mod {lr})")
    if num_experts != er:
        if num_experts % er == 0:
            k = num_experts // er
            load = np.repeat(load / k, k, axis=2)
            notes.append(f"each recorded expert split into {k} (same busiest / mean)")
        elif er % num_experts == 0:
            k = er // num_experts
            load = load.reshape(w, num_layers, num_experts, k).sum(axis=3)
            notes.append(f"groups of {k} recorded experts merged into one")
        else:
            raise ValueError(f"--load: the run recorded {er} experts, the planned model has "
                             f"{num_experts}; one must be a multiple of the other.")
    return dataclasses.replace(rec, load_WLE=load, mapping="; ".join(notes))


@dataclasses.dataclass(frozen=True)
class Replay:
    spare_slots: int
    every: int  # 0: no re-placement (shadow experts only)
    busiest_static_L: np.ndarray  # [L] time-mean busiest device / mean, static layout
    busiest_placed_L: np.ndarray  # [L] under the replayed online placement
    moves: int  # decisions that moved something (summed over layers)
    moved_slots: int  # slots whose expert changed, summed over decisions and layers
    decisions: int
    shadows: int = 0  # shadow experts per step (static layout), instead of re-placement


def replay_shadows(rec: RecordedLoads, ep: int, shadows: int) -> Replay:
    """Shadow experts on the recorded windows: each window's hottest experts
    spread over all devices, the rest on their static owners."""
    w, num_layers, e = rec.load_WLE.shape
    static = Placement.static(e, ep)
    static_WL = np.array([[static.imbalance(l) for l in win] for win in rec.load_WLE])
    shadow_WL = np.array([[max(shadowed_device_loads(list(l), ep, shadows)) * ep / max(sum(l), 1e-30)
                           for l in win] for win in rec.load_WLE])
    return Replay(0, 0, static_WL.mean(axis=0), shadow_WL.mean(axis=0), 0, 0, 0, shadows)


def replay(rec: RecordedLoads, ep: int, spare_slots: int, every: int) -> Replay:
    """Online re-placement on the recorded windows (policy 'always'): a
    decision every `every` steps from the mean load since the last one; each
    window is scored under the placement in force when it ran."""
    w, num_layers, e = rec.load_WLE.shape
    slots = e // ep + spare_slots
    static = Placement.static(e, ep)
    current = [static if spare_slots == 0 else balance(np.ones(e), ep, slots)] * num_layers
    placed_WL = np.zeros((w, num_layers))
    static_WL = np.zeros((w, num_layers))
    pending, moves, moved, decisions, last = [], 0, 0, 0, 0
    for i, step in enumerate(rec.steps_W):
        for l in range(num_layers):
            placed_WL[i, l] = current[l].imbalance(rec.load_WLE[i, l])
            static_WL[i, l] = static.imbalance(rec.load_WLE[i, l])
        pending.append(rec.load_WLE[i])
        if step // every > last // every:  # a decision step fell in this window
            last = step
            mean_LE = np.mean(pending, axis=0)
            pending = []
            decisions += 1
            for l in range(num_layers):
                new = balance(mean_LE[l], ep, slots)
                if new.imbalance(mean_LE[l]) < current[l].imbalance(mean_LE[l]) - 1e-9:
                    n = int(np.sum(new.slot_expert_PS != current[l].slot_expert_PS))
                    moves += n > 0
                    moved += n
                    current[l] = new
    return Replay(spare_slots, every, static_WL.mean(axis=0), placed_WL.mean(axis=0),
                  moves, moved, decisions)


@dataclasses.dataclass(frozen=True)
class PlacementOption:
    replay: Replay
    saved_per_step_s: float  # busiest device's expert compute saved, all layers
    sync_per_step_s: float  # replicas' gradient all-reduces, all layers
    move_per_step_s: float  # moves, amortised over the replayed steps

    @property
    def net_per_step_s(self) -> float:
        return self.saved_per_step_s - self.sync_per_step_s - self.move_per_step_s


def placement_options(moe: MoEConfig, rec: RecordedLoads, *, ep: int, tokens_per_device: int,
                      hw: Hardware, micro_batches: int = 1, param_dtype: str = "float32",
                      spares: Sequence[int] = (0, 1, 2),
                      intervals: Optional[Sequence[int]] = None,
                      shadows: Sequence[int] = (1, 2)) -> list:
    """Every (spare slots, interval) replayed and priced, and every number
    of shadow experts (static layout); best first.

    Per-step terms are per device per training step (all micro-batches);
    moves are amortised over the recorded run's length.
    """
    if ep <= 1:
        return []
    span = int(rec.steps_W[-1] - rec.steps_W[0]) or 1
    gap = int(np.median(np.diff(rec.steps_W))) if len(rec.steps_W) > 1 else 1
    if intervals is None:
        intervals = sorted({gap * k for k in (1, 2, 5, 10, 20)})
    out = []
    for spare in spares:
        for every in intervals:
            r = replay(rec, ep, spare, every)
            saved = sync = move = 0.0
            for b_static, b_placed in zip(r.busiest_static_L, r.busiest_placed_L):
                price = placement_price(moe, tokens_per_device, ep, hw,
                                        busiest_before=float(b_static),
                                        busiest_after=float(b_placed),
                                        redundant=spare * ep, moved_slots=1,
                                        param_dtype=param_dtype)
                saved += micro_batches * price.step_gain
                sync += micro_batches * price.replica_sync  # replicas tied in every micro-batch
                # One move per decision that moved anything, for this layer's share.
                move += price.move * r.moves / max(len(r.busiest_static_L), 1) / span
            out.append(PlacementOption(r, saved, sync, move))
    for s in shadows:
        if s >= moe.num_experts:
            continue
        r = replay_shadows(rec, ep, s)
        saved = sync = 0.0
        for b_static, b_shadow in zip(r.busiest_static_L, r.busiest_placed_L):
            price = shadow_price(moe, tokens_per_device, ep, hw, busiest_before=float(b_static),
                                 busiest_after=float(b_shadow), shadows=s,
                                 param_dtype=param_dtype)
            saved += micro_batches * price.step_gain
            sync += micro_batches * price.replica_sync
        out.append(PlacementOption(r, saved, sync, 0.0))
    return sorted(out, key=lambda o: -o.net_per_step_s)
