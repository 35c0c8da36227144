"""model.scan_layers: the blocks under lax.scan compute what the unrolled
blocks compute (issue 17), and XLA's memory analysis of the trainer's step
against the planner's prediction.

The scanned model of a seed starts from the unrolled model's weights,
stacked (`GPT.__init__` builds the blocks per layer, then stacks them), so
both are compared from one seed; gradients of the unrolled model are stacked
here by hand, layer i = first + r * period + j, to compare them leaf by leaf.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cfg_helpers import gpt_config
from checks import assert_tree_close
from jmoe import model as model_lib, routing
from jmoe.config import FieldError
from jmoe.planner.hardware import get as get_hardware
from jmoe.planner.step_cost import Setting, step_cost
from jmoe.sharding import make_mesh
from jmoe.train import compile_report, loop, mesh as mesh_lib, rebalance, step as step_lib
from test_train import tiny_config

TINY = dict(vocab_size=64, d_model=32, num_heads=2, num_experts=4, top_k=2, d_ff=32,
            group_align=8)
CASES = {
    "default": dict(num_layers=3),
    # Router jitter: each layer's key must be fold_in(rng, its layer index).
    "mixed": dict(num_layers=6, moe_every=2, first_dense_layers=1, jitter_eps=0.1),
    "lancet_remat": dict(num_layers=3, lancet_chunks=2, remat="full"),
    "scmoe_dots": dict(num_layers=4, moe_every=2, scmoe=True, remat="dots"),
}


def _cfg(scan, **kw):
    return gpt_config({**TINY, **kw, "scan_layers": scan})


def _layers_of(cfg):
    """[(layer, period position)] in the order the groups list them."""
    return [(a + r * p + j, j) for a, p, n in model_lib.scan_groups(cfg)
            for r in range(n) for j in range(p)]


@pytest.mark.parametrize("layers,every,first", [(4, 1, 0), (6, 2, 1), (7, 2, 0), (5, 3, 2),
                                                (3, 0, 0), (2, 1, 5)])
def test_scan_groups_cover_each_layer_once_with_one_shape_per_position(layers, every, first):
    cfg = gpt_config({**TINY, "num_layers": layers, "moe_every": every,
                      "first_dense_layers": first})
    order = _layers_of(cfg)
    assert [i for i, _ in order] == list(range(layers))
    for a, p, n in model_lib.scan_groups(cfg):
        for j in range(p):  # one block shape per period position: the scan body's
            kinds = {cfg.is_moe_layer(a + r * p + j) for r in range(n)}
            assert len(kinds) == 1, (a, p, n, j)


def _stacked(cfg, tree):
    """An unrolled model's pure-dict tree in the scanned layout (blocks with
    no leaves in `tree`, e.g. dense ones in a tree of router biases, left out)."""
    out = {k: v for k, v in tree.items() if k != "blocks"}
    blocks, stacks = tree.get("blocks", {}), {}
    for g, (a, p, n) in enumerate(model_lib.scan_groups(cfg)):
        layers = {j: jax.tree.map(lambda *x: np.stack(x),
                                  *[blocks[a + r * p + j] for r in range(n)])
                  for j in range(p) if a + j in blocks}
        if layers:
            stacks[g] = {"layers": layers}
    if stacks:
        out["stacks"] = stacks
    return out


def _loss_and_grads(cfg, tokens_BT, seed=0):
    model = model_lib.init_model(cfg, seed)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ct = jax.random.normal(jax.random.key(7), tokens_BT.shape + (cfg.vocab_size,))

    @jax.jit
    def run(params):
        def f(params):
            logits, aux = nnx.merge(graphdef, params, rest)(tokens_BT, train=True,
                                                             rng=jax.random.key(3))
            # A random cotangent for the logits, and the aux losses as trained.
            loss = jnp.sum(logits * ct) + jnp.sum(aux.load_balance_loss) + jnp.sum(aux.z_loss)
            return loss, (logits, aux)
        return jax.value_and_grad(f, has_aux=True)(params)

    (_, (logits, aux)), grads = run(params)
    return nnx.to_pure_dict(params), logits, aux, nnx.to_pure_dict(grads)


@pytest.mark.slow  # 25-40 s each on the shared 2-core CPU (two models initialised and compiled)
@pytest.mark.parametrize("case", list(CASES))
def test_scanned_model_equals_unrolled_logits_aux_and_grads(case):
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, TINY["vocab_size"])
    unrolled, scanned = _cfg(False, **CASES[case]), _cfg(True, **CASES[case])
    p_u, logits_u, aux_u, g_u = _loss_and_grads(unrolled, tokens)
    p_s, logits_s, aux_s, g_s = _loss_and_grads(scanned, tokens)
    # The option took effect: stacked leaves, no per-layer blocks.
    assert "blocks" not in p_s and "blocks" in p_u
    assert_tree_close(p_s, _stacked(unrolled, p_u), rtol=0)  # same initial weights
    assert_tree_close(logits_s, logits_u)
    # Per-layer statistics stay per layer, in layer order.
    assert aux_s.expert_load.shape == aux_u.expert_load.shape == (
        len(unrolled.moe_layers), TINY["num_experts"])
    assert_tree_close(aux_s, aux_u)
    assert_tree_close(g_s, _stacked(unrolled, g_u))


def _eqns(cfg):
    model = nnx.eval_shape(lambda: model_lib.GPT(cfg, rngs=nnx.Rngs(params=0)))
    graphdef, state = nnx.split(model)
    tokens = jnp.zeros((1, 8), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens))(state)
    return len(jaxpr.eqns)


def test_scanned_program_does_not_grow_with_depth():
    """The point of scanning: 2 and 8 MoE layers trace to the same number of
    top-level equations; the unrolled program grows with every layer."""
    assert _eqns(_cfg(True, num_layers=2)) == _eqns(_cfg(True, num_layers=8))
    assert _eqns(_cfg(False, num_layers=8)) > 3 * _eqns(_cfg(False, num_layers=2)) // 2


def _train(config, steps):
    """Losses of `steps` train steps, the final state and its shardings."""
    gpt = loop.validate_config(config)
    mesh = make_mesh(config.mesh, owner="config.mesh")
    tx = step_lib.make_optimizer(config.opt, config.total_steps)
    sched = step_lib.make_schedule(config.opt, config.total_steps)
    init = step_lib.make_init(gpt, tx, config.seed)
    shard = mesh_lib.state_shardings(mesh, jax.eval_shape(init), fsdp=config.mesh.fsdp)
    bsh = mesh_lib.batch_sharding(mesh)
    rng = np.random.default_rng(0)
    batches = rng.integers(0, 256, (steps, config.batch_size, config.data.seq_len + 1), np.int32)
    losses = []
    with jax.set_mesh(mesh):
        train, _ = step_lib.jit_steps(shard, bsh, step_lib.graphdef_of(gpt), tx, sched,
                                      step_lib.step_config(config))
        state = model_lib.compile_init(jax.jit(init, out_shardings=shard))()
        for b in batches:
            state, m = train(state, jax.device_put(b, bsh))
            losses.append(float(m["loss"]))
    return gpt, np.array(losses), state, shard


@pytest.mark.slow  # two expert-parallel train steps compile (~40 s on the shared CPU)
def test_training_on_a_2x4_fsdp_expert_mesh_matches_over_20_steps():
    """data=2 x expert=4 with FSDP, a dense first layer and sigmoid routing
    with its bias update (the stacked biases move one row per layer).

    Measured: losses within 1.6e-7. Weight decay on the stacked [R, D] norm
    scales (the optimizer's matrices-only mask read by rank) moved them by
    1e-3 after 20 steps: the tolerance is far below that."""
    kw = {"model.num_layers": 3, "model.first_dense_layers": 1, "model.router": "sigmoid_topk",
          "model.bias_update_rate": 0.05, "mesh.data": 2, "mesh.expert": 4, "mesh.fsdp": True,
          "total_steps": 20}
    gpt_u, loss_u, state_u, _ = _train(tiny_config(**kw), 20)
    gpt_s, loss_s, state_s, shard_s = _train(tiny_config(**kw, **{"model.scan_layers": True}), 20)
    assert np.all(np.isfinite(loss_u)) and loss_u[-1] < loss_u[0]
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-5)
    assert_tree_close(nnx.to_pure_dict(state_s.params), _stacked(gpt_u, nnx.to_pure_dict(state_u.params)),
                      rtol=1e-5)
    bias_u = _stacked(gpt_u, nnx.to_pure_dict(state_u.buffers))
    assert_tree_close(nnx.to_pure_dict(state_s.buffers), bias_u, rtol=1e-5)
    assert any(np.abs(b).max() > 0 for b in jax.tree.leaves(bias_u))  # the update ran
    # A stacked leaf is split as each of its layers is, its [R] axis whole.
    specs_u = jax.tree.map(lambda x: tuple(x.sharding.spec), nnx.to_pure_dict(state_u.params))
    specs_s = jax.tree.map(lambda x: tuple(x.sharding.spec), nnx.to_pure_dict(state_s.params))
    for g, (a, p, n) in enumerate(model_lib.scan_groups(gpt_u)):
        for j in range(p):
            for r in range(n):
                want = jax.tree.map(lambda s: (None,) + s, specs_u["blocks"][a + r * p + j],
                                    is_leaf=lambda s: isinstance(s, tuple))
                assert specs_s["stacks"][g]["layers"][j] == want
    assert specs_u["blocks"][1]["ffn"]["experts"]["w_up_EDF"][0] == "expert"


def test_resume_with_scan_layers_flipped_is_refused_before_compiling(tmp_path, monkeypatch):
    kw = {"model.num_layers": 1, "total_steps": 1, "checkpoint_every": 1, "eval_every": 1,
          "mesh.data": -1, "mesh.expert": 1, "async_checkpointing": False}
    loop.run(tiny_config(**kw), str(tmp_path))

    def no_compiling(*a, **k):
        raise AssertionError("compiled the train step before refusing")
    monkeypatch.setattr(compile_report, "compile_step", no_compiling)
    monkeypatch.setattr(step_lib, "jit_steps", no_compiling)
    with pytest.raises(loop.ConfigError, match=r"config\.model\.scan_layers=True differs from "
                       r"the checkpoint in this workdir \(False\): use a new --workdir"):
        loop.run(tiny_config(**kw, **{"model.scan_layers": True}), str(tmp_path))


def test_online_replacement_refuses_scan_layers():
    pc = rebalance.placement_config({"every": 10, "spare_slots": 0, "policy": "always",
                                     "hardware": "h100"})
    with pytest.raises(FieldError, match="model.scan_layers=false"):
        rebalance.check_model(pc, _cfg(True, num_layers=2), ep=1)
    rebalance.check_model(pc, _cfg(False, num_layers=2), ep=1)  # and only then


def test_router_bias_rows_follow_layer_order():
    """moe_block_rows of a stacked model maps each stacked layer to its row
    of the [L_moe] aux, as in the unrolled model."""
    cfg = _cfg(True, num_layers=7, moe_every=2, first_dense_layers=1)
    rows = [np.atleast_1d(r).tolist() for _, r in model_lib.init_model(cfg).moe_block_rows()]
    assert rows == [[0, 1, 2]]
    load = jnp.asarray([[3.0, 1, 1, 1], [1, 3, 1, 1], [1, 1, 3, 1]])
    got = jax.vmap(routing.update_bias, in_axes=(0, 0, None))(jnp.zeros((3, 4)), load, 1.0)
    want = [routing.update_bias(jnp.zeros(4), load[i], 1.0) for i in range(3)]
    np.testing.assert_allclose(got, np.stack(want))


# ------------------------------------------- XLA memory vs the planner --

def _xla_and_planner(scan, seq_len=64, batch_size=16, **model):
    """The trainer's step on one device at the default width (d=256, 16
    experts of 256, group_align 128): (CompileReport, the planner's memory
    dict). `model`: config.model / config.execution overrides."""
    config = tiny_config(**{"model.d_model": 256, "model.num_heads": 4, "model.d_ff": 256,
                            "model.num_experts": 16, "model.num_layers": 2,
                            "model.group_align": 128, "model.scan_layers": scan,
                            "data.seq_len": seq_len, "batch_size": batch_size,
                            **{("execution." if k == "remat" else "model.") + k: v
                               for k, v in model.items()}})
    gpt = loop.validate_config(config)
    mesh = make_mesh(data=1, expert=1, devices=jax.devices()[:1])
    tx = step_lib.make_optimizer(config.opt, config.total_steps)
    sched = step_lib.make_schedule(config.opt, config.total_steps)
    abstract = jax.eval_shape(step_lib.make_init(gpt, tx, 0))
    shard = mesh_lib.state_shardings(mesh, abstract)
    bsh = mesh_lib.batch_sharding(mesh)
    with jax.set_mesh(mesh):
        train, _ = step_lib.jit_steps(shard, bsh, step_lib.graphdef_of(gpt), tx, sched,
                                      step_lib.step_config(config))
        state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             abstract, shard)
        batch = jax.ShapeDtypeStruct((batch_size, seq_len + 1), jnp.int32, sharding=bsh)
        _, report = compile_report.compile_step(train, state, batch)
    mem = step_cost(gpt, Setting(1, "dropless", 1.25, 1, 0, 0.0, 1, False), seq_len=seq_len,
                    batch_size=batch_size, devices=1, hw=get_hardware("h100"),
                    backend="cpu").memory
    return report, mem


MEMORY_CASES = {
    # 1024 tokens of seq 64: the expert buffers (4096 static rows) lead.
    "2_layers": dict(),
    # A dense first layer, then 2 periods of (dense, MoE) in one scan of 2
    # repeats; 128 tokens, so weights lead; remat as XLA:CPU keeps it.
    "mixed_5_layers_remat": dict(seq_len=32, batch_size=4, num_layers=5, moe_every=2,
                                 first_dense_layers=1, remat="full"),
}


@pytest.mark.slow  # two train steps compile per case (~15-30 s on the shared CPU)
@pytest.mark.parametrize("case", list(MEMORY_CASES))
def test_xla_memory_of_scanned_and_unrolled_steps_against_the_planner(case):
    """XLA's memory analysis (compile_report) against the planner's
    prediction, scanned and unrolled: the issue's target, within 20%.

    Arguments are the state less its gradients (3 of the planner's 4 copies)
    plus the batch, scanned or not: stacking moves no bytes. The peak
    (arguments + new outputs + temporaries) against the planner's total:
    measured (jax 0.10.2, XLA:CPU with jmoe's CPU flags) 1.02 unrolled and
    0.95 scanned for "2_layers", 1.03 and 1.13 for "mixed_5_layers_remat"
    (the latter before the planner counted two score buffers, not three).

    What scanning adds (`scan_bytes`: one repeat's weights sliced out of the
    stacks and its gradient) against XLA's scanned less unrolled
    temporaries is checked where the scan is one MoE layer repeated: 26.0
    MB against 43.7 measured. It is a rough term: with remat and a (dense,
    MoE) period ("mixed_5_layers_remat") XLA adds 10 MB to the planner's 31.
    """
    (rep_u, mem), (rep_s, mem_s) = (_xla_and_planner(False, **MEMORY_CASES[case]),
                                    _xla_and_planner(True, **MEMORY_CASES[case]))
    batch = MEMORY_CASES[case].get("batch_size", 16)
    batch_bytes = batch * (MEMORY_CASES[case].get("seq_len", 64) + 1) * 4
    for rep in (rep_u, rep_s):
        assert rep.argument_bytes == pytest.approx(0.75 * mem["state"] + batch_bytes, abs=256)
        # The new state reuses the donated buffers; only the metrics are new.
        assert 0 <= rep.output_bytes - rep.alias_bytes < 4096
    # The planner prices the layout: the same items, plus the scan's term.
    scan = mem_s["activation_items"]["scan"]
    assert mem["activation_items"]["scan"] == 0
    assert mem_s["total"] - mem["total"] == pytest.approx(scan, rel=1e-9)
    for rep, m in ((rep_u, mem), (rep_s, mem_s)):
        assert 0.8 < m["total"] / rep.peak_bytes < 1.2, (m["total"] / rep.peak_bytes,
                                                         m["activation_items"])
    # The scan's own term against what XLA adds: loose (XLA's heap packs the
    # stacked buffers differently at each depth), but neither nothing nor
    # twice it (1.28).
    extra = rep_s.temp_bytes - rep_u.temp_bytes
    if case == "2_layers":
        assert 0.5 < scan / extra < 1.25, (scan, extra)
