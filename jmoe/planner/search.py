"""The plan search: every candidate `Setting` (expert-parallel size,
dispatch, capacity factor, chunks, hierarchy, receive cap, accumulation,
FSDP) costed with `step_cost`, filtered by drops and memory, and ranked."""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

from jmoe.model_config import GPTConfig
from jmoe.planner.hardware import Hardware
from jmoe.planner.primitives import ep_layout
from jmoe.planner.step_cost import Setting, step_cost


def _divisors(n: int) -> list:
    return [i for i in range(1, n + 1) if n % i == 0]


def candidate_settings(gpt: GPTConfig, devices: int, hw: Hardware, batch_size: int, seq_len: int,
                       chunks: Iterable[int] = (1, 2, 4, 8),
                       capacity_factors: Iterable[float] = (1.0, 1.1, 1.25, 1.5, 2.0),
                       accum_options: Optional[Iterable[int]] = None,
                       fixed_ep: Optional[int] = None,
                       fsdp_options: Iterable[bool] = (False, True)) -> list:
    m = gpt.moe
    eps = [fixed_ep] if fixed_ep else [p for p in _divisors(devices)
                                       if m is not None and m.num_experts % p == 0]
    if accum_options is None:
        accum_options = [a for a in (1, 2, 4, 8, 16, 32, 64)
                         if batch_size % a == 0 and (batch_size // a) % devices == 0]
    out = []
    for a in accum_options:
        for ep in eps:
            g, _ = ep_layout(ep, hw.devices_per_node)
            hier = [0] + ([g] if 1 < g < ep and ep % g == 0 else [])
            for z in (fsdp_options if devices > ep else (False,)):
                for h in hier:
                    for n in (chunks if ep > 1 else (1,)):
                        for cf in capacity_factors:
                            out.append(Setting(ep, "capacity", cf, n, h, 0.0, a, z))
                        out.append(Setting(ep, "dropless", m.capacity_factor, n, h, 0.0, a, z))
                        if ep > 1:
                            for r in (1.25, 1.5, 2.0):
                                if r < ep:
                                    out.append(Setting(ep, "dropless", m.capacity_factor, n, h,
                                                       r, a, z))
    return out


def _changes(s: Setting, base: Setting) -> int:
    return sum(getattr(s, f.name) != getattr(base, f.name) for f in dataclasses.fields(Setting))


def rank_settings(gpt: GPTConfig, *, devices: int, hw: Hardware, batch_size: int, seq_len: int,
                  current: Setting, load=None, drop_budget: float = 0.01, backend: str = "gpu",
                  tolerance: float = 0.01, **kw) -> dict:
    """Costs every candidate; returns {"best", "current", "ranked", "notes"}.

    Feasible = expected drops <= `drop_budget` and the memory estimate fits
    (if nothing fits, memory is ignored and a note says so). FSDP settings
    count only when no replicated one fits, unless `current` uses FSDP. Among
    feasible settings within `tolerance` of the fastest, the one closest to
    `current` wins (fewest changed knobs), then the one with fewer chunks.
    """
    notes = []
    cands = candidate_settings(gpt, devices, hw, batch_size, seq_len, **kw)
    costs = [step_cost(gpt, s, seq_len=seq_len, batch_size=batch_size, devices=devices,
                       hw=hw, load=load, backend=backend) for s in cands]
    ok_drop = [c for c in costs if c.drop_fraction <= drop_budget]
    if not ok_drop:
        notes.append(f"no setting keeps expected drops under {drop_budget:.1%}; "
                     "showing the least-dropping ones")
        ok_drop = sorted(costs, key=lambda c: c.drop_fraction)[:max(1, len(costs) // 10)]
    fits = [c for c in ok_drop if c.memory["total"] <= hw.mem_bytes]
    # FSDP is a memory remedy here: its time rests on hiding every weight
    # gather under compute, an assumption no GPU measurement has checked, so
    # it is chosen only where nothing fits without it (or the config has it).
    if not current.fsdp and any(not c.setting.fsdp for c in fits):
        fits = [c for c in fits if not c.setting.fsdp]
    if not fits:
        need = min(c.memory["total"] for c in ok_drop)
        notes.append(f"nothing fits in {hw.mem_bytes / 1e9:.0f} GB per device by the memory "
                     f"estimate (the smallest needs {need / 1e9:.0f} GB): use "
                     "param_dtype='bfloat16', remat, or more devices; ranking the settings "
                     "within 10% of the smallest footprint")
        fits = [c for c in ok_drop if c.memory["total"] <= 1.1 * need]
    fastest = min(c.time for c in fits)
    near = [c for c in fits if c.time <= fastest * (1 + tolerance)]
    best = min(near, key=lambda c: (_changes(c.setting, current), c.setting.overlap_chunks,
                                    c.time))
    cur = step_cost(gpt, current, seq_len=seq_len, batch_size=batch_size, devices=devices,
                    hw=hw, load=load, backend=backend)
    ranked = sorted(fits, key=lambda c: c.time)
    return {"best": best, "current": cur, "ranked": ranked, "notes": notes}


def execution_shortlist(gpt: GPTConfig, *, devices: int, hw: Hardware, batch_size: int,
                        seq_len: int, current: Setting, n: int, load=None,
                        backend: str = "gpu") -> list:
    """Up to `n` plans for a run-time switch (`jmoe.adaptive`): settings that
    differ from `current` only in how the layer runs (overlap chunks,
    all-to-all hierarchy), so they share its parameter layout and its maths;
    `current` first, then the others by predicted step time. Returns
    (setting, predicted step seconds) pairs."""
    ep = current.ep
    cost = lambda s: step_cost(gpt, s, seq_len=seq_len, batch_size=batch_size, devices=devices,
                               hw=hw, load=load, backend=backend).time
    if ep <= 1:
        return [(current, cost(current))]  # nothing is exchanged: the knobs do not apply
    hierarchies = [0] + [h for h in range(2, ep) if ep % h == 0]
    same = [dataclasses.replace(current, overlap_chunks=c, a2a_hierarchy=h)
            for c in (1, 2, 4) for h in hierarchies]
    same = [s for s in same if s != current]
    costs = sorted(((cost(s), i, s) for i, s in enumerate(same)), key=lambda c: (c[0], c[1]))
    out = [(current, cost(current))]
    for t, _, s in costs[:max(n - 1, 0)]:
        out.append((s, t))
    return out
