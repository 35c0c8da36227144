"""Run-time plan switching (issue 18): `jmoe.adaptive.PlanSwitch` times
compiled variants on real calls and runs the fastest; the trainer's
`config.adaptive` switches among planner-shortlisted plans without
recompiling after warm-up and without changing the losses."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe
from jmoe.adaptive import PlanSwitch
from jmoe.sharding import make_mesh
from jmoe.train import loop, plans
from test_train import tiny_config, train_losses


class FakeClock:
    """Time advances only when a variant runs: by that variant's cost."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _variants(clock, costs, log):
    def make(name):
        def run(x):
            log.append(name)
            clock.t += costs[name]
            return x + 1
        return run
    return {n: make(n) for n in costs}


def test_switch_times_each_variant_then_runs_the_fastest():
    """By hand: first calls compile (untimed), `trials` timed calls each,
    taking turns, then the fastest; a re-time round every `retime_every`
    calls."""
    clock, log = FakeClock(), []
    costs = {"a": 3.0, "b": 1.0, "c": 2.0}
    choices = []
    sw = PlanSwitch(_variants(clock, costs, log), trials=2, retime_every=4, block=lambda x: x,
                    clock=clock, on_choice=choices.append, prune=0)
    outs = [sw(i) for i in range(9)]
    assert outs == [i + 1 for i in range(9)]  # every call is a real step
    assert log == ["a", "a", "b", "b", "c", "c", "a", "b", "c"]
    assert sw.current == "b" and choices[0].medians == {"a": 3.0, "b": 1.0, "c": 2.0}
    costs["b"] = 5.0  # the load moved: b got slow
    log.clear()
    [sw(i) for i in range(4)]
    assert log == ["b"] * 4  # 4 calls since the round: no re-time yet
    [sw(i) for i in range(7)]
    # Re-time (everything is warm now: 2 timed calls each, in turns), then
    # the new fastest.
    assert log[4:] == ["a", "b", "c", "a", "b", "c", "c"] and sw.current == "c"
    assert len(choices) == 2 and choices[1].medians["b"] == 5.0


def test_switch_stops_timing_a_clearly_slower_variant():
    """prune=1.5: after its first timed call, a variant slower than 1.5x
    the fastest median so far leaves the round (c at 4x); one at 1.25x (b)
    keeps its `trials`. Its single time stays in the round's medians."""
    clock, log = FakeClock(), []
    costs = {"a": 1.0, "b": 1.25, "c": 4.0}
    sw = PlanSwitch(_variants(clock, costs, log), trials=3, block=lambda x: x, clock=clock,
                    prune=1.5)
    [sw(i) for i in range(11)]
    # Each first call is untimed; c leaves after its first timed call; a and
    # b take their 3 turns; then the fastest.
    assert log == ["a", "a", "b", "b", "c", "c", "a", "b", "a", "b", "a"]
    assert sw.choices[0].medians == {"a": 1.0, "b": 1.25, "c": 4.0} and sw.current == "a"
    assert log.count("c") == 2  # compile + one timed call, instead of 1 + trials
    # The slow variant comes first: it is timed once, then dropped when a
    # faster one has a median.
    log.clear()
    costs.update(a=5.0, b=1.0)
    sw.retime()
    [sw(i) for i in range(8)]
    assert log == ["a", "b", "c", "b", "b", "b", "b", "b"] and sw.current == "b"
    with pytest.raises(ValueError, match="prune=1.0 is invalid"):
        PlanSwitch({"x": lambda: 0}, prune=1.0)


def test_switch_retime_on_demand_and_bad_arguments():
    clock, log = FakeClock(), []
    sw = PlanSwitch(_variants(clock, {"x": 1.0, "y": 2.0}, log), trials=1,
                    block=lambda x: x, clock=clock)
    [sw(0) for _ in range(4)]
    assert sw.current == "x" and not sw.timing
    sw.retime()
    assert sw.timing
    [sw(0) for _ in range(2)]
    assert not sw.timing and log[-2:] == ["x", "y"]
    with pytest.raises(ValueError, match="at least one variant"):
        PlanSwitch({})
    with pytest.raises(ValueError, match="trials=0 is invalid"):
        PlanSwitch({"x": lambda: 0}, trials=0)


def test_switch_over_compiled_layer_variants_gives_the_same_results():
    """The layer-user API: two compiled execution plans of the same MoE layer
    on a mesh; whichever runs, the output is the same."""
    cfg = jmoe.MoEConfig(d_model=16, d_ff=32, num_experts=8, top_k=2, group_align=4)
    params = jmoe.init_params(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (128, 16))
    mesh = make_mesh(data=1, expert=8)
    step = lambda c: jax.jit(lambda p, x: jmoe.moe_apply(p, x, c, mesh=mesh)[0])
    sw = PlanSwitch({"flat": step(cfg), "2dh": step(cfg.with_execution(a2a_hierarchy=2)),
                     "chunked": step(cfg.with_execution(overlap_chunks=2))}, trials=1)
    outs = [np.asarray(sw(params, x)) for _ in range(7)]
    assert not sw.timing and sw.current in ("flat", "2dh", "chunked")
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], rtol=1e-5, atol=1e-6)
    assert all(f._cache_size() == 1 for f in sw.variants.values())


STEPS = 8
BASE = {"total_steps": STEPS, "checkpoint_every": STEPS, "eval_every": STEPS,
        "opt.schedule_steps": STEPS}


@pytest.mark.slow
@pytest.mark.parametrize("extra,special", [
    ({}, "shadow=1"),
    # Capacity that drops (cf 0.5) counted over the batch: packed by
    # default, so the other layout's plan is dense.
    ({"model.dispatch": "capacity", "model.capacity_factor": 0.5, "model.min_capacity": 1,
      "model.capacity_scope": "batch"}, "capacity_layout=dense"),
])
def test_adaptive_training_switches_plans_without_compiling_or_changing_losses(
        extra, special, tmp_path, monkeypatch):
    """Four shortlisted plans, one timed step each (dropless: two from the
    planner's search, the other bucket set, a shadow expert; capacity: three
    from the search and the other capacity layout): the losses equal the
    fixed plan's to 1e-5, every plan ran, and after the warm-up (the first
    timing round) no train step compiles."""
    compiles, state = [], {"warm": False, "in_train": False}

    def on_event(event, *duration, **kw):
        # A program taken from the persistent compilation cache (the tests
        # use one, tests/conftest.py) is a compile that did not run XLA.
        if event in ("/jax/core/compile/backend_compile_duration",
                     "/jax/compilation_cache/cache_hits") and state["in_train"]:
            compiles.append(state["warm"])
    jax.monitoring.register_event_duration_secs_listener(on_event)
    jax.monitoring.register_event_listener(on_event)

    inner = plans.AdaptiveSteps.train

    def spy(self, *args):
        state["in_train"] = True
        try:
            return inner(self, *args)
        finally:
            state["in_train"] = False
            state["warm"] = bool(self.switch.choices)
    monkeypatch.setattr(plans.AdaptiveSteps, "train", spy)

    fixed, adaptive = str(tmp_path / "fixed"), str(tmp_path / "adaptive")
    loop.run(tiny_config(**BASE, **extra), fixed)
    loop.run(tiny_config(**BASE, **extra, **{"adaptive.plans": 4, "adaptive.trials": 1,
                                             "adaptive.prune": 0}), adaptive)
    want, got = train_losses(fixed), train_losses(adaptive)
    np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)],
                               [want[s] for s in range(1, STEPS + 1)], rtol=1e-5)
    recs = [json.loads(l) for l in open(os.path.join(adaptive, "metrics.jsonl"))]
    rounds = [r for r in recs if r["split"] == "adaptive"]
    assert len(rounds) == 1 and len(rounds[0]["plans"]) == 4
    assert [p for p in rounds[0]["plans"] if p.endswith(special)]
    ran = sorted({p for r in recs if r["split"] == "train" for p in r.get("plans", [])})
    assert ran == [0, 1, 2, 3]
    assert compiles and not any(compiles)  # compiles only before the first choice


@pytest.mark.parametrize("overrides,match", [
    ({"adaptive.trials": 0}, "config.adaptive.trials=0 is invalid"),
    ({"adaptive.prune": 1.0}, "config.adaptive.prune=1.0 is invalid"),
    ({"adaptive.load_shift": 2.0}, "must be in \\[0, 1\\]"),
])
def test_bad_adaptive_configs_fail_before_compiling(overrides, match, tmp_path):
    with pytest.raises(loop.ConfigError, match=match):
        loop.run(tiny_config(**overrides), str(tmp_path))
