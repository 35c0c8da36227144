"""Each execution option changes the program it claims to change.

The equality tests (tests/test_overlap.py, tests/test_expert_parallel.py)
compare an option on against off; they would pass just as well if the option
were silently ignored. Here each option's mark is looked for in the jaxpr (or
the compiled HLO, where the collective's device groups matter) and must be
missing from the plain program. (`overlap_chunks` is covered by
tests/test_overlap.py: n all-to-alls per direction in the compiled HLO, and
the chunks' independence in the jaxpr.)
"""

import collections
import re

import jax
import jax.numpy as jnp
import pytest
from jax.extend import core as jax_core

import jmoe
from jmoe.sharding import make_mesh
from cfg_helpers import gpt_config, moe_config

D, F, E, T = 16, 32, 8, 64


def _cfg(**kw):
    base = dict(d_model=D, d_ff=F, num_experts=E, top_k=2, group_align=4, capacity_factor=2.0)
    base.update(kw)
    return moe_config(**base)


def _eqns(jaxpr):
    """Every equation of `jaxpr` and of the jaxprs nested in it (shard_map,
    cond branches, custom_vjp, ...), depth first."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax_core.jaxprs_in_params(eqn.params):
            yield from _eqns(sub)


def _layer_jaxpr(cfg, mesh, *, grad=False, num_tokens=T):
    params = jmoe.init_params(jax.random.key(0), cfg)
    f = lambda p, x: jmoe.moe_apply(p, x, cfg, mesh=mesh)[0]
    if grad:
        f = jax.grad(lambda p, x: jnp.sum(jmoe.moe_apply(p, x, cfg, mesh=mesh)[0] ** 2))
    return jax.make_jaxpr(f)(params, jnp.zeros((num_tokens, D))).jaxpr


def _layer_hlo(cfg, mesh):
    params = jmoe.init_params(jax.random.key(0), cfg)
    f = jax.jit(lambda p, x: jmoe.moe_apply(p, x, cfg, mesh=mesh)[0])
    return f.lower(params, jnp.zeros((T, D))).compile().as_text()


def _hlo_ops(hlo: str, op: str) -> list[str]:
    """The instruction lines of `op` (sync or async start) in compiled HLO text."""
    return [line for line in hlo.splitlines() if re.search(rf"\s{op}(-start)?\(", line)]


def _groups(line: str, attr: str = "replica_groups") -> list[tuple[int, ...]]:
    """`attr={{0,1},{2,3}}` of one HLO instruction as [(0, 1), (2, 3)]."""
    m = re.search(attr + r"=\{((?:\{[\d,]+\},?)+)\}", line)
    assert m, line
    return [tuple(int(v) for v in g.split(",")) for g in re.findall(r"\{([\d,]+)\}", m.group(1))]


# ------------------------------------------------------ collective matmul --

@pytest.mark.parametrize("tensor", [2, 4])
def test_collective_matmul_becomes_a_ppermute_ring(tensor):
    """With a `tensor` axis on the capacity path, collective_matmul=True swaps
    the down projection's reduce-scatter for tensor-1 collective-permutes,
    each a single ring over the devices of one tensor group."""
    mesh = make_mesh(data=1, expert=8 // tensor, tensor=tensor)
    cfg = _cfg(dispatch="capacity")
    plain = _layer_hlo(cfg, mesh)
    ring = _layer_hlo(cfg.with_execution(collective_matmul=True), mesh)
    assert not _hlo_ops(plain, "collective-permute")
    assert _hlo_ops(plain, "reduce-scatter")
    assert not _hlo_ops(ring, "reduce-scatter")
    permutes = _hlo_ops(ring, "collective-permute")
    assert len(permutes) == tensor - 1, permutes
    # Mesh axes are (data, expert, tensor) over devices 0..7 in order: the
    # tensor groups are runs of `tensor` consecutive ids.
    group_of = lambda d: d // tensor
    for line in permutes:
        dst = dict(_groups(line, "source_target_pairs"))
        assert sorted(dst) == list(range(8)) and sorted(dst.values()) == list(range(8))
        for src in range(8):
            assert group_of(dst[src]) == group_of(src) and dst[src] != src
            hop, n = dst[src], 1
            while hop != src:
                hop, n = dst[hop], n + 1
            assert n == tensor, f"{line}: not one ring over the tensor group"


# ---------------------------------------------------------------- Lancet --

def _gpt_jaxpr(lancet_chunks, mesh):
    from flax import nnx

    from jmoe import model as model_lib

    gcfg = gpt_config(dict(
        vocab_size=64, d_model=32, num_layers=1, num_heads=4, d_ff=32, num_experts=8,
        top_k=2, dispatch="dropless", group_align=4, lancet_chunks=lancet_chunks))
    abstract = nnx.eval_shape(lambda: model_lib.GPT(gcfg, rngs=nnx.Rngs(params=0)))
    graphdef, state = nnx.split(abstract)
    tokens = jax.ShapeDtypeStruct((4, 16), jnp.int32)
    with jax.set_mesh(mesh):
        return jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t)[0])(state, tokens).jaxpr


def _lancet_chunk(eqn):
    m = re.search(r"(?:^|/)lancet(\d+)(?:/|$)", str(eqn.source_info.name_stack))
    return int(m.group(1)) if m else None


@pytest.mark.parametrize("n", [2, 4])
def test_lancet_runs_n_independent_expert_exchanges(n):
    """lancet_chunks=n: the block's MoE runs as n expert-parallel shard_maps
    (each with its own all-to-alls) on T/n tokens, each under its `lancet{j}`
    scope, each fed by its own chunk's output projection and depending on no
    other chunk; with lancet_chunks=1 there is one shard_map, no chunk scope."""
    mesh = make_mesh(data=2, expert=4)
    tokens_per_chunk = 4 * 16 // n

    def moe_maps(jaxpr):
        maps = [(i, e) for i, e in enumerate(jaxpr.eqns) if e.primitive.name == "shard_map"]
        assert all(any(s.primitive.name == "all_to_all" for s in _eqns(e.params["jaxpr"]))
                   for _, e in maps)
        return maps

    off = _gpt_jaxpr(1, mesh)
    assert len(moe_maps(off)) == 1
    assert not any(_lancet_chunk(e) is not None for e in _eqns(off))

    on = _gpt_jaxpr(n, mesh)
    maps = moe_maps(on)
    assert sorted(_lancet_chunk(e) for _, e in maps) == list(range(n))
    producer = {v: i for i, e in enumerate(on.eqns) for v in e.outvars}
    for idx, eqn in maps:
        j = _lancet_chunk(eqn)
        assert eqn.invars[0].aval.shape == (tokens_per_chunk, 32)
        seen, stack = set(), [idx]
        while stack:
            for v in on.eqns[stack.pop()].invars:
                k = None if isinstance(v, jax_core.Literal) else producer.get(v)
                if k is not None and k not in seen:
                    seen.add(k)
                    stack.append(k)
        chunks = {_lancet_chunk(on.eqns[k]) for k in seen} - {None}
        assert chunks == {j}, f"chunk {j}'s exchange depends on chunks {chunks}"
        # The output projection (a matmul) is chunked, not done once for all T.
        assert any(on.eqns[k].primitive.name == "dot_general" and
                   _lancet_chunk(on.eqns[k]) == j for k in seen)


# ------------------------------------------------------------ ep_buckets --

@pytest.mark.parametrize("buckets", [(), (1.5, 3.0)])
def test_ep_buckets_switch_between_buffer_sizes(buckets):
    """ep_buckets=(1.5, 3.0) on 8 expert shards of 32 tokens (A = 64
    assignments each) puts the dropless exchange in a 3-way `lax.switch`
    whose branches move 8*16, 8*24 and 8*64 rows: per-pair slots of
    ceil8(1.5*64/8) = 16 and ceil8(3*64/8) = 24, then the worst case (all
    64 rows to every peer). ep_buckets=() moves the worst case only."""
    mesh = make_mesh(data=1, expert=8)
    jaxpr = _layer_jaxpr(_cfg(dispatch="dropless", ep_buckets=buckets), mesh, num_tokens=8 * 32)
    switches = [e for e in _eqns(jaxpr) if e.primitive.name == "cond"
                and "ep_buckets" in str(e.source_info.name_stack)]

    def exchanged_rows(eqns):
        # The row exchanges, not the per-peer counts and offsets.
        return sorted({e.invars[0].aval.shape[0] for e in eqns
                       if e.primitive.name == "all_to_all" and e.invars[0].aval.ndim == 2
                       and e.invars[0].aval.shape[1] == D})

    if not buckets:
        assert not switches
        assert exchanged_rows(_eqns(jaxpr)) == [8 * 64]
        return
    assert len(switches) == 1
    branches = switches[0].params["branches"]
    assert [exchanged_rows(_eqns(b.jaxpr)) for b in branches] == [[8 * 16], [8 * 24], [8 * 64]]


# --------------------------------------------------------- a2a_hierarchy --

# Expert axis of 8 devices (ids 0..7 in order) in node groups of g.
_INTRA = {2: [(0, 1), (2, 3), (4, 5), (6, 7)], 4: [(0, 1, 2, 3), (4, 5, 6, 7)]}
_INTER = {2: [(0, 2, 4, 6), (1, 3, 5, 7)], 4: [(0, 4), (1, 5), (2, 6), (3, 7)]}


@pytest.mark.parametrize("hierarchy", [0, 2, 4])
def test_a2a_hierarchy_groups_the_compiled_all_to_alls(hierarchy):
    """Capacity path, 8 expert shards: flat, 2 all-to-alls over all 8
    devices; two-level (g = 2 or 4), each becomes one within the node groups
    of g consecutive devices and one across them (same local index)."""
    cfg = _cfg(dispatch="capacity", a2a_hierarchy=hierarchy)
    hlo = _layer_hlo(cfg, make_mesh(data=1, expert=8))
    groups = collections.Counter(tuple(_groups(line)) for line in _hlo_ops(hlo, "all-to-all"))
    if hierarchy == 0:
        assert groups == {((0, 1, 2, 3, 4, 5, 6, 7),): 2}
    else:
        assert groups == {tuple(_INTRA[hierarchy]): 2, tuple(_INTER[hierarchy]): 2}


def test_a2a_hierarchy_reaches_every_dropless_exchange():
    """Dropless (counts, offsets and rows, every bucket): with g = 2 no
    all-to-all is flat and each one within groups has its partner across."""
    mesh = make_mesh(data=1, expert=8)
    flat = [e for e in _eqns(_layer_jaxpr(_cfg(dispatch="dropless"), mesh))
            if e.primitive.name == "all_to_all"]
    assert flat and all(e.params["axis_index_groups"] is None for e in flat)
    two = [e.params["axis_index_groups"]
           for e in _eqns(_layer_jaxpr(_cfg(dispatch="dropless", a2a_hierarchy=2), mesh))
           if e.primitive.name == "all_to_all"]
    as_tuples = collections.Counter(tuple(map(tuple, g)) if g else None for g in two)
    assert as_tuples == {tuple(_INTRA[2]): len(flat), tuple(_INTER[2]): len(flat)}


# ----------------------------------------------------------- gmm_backend --

@pytest.mark.parametrize("backend,mesh_shape", [
    ("xla", None), ("pallas", None), ("auto", None),
    ("xla", (1, 8)), ("auto", (1, 8))])
def test_gmm_backend_picks_the_kernel(backend, mesh_shape):
    """Dropless SwiGLU experts: 3 grouped matmuls forward (gate, up, down);
    backward, for each, the input gradient (a transposed gmm) and the weight
    gradient (tgmm). With 'pallas' every one is a pallas_call; with 'xla'
    (and 'auto' on CPU) none is."""
    mesh = None if mesh_shape is None else make_mesh(data=mesh_shape[0], expert=mesh_shape[1])
    cfg = _cfg(dispatch="dropless", gmm_backend=backend, ep_buckets=())
    grad_jaxpr = _layer_jaxpr(cfg, mesh, grad=True)
    kernels = collections.Counter(e.params["name"] for e in _eqns(grad_jaxpr)
                                  if e.primitive.name == "pallas_call")
    if backend == "pallas":
        assert kernels == {"jmoe_gmm": 3, "jmoe_gmm_t": 3, "jmoe_tgmm": 3}
    else:
        assert not kernels


def test_pallas_kernels_lower_for_cuda_inside_the_expert_shard_map():
    """The GPU path of `gmm_backend='pallas'` (also 'auto' on GPU) under an
    expert mesh: the kernels' outputs declare the manual axes they vary over,
    so the shard_map traces, and the program lowers to Triton calls for CUDA.
    (Without that declaration JAX refused to trace it: every GPU run on an
    expert mesh failed before compiling.)"""
    from jax.sharding import PartitionSpec as P
    from jmoe import kernels
    mesh = make_mesh(data=1, expert=8)

    def body(lhs, rhs, sizes):
        loss = lambda l, r: kernels.gmm(l, r, sizes, backend="pallas", interpret=False).sum()
        return jax.grad(loss, argnums=(0, 1))(lhs, rhs)

    lhs = jnp.zeros((8 * 64, 32), jnp.bfloat16)
    rhs = jnp.zeros((8 * 4, 32, 64), jnp.bfloat16)
    sizes = jnp.full((8 * 4,), 16, jnp.int32)
    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("expert"),) * 3,
                               out_specs=(P("expert"), P("expert"))))
    text = fn.trace(lhs, rhs, sizes).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") >= 3  # gmm, its transpose, tgmm


def test_pallas_on_an_expert_mesh_off_gpu_is_refused_before_compile():
    """Interpret mode (off GPU) cannot run inside the shard_map: a clear
    error naming the field and the fix, not JAX's internal one."""
    cfg = _cfg(dispatch="dropless", gmm_backend="pallas")
    params = jmoe.init_params(jax.random.key(0), cfg)
    with pytest.raises(ValueError, match=r"Execution.gmm_backend='pallas' is invalid: .*use "
                                         r"'xla' or 'auto' off GPU"):
        jmoe.moe_apply(params, jnp.zeros((64, cfg.d_model)), cfg,
                       mesh=make_mesh(data=1, expert=8))
