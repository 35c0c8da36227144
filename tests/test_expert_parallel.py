"""Expert parallelism on 8 CPU devices equals the single-device layer."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jmoe
from cfg_helpers import moe_config, with_execution
from jmoe.sharding import collectives, init_params_sharded, make_mesh

from checks import assert_tree_close, record_exchange_buffers
from hlo_checks import collective_groups, single_device_collectives

D, F, E, T = 16, 32, 8, 64


def _cfg(**kw):
    base = dict(d_model=D, d_ff=F, num_experts=E, top_k=2, group_align=4, capacity_factor=8.0)
    base.update(kw)
    return moe_config(**base)


def _fwd_bwd(cfg, params, x, ct, mesh):
    f = lambda p, x: jmoe.moe_apply(p, x, cfg, mesh=mesh)

    @jax.jit
    def run(p, x, ct):
        (y, aux), vjp = jax.vjp(f, p, x)
        zero_aux = jax.tree.map(jnp.zeros_like, aux)
        return y, aux, vjp((ct, zero_aux))
    return run(params, x, ct)


_REFERENCE = {}
MESHES = [(8, 1, 0), (4, 2, 0), (2, 4, 0), (2, 4, 2), (1, 8, 0), (1, 8, 2), (1, 8, 4)]


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
@pytest.mark.parametrize("data,expert,hierarchy", MESHES)
def test_expert_parallel_equals_single_device(dispatch, data, expert, hierarchy):
    cfg = _cfg(dispatch=dispatch, a2a_hierarchy=hierarchy, router="sigmoid_topk",
               num_shared_experts=1)
    params = jmoe.init_params(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (4, T // 4, D))
    ct = jax.random.normal(jax.random.key(2), x.shape)
    if dispatch not in _REFERENCE:  # the one-device result does not depend on the mesh
        _REFERENCE[dispatch] = _fwd_bwd(with_execution(cfg, a2a_hierarchy=0), params, x, ct, mesh=None)
    ref = _REFERENCE[dispatch]
    mesh = make_mesh(data=data, expert=expert)
    got = _fwd_bwd(cfg, params, x, ct, mesh=mesh)
    assert_tree_close(got, ref)


def test_aux_statistics_are_global():
    cfg = _cfg(dispatch="capacity", capacity_factor=0.5, min_capacity=1)
    params = jmoe.init_params(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (T, D))
    _, aux1 = jmoe.moe_apply(params, x, cfg)
    _, aux8 = jax.jit(lambda p, x: jmoe.moe_apply(p, x, cfg, mesh=make_mesh(data=1, expert=8)))(
        params, x)
    assert_tree_close((aux1.load_balance_loss, aux1.z_loss, aux1.router_entropy,
                        aux1.expert_load),
                       (aux8.load_balance_loss, aux8.z_loss, aux8.router_entropy,
                        aux8.expert_load))
    # Capacity is per token shard, so drops differ, but they are counted.
    assert float(aux8.dropped_fraction) > 0


def _all_to_one_expert(cfg, target=5):
    params = jmoe.init_params(jax.random.key(0), cfg)
    bias = jnp.zeros((E,)).at[target].set(100.0)  # selection only: weights stay unbiased
    return params, bias


@pytest.mark.parametrize("hierarchy", [0, 2])
def test_dropless_everything_to_one_expert_drops_nothing(hierarchy):
    cfg = _cfg(dispatch="dropless", router="sigmoid_topk", top_k=1, a2a_hierarchy=hierarchy)
    params, bias = _all_to_one_expert(cfg)
    x = jax.random.normal(jax.random.key(1), (T, D))
    y1, aux1 = jmoe.moe_apply(params, x, cfg, bias=bias)
    mesh = make_mesh(data=1, expert=8)
    y8, aux8 = jax.jit(lambda p, x, b: jmoe.moe_apply(p, x, cfg, bias=b, mesh=mesh))(
        params, x, bias)
    assert float(aux8.expert_load[5]) == 1.0
    assert float(aux8.dropped_fraction) == 0.0
    # Counting: every token's contribution is present (none is zero).
    assert np.all(np.abs(np.asarray(y8)).sum(-1) > 0)
    assert_tree_close(y8, y1)


def test_capped_receive_buffer_reports_its_drops():
    # A buffer of one device's worth of rows: device 5 accepts source 0 only.
    cfg = _cfg(dispatch="dropless", router="sigmoid_topk", top_k=1, ep_recv_factor=1.0)
    params, bias = _all_to_one_expert(cfg)
    x = jax.random.normal(jax.random.key(1), (T, D))
    mesh = make_mesh(data=1, expert=8)
    y8, aux8 = jax.jit(lambda p, x, b: jmoe.moe_apply(p, x, cfg, bias=b, mesh=mesh))(
        params, x, bias)
    assert float(aux8.dropped_fraction) == pytest.approx(7 / 8)
    y1, _ = jmoe.moe_apply(params, x, cfg.replace(ep_recv_factor=0.0), bias=bias)
    per_shard = T // 8
    assert_tree_close(y8[:per_shard], y1[:per_shard])
    np.testing.assert_array_equal(np.asarray(y8[per_shard:]), 0.0)


def _numpy_ragged_all_to_all(operands, outputs, in_off, send, out_off, recv):
    """The documented semantics of lax.ragged_all_to_all, for all devices at once."""
    outs = [o.copy() for o in outputs]
    n = len(operands)
    for i in range(n):          # sender
        for j in range(n):      # receiver
            size = send[i][j]
            assert size == recv[j][i]
            chunk = operands[i][in_off[i][j]: in_off[i][j] + size]
            outs[j][out_off[i][j]: out_off[i][j] + size] = chunk
    return outs


@pytest.mark.parametrize("hierarchy,slot_rows", [(0, None), (2, None), (0, 4), (2, 4)])
def test_dense_ragged_all_to_all_matches_documented_semantics(hierarchy, slot_rows):
    # slot_rows=4: per-pair buffers exactly as long as the longest slice.
    n, rows, out_rows = 4, 6, 10
    rng = np.random.default_rng(0)
    # send[i][j]: rows device i sends to j (zeros included); contiguous slices.
    send = np.array([[2, 0, 1, 3], [0, 0, 0, 0], [1, 4, 0, 1], [3, 1, 2, 0]], np.int32)
    in_off = np.concatenate([np.zeros((n, 1), np.int32), np.cumsum(send, 1)[:, :-1]], 1)
    recv = send.T.copy()
    # Receiver j places sender i's rows after a gap of one row per sender.
    out_off = np.zeros((n, n), np.int32)
    for j in range(n):
        pos = 0
        for i in range(n):
            out_off[i, j] = pos
            pos += recv[j, i] + (1 if i % 2 else 0)
    operands = rng.normal(size=(n, rows, 3)).astype(np.float32)
    outputs = np.full((n, out_rows, 3), -1.0, np.float32)
    expect = _numpy_ragged_all_to_all(list(operands), list(outputs), in_off, send, out_off, recv)
    mesh = make_mesh(data=2, expert=4)

    def body(op, out, io, ss, oo, rs):
        got = collectives.ragged_all_to_all_dense(
            op[0], out[0], io[0], ss[0], oo[0], rs[0], ep=4, hierarchy=hierarchy,
            slot_rows=slot_rows)
        return got[None]

    spec = P("expert")
    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 6, out_specs=spec))
    got = fn(operands, outputs, in_off, send, out_off, recv)
    np.testing.assert_array_equal(np.asarray(got), np.stack(expect))


@pytest.mark.parametrize("skewed", [False, True])
def test_ep_buckets_pick_the_smallest_fitting_exchange(monkeypatch, skewed):
    """A balanced router runs in the small bucket, an all-to-one router in the
    worst-case buffer (seen at run time from inside the branch taken), and
    both equal the bucket-free layer, forward and gradients."""
    seen = record_exchange_buffers(monkeypatch)
    tokens = 512
    cfg = _cfg(dispatch="dropless", router="sigmoid_topk", top_k=1, ep_buckets=(3.0,))
    params, bias = _all_to_one_expert(cfg)
    if not skewed:
        bias = jnp.zeros_like(bias)
    x = jax.random.normal(jax.random.key(1), (tokens, D))
    ct = jax.random.normal(jax.random.key(2), x.shape)
    mesh = make_mesh(data=1, expert=8)

    def run(c):
        f = lambda p, x: jmoe.moe_apply(p, x, c, bias=bias, mesh=mesh)[0]
        y, vjp = jax.vjp(f, params, x)
        return y, vjp(ct)

    got = jax.jit(lambda: run(cfg))()
    jax.effects_barrier()
    num_a = tokens // 8  # assignments per shard (top-1)
    slot = cfg.ep_bucket_slots(num_a, 8)
    assert slot == [3 * num_a // 8]
    assert set(seen) == {8 * num_a if skewed else 8 * slot[0]}, seen
    want = jax.jit(lambda: run(with_execution(cfg, ep_buckets=())))()
    assert_tree_close(got, want)


def test_sharded_init_holds_only_local_experts():
    cfg = _cfg()
    mesh = make_mesh(data=2, expert=4)
    params = init_params_sharded(jax.random.key(0), cfg, mesh)
    w = params["experts"]["w_up_EDF"]
    assert w.sharding.spec == P("expert", None, "tensor")
    shard_shapes = {s.data.shape for s in w.addressable_shards}
    assert shard_shapes == {(E // 4, D, F)}
    assert all(s.data.shape[0] < E for s in w.addressable_shards)
    np.testing.assert_allclose(np.asarray(w), np.asarray(
        jmoe.init_params(jax.random.key(0), cfg)["experts"]["w_up_EDF"]))


def test_expert_tensor_parallel_equals_single_device():
    cfg = _cfg(dispatch="dropless")
    params = jmoe.init_params(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (T, D))
    ct = jax.random.normal(jax.random.key(2), x.shape)
    for disp in ("dropless", "capacity"):
        c = cfg.replace(dispatch=disp)
        ref = _fwd_bwd(c, params, x, ct, None)
        got = _fwd_bwd(c, params, x, ct, make_mesh(data=1, expert=4, tensor=2))
        assert_tree_close(got, ref)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_expert_tensor_parallel_reduce_scatters_before_the_combine(dispatch):
    """psum over `tensor` = reduce-scatter + all-gather, with the combine
    all-to-all between them moving D/tp columns."""
    cfg = _cfg(dispatch=dispatch, ep_buckets=())
    params = jmoe.init_params(jax.random.key(0), cfg)
    mesh = make_mesh(data=1, expert=4, tensor=2)
    text = jax.jit(lambda p, x: jmoe.moe_apply(p, x, cfg, mesh=mesh)[0]).trace(
        params, jnp.zeros((T, D))).lower().as_text()
    assert "reduce_scatter" in text and "all_gather" in text
    assert "stablehlo.all_reduce" not in text.split("reduce_scatter")[1]  # no psum after it
    a2a_widths = {int(m) for m in re.findall(r"all_to_all.*?x(\d+)xf32>", text)}
    assert D // 2 in a2a_widths and D in a2a_widths  # combine half width, dispatch full


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_no_collective_runs_over_a_size_one_axis(dispatch):
    """On a 1x8 mesh (`data` and `tensor` of size 1) forward + backward has
    no collective whose groups are single devices: XLA:CPU keeps those, and
    each costs a rendezvous of all devices and copies of its operands."""
    cfg = _cfg(dispatch=dispatch)
    params = jmoe.init_params(jax.random.key(0), cfg)
    mesh = make_mesh(data=1, expert=8, tensor=1)
    assert set(mesh.axis_names) >= {"data", "tensor"}

    def loss(p, x):
        return jnp.sum(jmoe.moe_apply(p, x, cfg, mesh=mesh)[0] ** 2)

    text = jax.jit(jax.grad(loss)).trace(params, jnp.ones((T, D))).lower().compile().as_text()
    assert collective_groups(text), "no collective found: the test lost its subject"
    assert not single_device_collectives(text)


def test_native_ragged_branch_lowers_for_cuda():
    cfg = _cfg(dispatch="dropless", ragged_impl="native", gmm_backend="xla")
    params = jmoe.init_params(jax.random.key(0), cfg)
    x = jnp.zeros((T, D))
    mesh = make_mesh(data=2, expert=4)

    def loss(p, x):
        return jnp.sum(jmoe.moe_apply(p, x, cfg, mesh=mesh)[0] ** 2)

    lowered = jax.jit(jax.grad(loss)).trace(params, x).lower(lowering_platforms=("cuda",))
    assert "ragged-all-to-all" in lowered.as_text() or "ragged_all_to_all" in lowered.as_text()


def test_impossible_meshes_raise_before_compile():
    params6 = jmoe.init_params(jax.random.key(0), _cfg(num_experts=6))
    cfg6 = _cfg(num_experts=6)
    with pytest.raises(ValueError, match="num_experts=6"):
        jax.jit(lambda p, x: jmoe.moe_apply(p, x, cfg6, mesh=make_mesh(data=2, expert=4))).trace(
            params6, jnp.zeros((T, D)))
    cfg = _cfg()
    params = jmoe.init_params(jax.random.key(0), cfg)
    with pytest.raises(ValueError, match="divisible"):
        jax.jit(lambda p, x: jmoe.moe_apply(p, x, cfg, mesh=make_mesh(data=2, expert=4))).trace(
            params, jnp.zeros((T + 4, D)))
    with pytest.raises(ValueError, match=r"MoEConfig.num_experts=6 is invalid: it does not "
                                         r"divide over the mesh's expert axis of size 4"):
        init_params_sharded(jax.random.key(0), cfg6, make_mesh(data=2, expert=4))
    with pytest.raises(ValueError, match="device"):
        make_mesh(data=3, expert=2)
    with pytest.raises(ValueError, match="a2a_hierarchy"):
        jax.jit(lambda p, x: jmoe.moe_apply(
            p, x, with_execution(cfg, a2a_hierarchy=3), mesh=make_mesh(data=2, expert=4))).trace(
            params, jnp.zeros((T, D)))


def test_layer_uses_the_context_mesh():
    cfg = _cfg(dispatch="dropless")
    params = jmoe.init_params(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (T, D))
    mesh = make_mesh(data=2, expert=4)
    with jax.set_mesh(mesh):
        hlo = jax.jit(lambda p, x: jmoe.moe_apply(p, x, cfg)[0]).lower(params, x).as_text()
        y = jax.jit(lambda p, x: jmoe.moe_apply(p, x, cfg)[0])(params, x)
    assert "all_to_all" in hlo or "all-to-all" in hlo
    assert_tree_close(y, jmoe.moe_apply(params, x, cfg)[0])
