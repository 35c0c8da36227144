"""The planner's view of placement (issue 14 item 6): recorded loads read
and mapped, online re-placement and shadow experts replayed on them, priced,
and recommended as `--config.*` overrides train.py accepts."""

import json
import os

import numpy as np
import pytest

from jmoe.config import MoEConfig
from jmoe.placement import Placement
from jmoe.planner import cli, hardware, placement_search as ps
from jmoe.planner.layer_cost import (expert_compute, placement_price, shadow_price,
                                     shadowed_device_loads)
from jmoe.planner.primitives import Prim, ring_allreduce, ring_gather

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_run(path, load_WLE, every=10):
    with open(path, "w") as f:
        for i, load in enumerate(load_WLE):
            f.write(json.dumps({"step": (i + 1) * every, "split": "train",
                                "expert_load": np.asarray(load).tolist(), "loss": 1.0}) + "\n")
            f.write(json.dumps({"step": (i + 1) * every, "split": "val", "loss": 1.0}) + "\n")


def _skewed(windows=12, layers=2, experts=8, seed=0):
    """Loads whose hot expert stays put for 4 windows, then moves."""
    rng = np.random.default_rng(seed)
    out = np.ones((windows, layers, experts))
    for w in range(windows):
        for l in range(layers):
            out[w, l, (w // 4 + 3 * l) % experts] = 4.0
    out *= rng.uniform(0.9, 1.1, out.shape)
    return out / out.sum(axis=2, keepdims=True)


def test_recorded_loads_are_read_and_mapped(tmp_path):
    load = _skewed()
    _write_run(tmp_path / "metrics.jsonl", load)
    rec = ps.read_recorded_loads(str(tmp_path))
    np.testing.assert_array_equal(rec.steps_W, np.arange(1, 13) * 10)
    np.testing.assert_allclose(rec.load_WLE, load)
    split = ps.map_loads(rec, num_layers=3, num_experts=16)
    # Layer 2 <- recorded layer 0; each expert split in two equal halves.
    np.testing.assert_allclose(split.load_WLE[:, 2, 0::2], load[:, 0, :] / 2)
    np.testing.assert_allclose(split.load_WLE[:, 2, 1::2], load[:, 0, :] / 2)
    merged = ps.map_loads(rec, num_layers=2, num_experts=4)
    np.testing.assert_allclose(merged.load_WLE[:, 1, 3], load[:, 1, 6] + load[:, 1, 7])
    assert "split into 2" in split.mapping and "merged" in merged.mapping
    with pytest.raises(ValueError, match="one must be a multiple of the other"):
        ps.map_loads(rec, num_layers=2, num_experts=12)
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        ps.read_recorded_loads(str(tmp_path / "nothing"))


def test_replay_scores_each_window_under_the_placement_then_in_force():
    """Against a hand replay: before the first decision the static layout;
    every decision balances the mean load since the last one."""
    load = _skewed(windows=8, layers=1)
    rec = ps.RecordedLoads(np.arange(1, 9) * 10, load, "synthetic")
    r = ps.replay(rec, ep=4, spare_slots=1, every=20)
    static = Placement.static(8, 4)
    from jmoe.balance import balance
    cur = balance(np.ones(8), 4, 3)
    want, pending = [], []
    for i, step in enumerate(rec.steps_W):
        want.append(cur.imbalance(load[i, 0]))
        pending.append(load[i, 0])
        if step % 20 == 0:
            mean = np.mean(pending, axis=0)
            pending = []
            new = balance(mean, 4, 3)
            if new.imbalance(mean) < cur.imbalance(mean) - 1e-9:
                cur = new
    np.testing.assert_allclose(r.busiest_placed_L[0], np.mean(want))
    np.testing.assert_allclose(r.busiest_static_L[0],
                               np.mean([static.imbalance(l[0]) for l in load]))
    assert r.decisions == 4 and r.busiest_placed_L[0] < r.busiest_static_L[0]


def test_shadowed_device_loads_by_hand():
    load = [0.4, 0.1, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05]
    # ep=4: devices hold (0,1), (2,3), (4,5), (6,7); expert 0 spread: 0.1 each.
    np.testing.assert_allclose(shadowed_device_loads(load, 4, 1), [0.2, 0.3, 0.3, 0.2])


def test_prices_are_the_primitives_they_name():
    hw = hardware.get("h100")
    moe = MoEConfig(d_model=1024, d_ff=4096, num_experts=16, top_k=2, dtype="bfloat16")
    fwd, bwd = expert_compute(4096 * 2, 2, 1024, 4096, 3, Prim(hw, "bfloat16"))
    matrix = 3 * 1024 * 4096 * 4
    p = placement_price(moe, 4096, 8, hw, busiest_before=1.8, busiest_after=1.1, redundant=8,
                        moved_slots=5)
    np.testing.assert_allclose(p.step_gain, 0.7 * (fwd + bwd))
    np.testing.assert_allclose(p.replica_sync, ring_allreduce(9 * matrix, 8, False, hw))
    np.testing.assert_allclose(p.move, ring_gather(3 * 24 * matrix, 8, False, hw))
    assert placement_price(moe, 4096, 8, hw, busiest_before=1.8, busiest_after=1.1,
                           redundant=0, moved_slots=0).replica_sync == 0.0
    s = shadow_price(moe, 4096, 8, hw, busiest_before=1.8, busiest_after=1.3, shadows=2)
    np.testing.assert_allclose(s.replica_sync, 2 * ring_allreduce(2 * matrix, 8, False, hw))
    np.testing.assert_allclose(s.step_gain, 0.5 * (fwd + bwd))


def test_plan_recommends_placement_flags_that_train_py_accepts(tmp_path, capsys):
    _write_run(tmp_path / "metrics.jsonl", _skewed(layers=4, experts=16))
    result = cli.run(["plan", f"--config={ROOT}/configs/gpt_moe.py:small", "--hardware=h100",
                      "--nodes=1", "--config.mesh.expert=8", f"--load={tmp_path}"])
    out = capsys.readouterr().out
    assert "Online expert re-placement" in out
    options = result["placement"]
    assert options and options[0].net_per_step_s > 0
    flags = cli.placement_overrides(options)
    assert flags and all(f in result["overrides"] for f in flags)
    from jmoe.train import cli as train_cli
    config = train_cli.load_config(f"{ROOT}/configs/gpt_moe.py", "small")
    assert cli.missing_fields(config, flags) == []
