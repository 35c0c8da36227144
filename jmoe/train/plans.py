"""Run-time plan switching in the trainer (`config.adaptive`, issue 18).

With `adaptive.plans = n > 1` the planner shortlists `n` execution plans
for the run's mesh that differ only in how the MoE layers run (overlap
chunks, all-to-all hierarchy: `jmoe.planner.search.execution_shortlist`;
with the dense dropless exchange, also the `ep_buckets` set; with capacity
dispatch, the other capacity layout, dense or packed; shadow experts; on a
GPU, the other shipped tiling of the Pallas grouped matmul),
so they share the parameter layout and compute the same function. The
trainer compiles a train step per plan and hands them to a
`jmoe.adaptive.PlanSwitch`, which times each on real steps and runs the
fastest; it re-times every `retime_every` steps, and when the recorded
expert loads move by more than `load_shift` (total-variation distance,
mean over layers) from those of the last timing. After the warm-up no step
compiles, and the losses are those of any one plan fixed (to float
rounding). The plan of every step is in `metrics.jsonl` (`plan`, an index
into the logged list) and TensorBoard; every timing round is logged.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import numpy as np

from jmoe.adaptive import PRUNE_RULE, Choice, PlanSwitch, prune_ok
from jmoe.config import (GPU_PLATFORMS, Execution, FieldError, from_section,
                         resolve_gmm_backend)
from jmoe.model_config import GPTConfig
from jmoe.planner import search
from jmoe.planner.step_cost import Setting, step_cost
from jmoe.train import rebalance


@dataclasses.dataclass(frozen=True)
class AdaptiveConfig:
    """`config.adaptive`, validated.

      plans: plans to switch among (0 or 1 = off: the config's plan only).
      trials: timed steps per plan in a timing round (after its first, which
        compiles).
      retime_every: steps between timing rounds; 0 = only at the start and
        on a load shift.
      load_shift: re-time when the expert loads move this far (total
        variation, 0..1) from those of the last timing; 0 = never.
      prune: within a timing round, stop timing a plan whose best step took
        more than `prune` times the fastest plan's median (`PlanSwitch`);
        0 = time every plan `trials` steps.
    """

    plans: int = 0
    trials: int = 2
    retime_every: int = 0
    load_shift: float = 0.0
    prune: float = 1.5

    @property
    def enabled(self) -> bool:
        return self.plans > 1


def adaptive_config(section) -> AdaptiveConfig:
    """From `config.adaptive` (absent = off); raises naming the field and fix."""
    ac = from_section(AdaptiveConfig, section, "config.adaptive")
    for name, low in (("plans", 0), ("trials", 1), ("retime_every", 0)):
        v = getattr(ac, name)
        if not isinstance(v, int) or v < low:
            raise FieldError("config.adaptive", name, v, f"must be an integer >= {low}.")
    if not prune_ok(ac.prune):
        raise FieldError("config.adaptive", "prune", ac.prune, PRUNE_RULE)
    if not 0.0 <= ac.load_shift <= 1.0:
        raise FieldError("config.adaptive", "load_shift", ac.load_shift,
                         "must be in [0, 1] (a total-variation distance; 0 = never).")
    return ac


def plan_name(s: Setting) -> str:
    return f"chunks={s.overlap_chunks} " + (f"2dh({s.a2a_hierarchy})" if s.a2a_hierarchy > 1
                                             else "flat")


def shortlist(ac: AdaptiveConfig, gpt: GPTConfig, config, mesh, hardware: str = "auto",
              predicted: Optional[dict] = None) -> dict:
    """{plan name: GPTConfig} of the plans to switch among, the config's first;
    `predicted`, if given, receives {plan name: the planner's step seconds}."""
    m = gpt.moe
    devices = int(np.prod(list(mesh.shape.values())))
    current = Setting(ep=mesh.shape["expert"], dispatch=m.dispatch,
                      capacity_factor=m.capacity_factor,
                      overlap_chunks=m.execution.overlap_chunks,
                      a2a_hierarchy=m.execution.a2a_hierarchy, ep_recv_factor=m.ep_recv_factor,
                      grad_accum_steps=int(config.grad_accum_steps),
                      fsdp=bool(config.mesh.get("fsdp", False)))
    backend = "cpu" if jax.default_backend() == "cpu" else "gpu"
    hw = rebalance.planner_profile(hardware)
    batch, seq = int(config.batch_size), int(config.data.seq_len)
    extras = _variants_of_the_config_plan(ac, m, current, config)
    settings = search.execution_shortlist(
        gpt, devices=devices, hw=hw, batch_size=batch, seq_len=seq, current=current,
        n=ac.plans - len(extras), backend=backend)
    out = {plan_name(s): dataclasses.replace(gpt, moe=s.layer(m)) for s, _ in settings}
    times = {plan_name(s): t for s, t in settings}
    for suffix, moe, priced in extras:
        name = f"{plan_name(current)} {suffix}"
        out[name] = dataclasses.replace(gpt, moe=moe)
        times[name] = (step_cost(out[name], current, seq_len=seq, batch_size=batch,
                                 devices=devices, hw=hw, backend=backend).time
                       if priced else times[plan_name(current)])
    if predicted is not None:
        predicted.update(times)
    return out


def _variants_of_the_config_plan(ac: AdaptiveConfig, m, current: Setting, config) -> list:
    """Plans that change one execution knob of the config's plan, which the
    planner's search does not vary: [(name suffix, MoEConfig, priced)], in
    priority order, leaving the search at least two plans (the config's
    and one more). `priced`: the planner models the knob (otherwise the
    prediction is the config plan's and only the timing judges it)."""
    ex, platform = m.execution, jax.default_backend()
    out = []
    # The dense emulation of the dropless exchange (CPU, two-level
    # all-to-all): the other bucket set.
    if m.dispatch == "dropless" and current.ep > 1 and ex.ragged(platform) == "dense":
        other = () if ex.ep_buckets else Execution().ep_buckets
        out.append((f"ep_buckets={other}", m.with_execution(ep_buckets=other), True))
    # Capacity dispatch: the dense [E, C] all-to-all and the packed kept rows
    # keep the same rows; which runs faster depends on the drops and loads.
    if (m.dispatch == "capacity" and m.router != "expert_choice" and current.ep > 1
            and ex.overlap_chunks == 1):
        other = "dense" if m.packed_capacity else "packed"
        out.append((f"capacity_layout={other}", m.with_execution(capacity_layout=other), True))
    # Shadow experts (FasterMoE): the step's hottest expert computed on every
    # device; worth what the loads make it, which the planner does not have.
    if m.dispatch == "dropless" and current.ep > 1 and not ex.shadow_experts:
        out.append(("shadow=1", m.with_execution(shadow_experts=1), False))
    # The Pallas grouped matmul (GPU): the shipped tiling class that `auto`
    # does not pick for these shapes.
    if (platform in GPU_PLATFORMS and resolve_gmm_backend(ex.gmm_backend, platform) == "pallas"
            and ex.gmm_tiling == "auto"):
        f_local = m.d_ff // max(1, int(config.mesh.get("tensor", 1)))
        other = "narrow" if min(m.d_model, f_local) >= 256 else "wide"
        out.append((f"gmm_tiling={other}", m.with_execution(gmm_tiling=other), False))
    return out[:max(0, ac.plans - 2)]


class AdaptiveSteps:
    """The trainer's view of a `PlanSwitch`: train and eval steps per plan,
    the plan each step ran on, and re-timing on a load shift."""

    def __init__(self, ac: AdaptiveConfig, steps: dict, on_choice: Callable[[Choice], None]):
        """steps: {plan name: (jitted train step, jitted eval step)}."""
        self.ac = ac
        self.names = list(steps)
        self.evals = {n: ev for n, (_, ev) in steps.items()}
        self.switch = PlanSwitch({n: tr for n, (tr, _) in steps.items()}, trials=ac.trials,
                                 retime_every=ac.retime_every, prune=ac.prune,
                                 on_choice=self._chosen)
        self._on_choice = on_choice
        self._ran: list = []  # plan index of each dispatched step not yet drained
        self._ref_load: Optional[np.ndarray] = None

    def _chosen(self, choice: Choice) -> None:
        self._ref_load = None  # the next drained step's loads become the reference
        self._on_choice(choice)

    def train(self, *args):
        out = self.switch(*args)
        self._ran.append(self.names.index(self.switch.last))
        return out

    def evaluate(self, *args):
        return self.evals[self.switch.current](*args)

    def observe(self, metrics: dict) -> dict:
        """Adds the plan of the drained step; re-times on a load shift."""
        metrics = dict(metrics, plan=self._ran.pop(0))
        load = metrics.get("expert_load")
        if self.ac.load_shift > 0 and load is not None and not self.switch.timing:
            load = np.asarray(load, np.float64)
            if self._ref_load is None:
                self._ref_load = load
            elif 0.5 * np.abs(load - self._ref_load).sum(axis=-1).mean() > self.ac.load_shift:
                self.switch.retime()
        return metrics

    def compiled_variants(self) -> dict:
        """{plan: compilations of its train step so far} (1 each after warm-up)."""
        return {n: self.switch.variants[n]._cache_size() for n in self.names}
