"""FSDP (ZeRO-3) in the trainer: the partition rule, equal training, checkpoints.

Two short runs on mesh (data=2, expert=4), one with `config.mesh.fsdp` and one
without, serve the training and checkpoint tests. d_model=128 makes the
embeddings, attention and expert weights big enough (>= 2**14 elements) for
the rule to shard them; one layer and no dropless exchange buckets keep the
compiles short (buckets are an execution choice, FSDP does not touch them).
"""

import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jmoe import model as model_lib
from jmoe.sharding import make_mesh, specs
from jmoe.train import checkpoint, loop, mesh as mesh_lib, step as step_lib
from tests.test_train import tiny_config, train_losses

STEPS = 4  # trained steps; checkpoints at STEPS // 2 and STEPS
FSDP_MESH = {"model.d_model": 128, "model.num_layers": 1, "execution.ep_buckets": (),
             "mesh.data": 2, "mesh.expert": 4, "total_steps": STEPS,
             "opt.schedule_steps": STEPS, "eval_every": STEPS, "checkpoint_every": STEPS // 2}


def fsdp_config(fsdp: bool, **overrides) -> ml_collections.ConfigDict:
    return tiny_config(**{**FSDP_MESH, "mesh.fsdp": fsdp, **overrides})


def abstract_state(config):
    gpt = loop.validate_config(config)
    tx = step_lib.make_optimizer(config.opt, config.total_steps)
    init = step_lib.make_init(gpt, tx, config.seed)
    return init, jax.eval_shape(init)


def specs_by_path(shardings) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(shardings)[0]
    return {mesh_lib.path_str(p): s.spec for p, s in leaves}


def restore_onto(workdir, config, step, fsdp: bool):
    """The checkpoint of `step`, restored onto the shardings of `fsdp` on `config`'s mesh."""
    mesh = make_mesh(config.mesh, owner="config.mesh")
    _, abstract = abstract_state(config)
    target = loop.abstract_with(abstract, mesh_lib.state_shardings(mesh, abstract, fsdp=fsdp))
    mgr = checkpoint.manager(workdir, every=1, keep=10, read_only=True)
    _, state, _ = checkpoint.restore(mgr, target, step)
    mgr.close()
    return state


# ------------------------------------------------------------ partition rule --


def test_fsdp_spec_rule():
    rule = specs.fsdp_spec
    assert rule(P(), (256, 128), 2) == P("data", None)  # the largest dimension
    assert rule(P(), (128, 128), 2) == P("data", None)  # ties: the first
    assert rule(P(), (255, 128), 2) == P(None, "data")  # the largest that divides
    assert rule(P(), (255, 129), 2) == P()  # none divides: unchanged
    assert rule(P(), (64, 128), 2) == P()  # 8192 < FSDP_MIN_SIZE elements
    assert rule(P(), (64, 128), 2, min_size=1) == P(None, "data")
    assert rule(P(), (256, 128), 1) == P()  # data axis of size 1: nothing changes
    assert rule(P(), (), 2) == P()  # scalars
    assert rule(P("data", None), (256, 128), 2) == P("data", None)  # already FSDP
    w_gate, w_down = specs.EXPERT_SPECS["w_gate_EDF"], specs.EXPERT_SPECS["w_down_EFD"]
    assert rule(w_gate, (8, 128, 32), 2) == P("expert", "data", "tensor")
    assert rule(w_down, (8, 32, 128), 4) == P("expert", "tensor", "data")
    assert rule(w_gate, (8, 129, 32), 2) == w_gate  # D does not divide
    # On a mesh without 'tensor', F stays unsharded even where it is the largest:
    # the rule picks D, the dimension the expert specs leave free.
    assert specs.restrict(rule(w_gate, (8, 64, 512), 2), ("data", "expert")) == \
        P("expert", "data", None)


def test_fsdp_partitions_params_and_moments_on_mesh_2x4():
    config = fsdp_config(True)
    mesh = make_mesh(config.mesh, owner="config.mesh")
    init, abstract = abstract_state(config)
    on = specs_by_path(mesh_lib.state_shardings(mesh, abstract, fsdp=True))
    off = specs_by_path(mesh_lib.state_shardings(mesh, abstract, fsdp=False))
    expected = {
        "embed_VD": P("data", None),  # [256, 128]
        "unembed_DV": P(None, "data"),  # [128, 256]
        "blocks/0/attn/w_q_DHQ": P("data", None, None),  # [128, 2, 64]
        "blocks/0/attn/w_o_HQD": P(None, None, "data"),  # [2, 64, 128]
        "blocks/0/attn_norm/scale_D": P(),  # 128 elements: too small
        "final_norm/scale_D": P(),
        "blocks/0/ffn/router/w_DE": P(),  # [128, 8]: too small
        "blocks/0/ffn/experts/w_gate_EDF": P("expert", "data", "tensor"),  # [8, 128, 32]
        "blocks/0/ffn/experts/w_up_EDF": P("expert", "data", "tensor"),
        "blocks/0/ffn/experts/w_down_EFD": P("expert", "tensor", "data"),  # [8, 32, 128]
    }
    for name, spec in expected.items():
        assert on[f"params/{name}/value"] == spec, name
        # Adam's moments follow their parameter.
        assert on[f"opt_state/1/0/mu/{name}/value"] == spec, name
        assert on[f"opt_state/1/0/nu/{name}/value"] == spec, name
    assert on["step"] == on["opt_state/1/0/count"] == P()
    assert on["buffers/blocks/0/ffn/router/bias/value"] == P()
    # Without FSDP: experts over 'expert' (and 'tensor'), the rest replicated.
    assert off["params/blocks/0/ffn/experts/w_gate_EDF/value"] == P("expert", None, "tensor")
    assert off["params/embed_VD/value"] == off["params/blocks/0/attn/w_q_DHQ/value"] == P()
    # Every moment has its parameter's spec, for every parameter.
    for path, spec in on.items():
        if path.startswith("params/"):
            for moment in ("mu", "nu"):
                assert on[f"opt_state/1/0/{moment}/{path[len('params/'):]}"] == spec, path

    # With data=1 FSDP changes nothing.
    mesh18 = make_mesh(ml_collections.ConfigDict(dict(data=1, expert=8, tensor=1)))
    assert specs_by_path(mesh_lib.state_shardings(mesh18, abstract, fsdp=True)) == \
        specs_by_path(mesh_lib.state_shardings(mesh18, abstract, fsdp=False))

    # Initialised straight into the shardings: each device holds half of every
    # leaf FSDP splits, and the values do not depend on the sharding.
    with jax.set_mesh(mesh):
        states = {f: model_lib.compile_init(jax.jit(
            init, out_shardings=mesh_lib.state_shardings(mesh, abstract, fsdp=f)))()
            for f in (True, False)}
    sharded = 0
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(states[True])[0],
                            jax.tree.leaves(states[False])):
        name = mesh_lib.path_str(path)
        shard_on, shard_off = a.addressable_shards[0].data, b.addressable_shards[0].data
        if "data" in on[name]:
            sharded += 1
            assert 2 * shard_on.size == shard_off.size, name
        else:
            assert shard_on.shape == shard_off.shape, name
        np.testing.assert_array_equal(a, b)
    assert sharded == 3 * (2 + 7)  # (embed, unembed, 4 attention, 3 expert) x (param, mu, nu)
    per_device = {f: sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(s))
                  for f, s in states.items()}
    assert per_device[True] < 0.55 * per_device[False], per_device


def test_fsdp_must_be_a_bool():
    config = fsdp_config(True)
    config.mesh = ml_collections.ConfigDict(dict(data=2, expert=4, tensor=1, fsdp="yes"))
    with pytest.raises(ValueError, match=r"config\.mesh\.fsdp='yes' is invalid: .*"
                                         r"--config\.mesh\.fsdp=true"):
        loop.validate_config(config)


# ------------------------------------------------------ training and restore --


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{fsdp: (workdir, summary, state shardings the loop used)} of two short runs."""
    out = {}
    real = mesh_lib.state_shardings
    for fsdp in (False, True):
        seen = []

        def spy(mesh, abstract, fsdp=False):
            seen.append(real(mesh, abstract, fsdp=fsdp))
            return seen[-1]

        workdir = str(tmp_path_factory.mktemp(f"fsdp_{fsdp}"))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(mesh_lib, "state_shardings", spy)
            summary = loop.run(fsdp_config(fsdp), workdir)
        out[fsdp] = (workdir, summary, seen[0])
    return out


def test_fsdp_trains_like_replicated(runs):
    (dir_off, sum_off, _), (dir_on, sum_on, used) = runs[False], runs[True]
    # The loop really ran FSDP-sharded.
    assert specs_by_path(used)["params/embed_VD/value"] == P("data", None)
    off, on = train_losses(dir_off), train_losses(dir_on)
    assert sorted(on) == sorted(off) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([on[s] for s in off], [off[s] for s in off], rtol=1e-5)
    assert on[STEPS] < on[1]  # it learns
    np.testing.assert_allclose(sum_on["val_loss"], sum_off["val_loss"], rtol=1e-5)


def test_checkpoint_saved_with_fsdp_resumes_without_it(runs, tmp_path):
    (dir_off, sum_off, _), (dir_on, _, _) = runs[False], runs[True]
    config_off = fsdp_config(False)
    # Restoring lands on the requested shardings, either way round, with equal values.
    for workdir in (dir_on, dir_off):
        a = restore_onto(workdir, config_off, STEPS, fsdp=True)
        b = restore_onto(workdir, config_off, STEPS, fsdp=False)
        assert a.params["embed_VD"][...].sharding.spec == P("data", None)
        assert b.params["embed_VD"][...].sharding.spec == P()
        jax.tree.map(np.testing.assert_array_equal, a, b)

    # Resume the FSDP run's midway checkpoint without FSDP: the remaining
    # steps and the eval equal the run that never used FSDP.
    workdir = str(tmp_path / "resumed")
    half = os.path.join("checkpoints", str(STEPS // 2))
    shutil.copytree(os.path.join(dir_on, half), os.path.join(workdir, half))
    resumed = loop.run(config_off, workdir)
    off, got = train_losses(dir_off), train_losses(workdir)
    assert sorted(got) == list(range(STEPS // 2 + 1, STEPS + 1))  # only the resumed steps
    np.testing.assert_allclose([got[s] for s in got], [off[s] for s in got], rtol=1e-5)
    np.testing.assert_allclose(resumed["val_loss"], sum_off["val_loss"], rtol=1e-5)
