"""Online expert re-placement in the trainer (`config.placement`, issue 14):
turning it on never changes the losses, moves keep parameters and Adam
moments exactly, checkpoints hold logical order (they resume with placement
off, or on) and a placed run resumes bit-identically."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checks import assert_tree_close
from jmoe.placement import Placement
from jmoe.train import loop, rebalance, step as step_lib
from test_train import committed_steps, restore_state, tiny_config, train_losses

STEPS, EVERY = 8, 2
# The tiny run of test_train, shortened; experts re-placed every 2 steps
# whenever the balancer finds a better placement (policy 'always': the cost
# model would keep this tiny model static), one spare slot per device.
BASE = {"total_steps": STEPS, "checkpoint_every": STEPS // 2, "eval_every": STEPS,
        "opt.schedule_steps": STEPS}
PLACED = {"placement.every": EVERY, "placement.spare_slots": 1, "placement.policy": "always"}


def _records(workdir, split):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    static = str(tmp_path_factory.mktemp("static"))
    placed = str(tmp_path_factory.mktemp("placed"))
    loop.run(tiny_config(**BASE), static)
    loop.run(tiny_config(**BASE, **PLACED), placed)
    return static, placed


@pytest.mark.slow
def test_placement_moves_experts_and_keeps_the_losses(runs):
    """Same data and seed: losses equal the static run's to 1e-5 while the
    experts moved and the busiest device's load fell (the option took effect)."""
    static, placed = runs
    want, got = train_losses(static), train_losses(placed)
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                               rtol=1e-5)
    moves = _records(placed, "placement")
    assert [r["step"] for r in moves] == [2, 4, 6] and all(r["moved"] for r in moves)
    train = _records(placed, "train")
    assert "busiest_device" not in _records(static, "train")[0]
    # After the first move, every step's busiest device is below the static layout's.
    later = [r for r in train if r["step"] > EVERY]
    assert all(np.mean(r["busiest_device"]) < np.mean(r["busiest_device_static"]) for r in later)
    assert np.asarray(later[-1]["device_load"]).shape == (2, 8)


@pytest.mark.slow
def test_checkpoints_hold_logical_order_and_resume_without_placement(runs, tmp_path):
    """The placed run's checkpoint equals the static run's state (experts in
    logical order, moments too) and resumes with placement off: same losses."""
    static, placed = runs
    cfg = tiny_config(**BASE)
    mid = STEPS // 2
    want, _ = restore_state(static, cfg, mid)
    got, data_state = restore_state(placed, cfg, mid)
    assert "placement" in data_state  # the placement in use, for a bit-identical resume
    assert_tree_close(got, want)
    work = str(tmp_path / "resumed_static")
    shutil.copytree(placed, work)
    shutil.rmtree(os.path.join(work, "checkpoints", str(STEPS)))
    loop.run(cfg, work)  # placement off now
    want_l, got_l = train_losses(static), train_losses(work)
    np.testing.assert_allclose([got_l[s] for s in range(mid + 1, STEPS + 1)],
                               [want_l[s] for s in range(mid + 1, STEPS + 1)], rtol=1e-5)


@pytest.mark.slow
def test_a_placed_run_resumes_bit_identically(runs, tmp_path):
    """Restarting a placed run from its middle checkpoint replays the rest of
    the run exactly: same placement, same recorded loads, same decisions."""
    _, placed = runs
    work = str(tmp_path / "resumed_placed")
    shutil.copytree(placed, work)
    shutil.rmtree(os.path.join(work, "checkpoints", str(STEPS)))
    assert committed_steps(work) == [STEPS // 2]
    os.remove(os.path.join(work, "metrics.jsonl"))
    loop.run(tiny_config(**BASE, **PLACED), work)
    want, got = train_losses(placed), train_losses(work)
    assert [got[s] for s in range(STEPS // 2 + 1, STEPS + 1)] == \
        [want[s] for s in range(STEPS // 2 + 1, STEPS + 1)]
    assert ([r["step"] for r in _records(work, "placement")] ==
            [r["step"] for r in _records(placed, "placement") if r["step"] > STEPS // 2])


def _state_and_layout():
    """A slot-ordered train state of the tiny model (non-trivial Adam moments)."""
    cfg = tiny_config()
    gpt = loop.validate_config(cfg)
    tx = step_lib.make_optimizer(cfg.opt, cfg.total_steps)
    state = step_lib.make_init(gpt, tx, 0)()
    # Moments that differ per expert, so a wrong move cannot go unseen.
    state = jax.tree.map(lambda x: x + jax.random.normal(jax.random.key(x.size), x.shape,
                                                         x.dtype) if x.ndim >= 2 else x, state)
    blocks = {b: j for j, b in enumerate(gpt.moe_layers)}
    return state, blocks


def test_a_move_keeps_parameters_and_moments_exactly():
    """logical -> slots -> move -> logical gives back every leaf bit for bit,
    the params and Adam's mu and nu of every expert (each expert's first
    replica under the new placement is a copy of its slot under the old)."""
    state, blocks = _state_and_layout()
    rng = np.random.default_rng(0)
    old = [Placement(8, rng.permutation(np.r_[np.arange(8), rng.integers(0, 8, 8)]).reshape(8, 2))
           for _ in blocks]
    new = [Placement(8, rng.permutation(np.r_[np.arange(8), rng.integers(0, 8, 8)]).reshape(8, 2))
           for _ in blocks]
    idx = lambda ps, f: jnp.asarray(np.stack([f(p) for p in ps]), jnp.int32)
    slots = rebalance.reindex_experts(
        state, idx(old, lambda p: p.slot_expert_PS.reshape(-1)), blocks)
    from jmoe.placement import move_source
    moved = rebalance.reindex_experts(
        slots, idx(range(len(old)), lambda j: move_source(old[j], new[j])), blocks)
    back = rebalance.reindex_experts(
        moved, idx(new, lambda p: [p.replicas(e)[0] for e in range(8)]), blocks)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Every replica under the new placement holds its expert (not only the first).
    for path, leaf in jax.tree_util.tree_flatten_with_path(moved)[0]:
        j = rebalance._moe_index(path, blocks)
        if j is None:
            continue
        logical = leaf[np.array([new[j].replicas(e)[0] for e in range(8)])]
        np.testing.assert_array_equal(np.asarray(leaf),
                                      np.asarray(logical)[new[j].slot_expert_PS.reshape(-1)])
    # The expert leaves are what moved: params and both moments of each.
    moved_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(slots)[0]
                   if rebalance._moe_index(p, blocks) is not None]
    assert any("mu" in p for p in moved_paths) and any("nu" in p for p in moved_paths)
    assert len(moved_paths) == 3 * 3 * 2  # (param, mu, nu) x 3 swiglu matrices x 2 MoE layers


def test_logical_norm_counts_each_expert_once():
    """The clipped / logged gradient norm under a placement with replicas
    equals the norm of the logical gradients (replicas hold copies)."""
    state, blocks = _state_and_layout()
    grads = state.params
    place = [Placement(8, np.array([[0, 0], [1, 2], [3, 3], [4, 5], [6, 7], [7, 0], [1, 2],
                                    [5, 6]]))] * len(blocks)
    from jmoe.placement import stack
    slots = rebalance.reindex_experts(
        grads, jnp.asarray(np.stack([p.slot_expert_PS.reshape(-1) for p in place])), blocks)
    want = sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in jax.tree.leaves(grads))
    got = float(rebalance.logical_sq_norm(slots, stack(place), blocks))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    naive = sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in jax.tree.leaves(slots))
    assert naive > want * 1.05  # the replicas would count twice


@pytest.mark.parametrize("overrides,match", [
    ({"placement.spare_slots": 1}, "replicas need re-placement"),
    ({"placement.every": 2, "model.dispatch": "capacity"}, "capacity dispatch gives each replica"),
    ({"placement.every": 2, "placement.policy": "sometimes"}, "choose one of"),
    ({"placement.every": -1}, "must be an integer >= 0"),
    ({"placement.every": 2, "placement.hardware": "tpu9"}, "choose 'auto' or one of"),
])
def test_bad_placement_configs_fail_before_compiling(overrides, match, tmp_path):
    with pytest.raises(loop.ConfigError, match=match) as e:
        loop.run(tiny_config(**overrides), str(tmp_path))
    assert "config.placement" in str(e.value)
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


@pytest.mark.slow
def test_a_checkpoint_resumes_under_another_placement_and_mesh(runs, tmp_path, capfd):
    """The placed run's middle checkpoint resumes on mesh (2, 4) with two
    spare slots per device: the saved placement does not fit (another ep),
    so the run starts from the initial one and says so; same losses."""
    static, placed = runs
    work = str(tmp_path / "other_placement")
    shutil.copytree(placed, work)
    shutil.rmtree(os.path.join(work, "checkpoints", str(STEPS)))
    loop.run(tiny_config(**{**BASE, **PLACED, "placement.spare_slots": 2, "mesh.data": 2,
                            "mesh.expert": 4}), work)
    assert "saved placement is for ep=8" in capfd.readouterr().out
    want, got = train_losses(static), train_losses(work)
    np.testing.assert_allclose([got[s] for s in range(STEPS // 2 + 1, STEPS + 1)],
                               [want[s] for s in range(STEPS // 2 + 1, STEPS + 1)], rtol=1e-5)
