"""FSDP weight gathering as ring collective matmuls (`fsdp_collective_matmul`).

Three levels, each against the plain collective it replaces:
  * the ring itself (`all_gather_einsum`) equals einsum(all_gather(w)), for a
    weight sharded on an output and on a contracting dimension;
  * the model's projections (attention q/k/v/o, dense FFN, tied unembedding)
    under a mesh with FSDP-sharded weights equal the switch-off model, whose
    weights GSPMD all-gathers, forward and gradients;
  * the trainer: equal losses, and the compiled step has the ring's
    collective-permutes in place of those weights' all-gathers.
"""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jmoe import model as model_lib
from jmoe import model_config
from jmoe.sharding import collective_matmul as cm, fsdp, make_mesh
from jmoe.train import loop, mesh as mesh_lib, step as step_lib
from tests.test_fsdp import fsdp_config
from hlo_checks import single_device_collectives

TOL = dict(rtol=1e-5, atol=1e-5)


def _max_abs_close(got, ref, rtol=1e-5):
    """allclose with the tolerance scaled by the reference's magnitude."""
    ref = np.asarray(ref)
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    np.testing.assert_allclose(np.asarray(got), ref, rtol=rtol, atol=rtol * scale + 1e-7)


# ------------------------------------------------------------------- ring --

# (spec, x shape, full w shape, w_dim): where the shard of w lies.
RING_CASES = [
    ("btd,df->btf", (2, 3, 8), (8, 12), 1),       # output dim (an up projection)
    ("btf,fd->btd", (2, 3, 8), (8, 6), 0),        # contracting dim (a down projection)
    ("btd,dhk->bthk", (2, 3, 8), (8, 2, 4), 0),   # contracting, N-d weight (q)
    ("btd,dhk->bthk", (2, 3, 8), (8, 3, 4), 2),   # output dim in the middle of the output
    ("bthk,hkd->btd", (2, 3, 2, 8), (2, 8, 4), 1),  # one of two contracting dims (o)
    ("btd,vd->btv", (2, 3, 8), (16, 8), 0),       # output dim of a transposed table
]


def test_all_gather_einsum_equals_plain_collective():
    """Every case, one- and two-way round a ring of 4, forward and both gradients."""
    mesh = make_mesh(data=4, expert=2)
    keys = iter(jax.random.split(jax.random.key(0), 3 * len(RING_CASES)))
    xs = [jax.random.normal(next(keys), c[1]) for c in RING_CASES]
    ws = [jax.random.normal(next(keys), c[2]) for c in RING_CASES]
    w_specs = [P(*("data" if i == c[3] else None for i in range(len(c[2]))))
               for c in RING_CASES]

    variants = {
        "plain": lambda spec, x, w, w_dim: jnp.einsum(
            spec, x, jax.lax.all_gather(w, "data", axis=w_dim, tiled=True)),
        "ring": lambda spec, x, w, w_dim: cm.all_gather_einsum(spec, x, w, "data", w_dim=w_dim),
        "two-way": lambda spec, x, w, w_dim: cm.all_gather_einsum(
            spec, x, w, "data", w_dim=w_dim, bidirectional=True),
    }

    def body(args):
        # Each variant gets its own copy of the inputs, so one VJP gives
        # every variant's gradients separately.
        return {name: [fn(c[0], x, w, c[3]) for c, x, w in zip(RING_CASES, *args[name])]
                for name, fn in variants.items()}

    # Outputs stacked over 'data': every device's copy is checked.
    in_specs = {name: ([P()] * len(xs), w_specs) for name in variants}
    f = jax.shard_map(body, mesh=mesh, in_specs=(in_specs,), out_specs=P("data"))

    @jax.jit
    def run(args):
        outs, vjp = jax.vjp(f, args)
        cts = [jax.random.normal(jax.random.key(i), y.shape) for i, y in enumerate(outs["plain"])]
        return outs, vjp({name: cts for name in variants})[0]

    outs, grads = run({name: (xs, ws) for name in variants})
    for name in ("ring", "two-way"):
        for i, case in enumerate(RING_CASES):
            msg = f"{name} {case}"
            np.testing.assert_allclose(outs[name][i], outs["plain"][i], **TOL, err_msg=msg)
            for k in range(2):  # d/dx, d/dw
                np.testing.assert_allclose(grads[name][k][i], grads["plain"][k][i], **TOL,
                                           err_msg=msg)


def test_all_gather_einsum_rejects_bad_specs():
    mesh = make_mesh(data=2, expert=4)
    x, w = jnp.ones((2, 4)), jnp.ones((4, 3))

    def call(spec, w_dim):
        fn = lambda a, b: cm.all_gather_einsum(spec, a, b, "data", w_dim=w_dim)
        return jax.shard_map(fn, mesh=mesh, in_specs=(P(), P()), out_specs=P("data"))(x, w)

    with pytest.raises(ValueError, match="explicit labels"):
        call("...d,df->...f", 1)
    with pytest.raises(ValueError, match="does not match"):
        call("btd,df->btf", 1)
    with pytest.raises(ValueError, match="batch dimension"):
        call("bd,bf->bf", 0)


# ------------------------------------------------------------ model layers --

LAYER = dict(vocab_size=256, d_model=128, num_layers=1, num_heads=2, dense=True,
             dense_d_ff=384, tie_embeddings=True)
# Ring-gathered weights of LAYER: q, k, v, o, gate, up, down, the tied table.
LAYER_RING_WEIGHTS = 8


def _layer_fn(graphdef, ring: bool):
    """(state, x_BTD) -> logits: one block, the final norm, the tied unembedding."""
    def fwd(state, x_BTD):
        model = nnx.merge(graphdef, state)
        h_BTD, _ = model.blocks[0](x_BTD, False, None)
        return model._unembed(model.final_norm(h_BTD))
    return fwd


@pytest.mark.parametrize("data,expert", [(2, 4), (4, 2), (8, 1)])
def test_ring_projections_equal_gathered_einsums(data, expert):
    """The switch on equals the switch off on the same FSDP-sharded weights,
    forward and gradients (weights and input), and every projection rings."""
    mesh = make_mesh(data=data, expert=expert)
    x_BTD = jax.random.normal(jax.random.key(1), (8, 16, LAYER["d_model"]))
    results = {}
    for ring in (False, True):
        cfg = model_config.from_config(LAYER, {"fsdp_collective_matmul": ring})
        graphdef, state = nnx.split(model_lib.init_model(cfg, seed=0))
        shardings = mesh_lib.state_shardings(mesh, state, fsdp=True)
        x_sharding = NamedSharding(mesh, P(("data", "expert")))
        fwd = _layer_fn(graphdef, ring)

        def fwd_bwd(state, x_BTD):
            y, vjp = jax.vjp(fwd, state, x_BTD)
            return y, vjp(jax.random.normal(jax.random.key(2), y.shape))

        with jax.set_mesh(mesh):
            jitted = jax.jit(fwd_bwd, in_shardings=(shardings, x_sharding))
            lowered = jitted.lower(state, x_BTD)
            results[ring] = jitted(jax.device_put(state, shardings),
                                   jax.device_put(x_BTD, x_sharding))
        permutes = lowered.as_text().count("collective_permute")
        if ring:
            assert not single_device_collectives(lowered.compile().as_text())
        # One hop per ring step and weight, forward and transposed backward.
        assert permutes == (2 * LAYER_RING_WEIGHTS * (data - 1) if ring else 0)
    (y_off, (g_off, gx_off)), (y_on, (g_on, gx_on)) = results[False], results[True]
    _max_abs_close(y_on, y_off)
    _max_abs_close(gx_on, gx_off)
    assert jax.tree.structure(g_on) == jax.tree.structure(g_off)
    for a, b in zip(jax.tree.leaves(g_on), jax.tree.leaves(g_off)):
        _max_abs_close(a, b)


def test_ring_applies_only_where_fsdp_shards():
    x_BTD = jnp.zeros((8, 4, 128))
    w_DF = jnp.zeros((128, 384))
    assert not fsdp.ring_applies("btd,df->btf", x_BTD, w_DF)  # no context mesh
    assert fsdp.ring_applies("btd,df->btf", x_BTD, w_DF, mesh=make_mesh(data=2, expert=4))
    for mesh, x, w in [
        (make_mesh(data=1, expert=8), x_BTD, w_DF),                 # nothing to gather
        (make_mesh(data=2, expert=4), x_BTD, jnp.zeros((128, 8))),  # too small to shard
        (make_mesh(data=2, expert=4), jnp.zeros((4, 4, 128)), w_DF),  # 4 rows, 8 shards
    ]:
        assert not fsdp.ring_applies("btd,df->btf", x, w, mesh=mesh)
    # The spec the ring assumes is the trainer's for the same leaf.
    mesh = make_mesh(data=2, expert=4)
    assert fsdp.weight_spec(w_DF.shape, mesh) == mesh_lib.spec_for(
        "params/blocks/0/ffn/w_up_DF/value", w_DF.shape, mesh.axis_names, fsdp_size=2)


def test_switch_needs_fsdp_and_a_bool():
    config = fsdp_config(False, **{"execution.fsdp_collective_matmul": True})
    with pytest.raises(ValueError, match=r"config\.execution\.fsdp_collective_matmul=True is "
                                         r"invalid: .*--config\.mesh\.fsdp=true"):
        loop.validate_config(config)
    loop.validate_config(fsdp_config(True, **{"execution.fsdp_collective_matmul": True}))
    with pytest.raises(ValueError,
                       match=r"config\.execution\.fsdp_collective_matmul=1 is invalid"):
        model_config.from_config({}, {"fsdp_collective_matmul": 1})


# ---------------------------------------------------------------- trainer --

STEPS = 4
# Layer 0 dense (its FFN is ring-gathered), layer 1 MoE; every weight below
# is >= 2**14 elements, so FSDP shards it.
TRAIN = {"model.num_layers": 2, "model.first_dense_layers": 1, "model.dense_d_ff": 384}
# q, k, v, o per layer, the dense layer's gate/up/down, the unembedding.
TRAIN_RING_WEIGHTS = 4 * 2 + 3 + 1
_COLLECTIVE = re.compile(r"= (\w+\[[\d,]*\])\S* (all-gather|collective-permute)(?:-start)?\(")


def _train(ring: bool):
    """(metrics of STEPS steps on one batch, the compiled train step, its config)."""
    config = fsdp_config(True, **TRAIN, **{"execution.fsdp_collective_matmul": ring})
    gpt = loop.validate_config(config)
    mesh = make_mesh(config.mesh, owner="config.mesh")
    tx = step_lib.make_optimizer(config.opt, config.total_steps)
    init = step_lib.make_init(gpt, tx, config.seed)
    shardings = mesh_lib.state_shardings(mesh, jax.eval_shape(init), fsdp=True)
    batch_sharding = mesh_lib.batch_sharding(mesh)
    shape = (config.batch_size, config.data.seq_len + 1)
    with jax.set_mesh(mesh):
        state = model_lib.compile_init(jax.jit(init, out_shardings=shardings))()
        train, _ = step_lib.jit_steps(shardings, batch_sharding, step_lib.graphdef_of(gpt), tx,
                                      step_lib.make_schedule(config.opt, config.total_steps),
                                      step_lib.step_config(config))
        batch = jax.device_put(jax.random.randint(jax.random.key(1), shape, 0, 256),
                               batch_sharding)
        compiled = train.lower(state, batch).compile()
        history = []
        for _ in range(STEPS):
            state, metrics = compiled(state, batch)
            history.append(metrics)
    return jax.device_get(history), compiled, config


@pytest.fixture(scope="module")
def trained():
    return {ring: _train(ring) for ring in (False, True)}


def test_training_losses_equal_with_and_without_ring(trained):
    def series(ring, key):
        return [float(m[key]) for m in trained[ring][0]]

    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(series(True, key), series(False, key), rtol=1e-5,
                                   err_msg=key)
    losses = series(True, "loss")
    assert losses[-1] < losses[0] - 0.1, losses  # it learns (warmup starts at lr 0)


def test_compiled_step_rings_instead_of_all_gathers(trained):
    def collectives(compiled):
        found = collections.defaultdict(list)
        text = compiled.as_text()
        for m in _COLLECTIVE.finditer(text):
            found[m.group(2)].append(m.group(1))
        found["all-to-all"] = len(re.findall(r" all-to-all(?:-start)?\(", text))
        return found

    off, on = collectives(trained[False][1]), collectives(trained[True][1])
    config = trained[True][2]
    data = config.mesh.data
    d, f, v = config.model.d_model, config.model.dense_d_ff, config.model.vocab_size
    h = config.model.num_heads
    ring_shapes = {f"f32[{d},{h},{d // h}]", f"f32[{h},{d // h},{d}]",  # q/k/v, o
                   f"f32[{d},{f}]", f"f32[{f},{d}]", f"f32[{d},{v}]"}   # FFN, unembedding
    # Without the switch GSPMD all-gathers these weights; with it none is
    # all-gathered (the shard_map takes the state's own sharding, so nothing
    # is resharded either) ...
    assert ring_shapes <= set(off["all-gather"]), off["all-gather"]
    assert not ring_shapes & set(on["all-gather"]), on["all-gather"]
    assert len(on["all-gather"]) == len(off["all-gather"]) - TRAIN_RING_WEIGHTS
    assert "collective-permute" not in off
    assert on["all-to-all"] == off["all-to-all"]  # the MoE's own: no resharding added
    # ... and each passes its shards round 'data' with collective-permutes:
    # data - 1 hops forward, and their transposes carrying the weight
    # gradient home (the reduce-scatter ring).
    assert len(on["collective-permute"]) == 2 * TRAIN_RING_WEIGHTS * (data - 1)
