"""Chunked all-to-all / expert overlap is math-identical and structurally independent."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

import jmoe
from cfg_helpers import gpt_config, moe_config, with_execution
from jmoe import model_config
from jmoe.sharding import make_mesh

D, F, E, T = 16, 32, 8, 64


def _cfg(**kw):
    base = dict(d_model=D, d_ff=F, num_experts=E, top_k=2, group_align=4, capacity_factor=2.0)
    base.update(kw)
    return moe_config(**base)


def _run(cfg, mesh, params, x, ct):
    @jax.jit
    def f(p, x, ct):
        (y, aux), vjp = jax.vjp(lambda p, x: jmoe.moe_apply(p, x, cfg, mesh=mesh), p, x)
        return y, aux, vjp((ct, jax.tree.map(jnp.zeros_like, aux)))
    return f(params, x, ct)


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
@pytest.mark.parametrize("data,expert", [(2, 4), (1, 8)])
def test_overlap_chunks_equal_unchunked(dispatch, data, expert):
    cfg = _cfg(dispatch=dispatch, capacity_factor=1.0)  # some drops in the capacity path
    params = jmoe.init_params(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (T, D))
    ct = jax.random.normal(jax.random.key(2), (T, D))
    mesh = make_mesh(data=data, expert=expert)
    ref = _run(cfg, mesh, params, x, ct)
    for n in (2, 4):
        got = _run(with_execution(cfg, overlap_chunks=n), mesh, params, x, ct)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            b = np.asarray(b)
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5,
                                       atol=1e-5 * float(np.max(np.abs(b)) if b.size else 0) + 1e-7)


def _shard_map_body(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "shard_map":
            return eqn.params["jaxpr"]
        for sub in jax_core.jaxprs_in_params(eqn.params):
            found = _shard_map_body(sub)
            if found is not None:
                return found
    return None


def _chunk_of(eqn):
    stack = str(eqn.source_info.name_stack)
    for part in stack.split("/"):
        if part.startswith("chunk"):
            return int(part[5:])
    return None


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_chunks_are_independent_in_the_jaxpr(dispatch, monkeypatch):
    # The structure GPU/TPU get; on XLA:CPU the chunks are ordered on purpose
    # (see schedule.serialize_chunks), which the next test checks.
    from jmoe.sharding import schedule
    monkeypatch.setattr(schedule, "serialize_chunks", lambda: False)
    n = 4
    cfg = _cfg(dispatch=dispatch, overlap_chunks=n)
    params = jmoe.init_params(jax.random.key(0), cfg)
    mesh = make_mesh(data=1, expert=8)
    x = jnp.zeros((T, D))
    body = _shard_map_body(jax.make_jaxpr(
        lambda p, x: jmoe.moe_apply(p, x, cfg, mesh=mesh)[0])(params, x).jaxpr)
    producer = {}
    for idx, eqn in enumerate(body.eqns):
        for v in eqn.outvars:
            producer[v] = idx

    def ancestors(idx, seen):
        for v in body.eqns[idx].invars:
            j = producer.get(v) if not isinstance(v, jax_core.Literal) else None
            if j is not None and j not in seen:
                seen.add(j)
                ancestors(j, seen)
        return seen

    experts_of = {}
    a2a = []
    for idx, eqn in enumerate(body.eqns):
        c = _chunk_of(eqn)
        if c is None:
            continue
        if "local_experts" in str(eqn.source_info.name_stack):
            experts_of.setdefault(c, set()).add(idx)
        if eqn.primitive.name == "all_to_all":
            a2a.append((c, idx))
    assert sorted(experts_of) == list(range(n))
    assert {c for c, _ in a2a} == set(range(n))
    for c, idx in a2a:
        anc = ancestors(idx, set())
        for other, nodes in experts_of.items():
            if other != c:
                assert not (anc & nodes), f"chunk {c}'s all-to-all waits on chunk {other}'s experts"


def _shard_map_bodies(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "shard_map":
            yield eqn.params["jaxpr"]
        for sub in jax_core.jaxprs_in_params(eqn.params):
            yield from _shard_map_bodies(sub)


def test_expert_weight_grads_are_off_the_backward_all_to_all_chain():
    """Lancet: no all-to-all of the backward pass waits on an expert weight
    gradient, so the scheduler may overlap the two."""
    cfg = _cfg(dispatch="dropless", ep_buckets=(), gmm_backend="xla")
    params = jmoe.init_params(jax.random.key(0), cfg)
    mesh = make_mesh(data=1, expert=8)
    loss = lambda p, x: jnp.sum(jmoe.moe_apply(p, x, cfg, mesh=mesh)[0] ** 2)
    grad_jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, jnp.ones((T, D))).jaxpr
    later = wgrads = 0
    for body in _shard_map_bodies(grad_jaxpr):
        producer = {v: i for i, e in enumerate(body.eqns) for v in e.outvars}
        wgrad = {i for i, e in enumerate(body.eqns)
                 if "expert_weight_grad" in str(e.source_info.name_stack)}
        wgrads += len(wgrad)
        for i, e in enumerate(body.eqns):
            if e.primitive.name != "all_to_all":
                continue
            stack, seen = [i], set()
            while stack:
                for v in body.eqns[stack.pop()].invars:
                    j = None if isinstance(v, jax_core.Literal) else producer.get(v)
                    if j is not None and j not in seen:
                        seen.add(j)
                        stack.append(j)
            assert not seen & wgrad, "an all-to-all waits on an expert weight gradient"
            later += bool(wgrad) and i > min(wgrad)
    # The weight grads exist, and so does an exchange scheduled after them
    # (the dispatch's transpose, sending token gradients home).
    assert wgrads and later


def test_chunks_are_ordered_on_cpu():
    from jmoe.sharding import schedule
    assert schedule.serialize_chunks()  # this suite runs on CPU
    cfg = _cfg(dispatch="dropless", overlap_chunks=2)
    params = jmoe.init_params(jax.random.key(0), cfg)
    text = str(jax.make_jaxpr(lambda p, x: jmoe.moe_apply(
        p, x, cfg, mesh=make_mesh(data=1, expert=8))[0])(params, jnp.zeros((T, D))))
    assert "optimization_barrier" in text
    # The backward pass is ordered too (reverse order): its own barriers.
    grad_text = str(jax.make_jaxpr(jax.grad(lambda p, x: jnp.sum(jmoe.moe_apply(
        p, x, cfg, mesh=make_mesh(data=1, expert=8))[0])))(params, jnp.zeros((T, D))))
    assert grad_text.count("optimization_barrier") >= 2


def test_chunked_dropless_backward_at_a_size_that_crashed_xla_cpu():
    """jaxlib 0.10.2's XLA:CPU segfaulted in this backward pass (a YNNPACK
    fusion bug); tests/conftest.py applies the same workaround flags as
    train.py, so this runs and equals the unchunked layer."""
    cfg = moe_config(d_model=256, d_ff=256, num_experts=8, top_k=2, activation="gelu",
                     overlap_chunks=2)
    params = jmoe.init_params(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (2048, 256))
    y, _, grads = _run(cfg, make_mesh(data=1, expert=8), params, x, x)
    # (Chunked equals unchunked, gradients included, is tested above at
    # small sizes; here the forward against one device, and finite grads.)
    y1 = jax.jit(lambda p, x: jmoe.moe_apply(p, x, cfg)[0])(params, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y1), rtol=1e-5,
                               atol=1e-5 * float(np.max(np.abs(y1))))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("n", [1, 2, 4])
def test_compiled_hlo_has_n_all_to_alls_per_direction(n):
    cfg = _cfg(dispatch="capacity", overlap_chunks=n)
    params = jmoe.init_params(jax.random.key(0), cfg)
    mesh = make_mesh(data=1, expert=8)
    x = jnp.zeros((T, D))
    hlo = jax.jit(lambda p, x: jmoe.moe_apply(p, x, cfg, mesh=mesh)[0]).lower(
        params, x).compile().as_text()
    count = sum(1 for line in hlo.splitlines() if " all-to-all(" in line or "all-to-all-start(" in line)
    assert count == 2 * n  # n dispatch + n combine


@pytest.mark.parametrize("tensor", [2, 4])
def test_collective_matmuls_equal_plain_collectives(tensor):
    from jax.sharding import PartitionSpec as P
    from jmoe.sharding import collective_matmul as cm

    mesh = make_mesh(data=8 // tensor, expert=1, tensor=tensor)
    m, k, n = 8, 12, 6
    x = jax.random.normal(jax.random.key(0), (tensor * m, k))
    w = jax.random.normal(jax.random.key(1), (k, tensor * n))
    xk = jax.random.normal(jax.random.key(2), (tensor * m, tensor * k))
    wk = jax.random.normal(jax.random.key(3), (tensor * k, n))

    def sm(f, in_specs, out_specs):
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs))

    cases = [
        # all-gather rows of x, then matmul (plain vs ring, one- and two-way)
        # (outputs are per-device copies, stacked over `tensor`)
        (lambda a, b: jax.lax.all_gather(a, "tensor", tiled=True) @ b,
         lambda a, b: cm.all_gather_matmul(a, b, "tensor"),
         (P("tensor", None), P()), P("tensor"), (x, w[:, :n])),
        (lambda a, b: jax.lax.all_gather(a, "tensor", tiled=True) @ b,
         lambda a, b: cm.all_gather_matmul(a, b, "tensor", bidirectional=True),
         (P("tensor", None), P()), P("tensor"), (x, w[:, :n])),
        # FSDP-style: gather the weight's column shards
        (lambda a, b: a @ jax.lax.all_gather(b, "tensor", axis=1, tiled=True),
         lambda a, b: cm.all_gather_matmul(a, b, "tensor", gathered="rhs"),
         (P(), P(None, "tensor")), P("tensor"), (x, w)),
        # matmul over K shards, then reduce-scatter rows
        (lambda a, b: jax.lax.psum_scatter(a @ b, "tensor", scatter_dimension=0, tiled=True),
         lambda a, b: cm.matmul_reduce_scatter(a, b, "tensor"),
         (P(None, "tensor"), P("tensor", None)), P("tensor", None), (xk, wk)),
    ]
    for plain, ring, in_specs, out_specs, args in cases:
        f_plain, f_ring = sm(plain, in_specs, out_specs), sm(ring, in_specs, out_specs)
        y0, vjp0 = jax.vjp(f_plain, *args)
        y1, vjp1 = jax.vjp(f_ring, *args)
        np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=1e-5, atol=1e-5)
        ct = jax.random.normal(jax.random.key(9), y0.shape)
        for g1, g0 in zip(vjp1(ct), vjp0(ct)):
            np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tensor", [2, 4])
def test_collective_matmul_layer_equals_plain(tensor):
    cfg = _cfg(dispatch="capacity")
    params = jmoe.init_params(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (T, D))
    ct = jax.random.normal(jax.random.key(2), (T, D))
    mesh = make_mesh(data=1, expert=8 // tensor, tensor=tensor)
    ref = _run(cfg, None, params, x, ct)
    got = _run(with_execution(cfg, collective_matmul=True), mesh, params, x, ct)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5,
                                   atol=1e-5 * float(np.max(np.abs(b)) if b.size else 0) + 1e-7)


def test_gpu_flags_are_filtered_to_what_jaxlib_knows(tmp_path, monkeypatch):
    import subprocess
    import sys

    from jmoe.runtime import xla_flags

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    ok = xla_flags.supported_flags(["--xla_gpu_enable_latency_hiding_scheduler=true",
                                    "--xla_gpu_enable_this_flag_does_not_exist=true"])
    assert ok == ["--xla_gpu_enable_latency_hiding_scheduler=true"]
    # The full set, applied, starts JAX cleanly (no abort on a stale name).
    code = ("import os; from jmoe.runtime import xla_flags; "
            "added = xla_flags.configure_gpu_overlap(force=True); "
            "import jax; jax.devices(); print(len(added))")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), XLA_FLAGS="", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.strip()) >= 1
    # Not on a CPU-only machine unless forced.
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert xla_flags.configure_gpu_overlap() == []


def test_overlap_report_reads_async_pairs():
    from jmoe.runtime import xla_flags

    hlo = """
      %a2a-start = (f32[8]) all-to-all-start(f32[8] %p0), replica_groups={}
      %fusion.1 = f32[8] fusion(f32[8] %p1), kind=kLoop
      %a2a-done = f32[8] all-to-all-done((f32[8]) %a2a-start)
      %a2a-start.2 = (f32[8]) all-to-all-start(f32[8] %p0)
      %a2a-done.2 = f32[8] all-to-all-done((f32[8]) %a2a-start.2)
      %sync = f32[8] all-to-all(f32[8] %p2)
    """
    assert xla_flags.overlap_report(hlo) == {"all_to_all": 1, "async_pairs": 2,
                                             "compute_between": 1}


def _tiny_gpt(**kw):
    fields = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, d_ff=32,
                  num_experts=8, top_k=2, dispatch="dropless", group_align=4)
    fields.update(kw)
    return gpt_config(fields)


def _logits_and_grads(gcfg, tokens, mesh=None):
    from flax import nnx

    from jmoe import model as model_lib

    model = model_lib.init_model(gcfg, seed=0)
    graphdef, state = nnx.split(model)
    ct = jax.random.normal(jax.random.key(7), tokens.shape + (gcfg.vocab_size,))

    @jax.jit
    def run(state, tokens, ct):
        def f(state):
            logits, aux = nnx.merge(graphdef, state)(tokens)
            return logits, aux.load_balance_loss
        (logits, lb), vjp = jax.vjp(f, state)
        return logits, lb, vjp((ct, jnp.ones_like(lb)))

    if mesh is None:
        return run(state, tokens, ct)
    with jax.set_mesh(mesh):
        return run(state, tokens, ct)


@pytest.mark.parametrize("mesh_shape", [None, (2, 4)])
def test_lancet_block_equals_plain_block(mesh_shape):
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, 64)
    mesh = None if mesh_shape is None else make_mesh(data=mesh_shape[0], expert=mesh_shape[1])
    # One block (each chunk compiles its own expert-parallel exchange).
    ref = _logits_and_grads(_tiny_gpt(num_layers=1), tokens, mesh)
    got = _logits_and_grads(_tiny_gpt(num_layers=1, lancet_chunks=4 if mesh is None else 2),
                            tokens, mesh)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5,
                                   atol=1e-5 * float(np.max(np.abs(b)) if b.size else 0) + 1e-7)


def test_lancet_needs_dropless():
    with pytest.raises(ValueError, match="lancet_chunks"):
        _tiny_gpt(lancet_chunks=2, dispatch="capacity")


def test_scmoe_is_a_different_model_that_trains():
    import optax
    from flax import nnx

    from jmoe import model as model_lib

    gcfg = _tiny_gpt(scmoe=True)
    model = model_lib.init_model(gcfg, seed=0)
    plain = model_lib.init_model(_tiny_gpt(), seed=0)
    assert model_lib.count_params(nnx.state(model, nnx.Param)) == \
        model_config.param_count_formula(gcfg)["total"]
    assert model_config.param_count_formula(gcfg)["total"] > \
        model_config.param_count_formula(_tiny_gpt())["total"]
    del plain
    data = jax.random.randint(jax.random.key(3), (8, 17), 0, 16)  # a small alphabet: learnable
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        def loss_fn(m):
            logits, aux = m(data[:, :-1])
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, data[:, 1:]).mean()
            return nll + 0.01 * jnp.mean(aux.load_balance_loss)
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(8)]
    assert losses[-1] < losses[0] - 0.1
