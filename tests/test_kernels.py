"""jmoe.kernels against a per-group loop of dots: forward and gradients.

Every backend is checked on the same cases: partial tiles (M, K, N not tile
multiples), empty groups, one group holding every row, rows past
sum(group_sizes), sizes summing past M, fuzzed sizes. Pallas kernels run in
interpret mode here; their Triton lowering for CUDA is checked separately
(it runs on a CPU-only host).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

from jmoe import kernels
from jmoe.kernels import PALLAS_TILINGS, Tiling
from jmoe.kernels import xla_gmm

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


# ---------------------------------------------------------------------------
# The obvious reference, in float64 numpy.


def _group_rows(group_sizes, m):
    """Per group, the (start, end) rows it owns after clipping at m."""
    bounds, start = [], 0
    for size in group_sizes:
        end = min(start + max(int(size), 0), m)
        bounds.append((start, end))
        start = end
    return bounds


def ref_gmm(lhs, rhs, group_sizes, transpose_rhs=False):
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    if transpose_rhs:
        rhs = rhs.transpose(0, 2, 1)
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    for g, (s, e) in enumerate(_group_rows(group_sizes, lhs.shape[0])):
        out[s:e] = lhs[s:e] @ rhs[g]
    return out


def ref_tgmm(lhs, dout, group_sizes):
    lhs, dout = np.asarray(lhs, np.float64), np.asarray(dout, np.float64)
    out = np.zeros((len(group_sizes), lhs.shape[1], dout.shape[1]))
    for g, (s, e) in enumerate(_group_rows(group_sizes, lhs.shape[0])):
        out[g] = lhs[s:e].T @ dout[s:e]
    return out


def _close(got, want, dtype, what):
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max()) / scale
    assert err <= TOL[dtype], f"{what}: max error {err:.2e} (relative to {scale:.1f})"


def _data(m, k, n, g, dtype, seed=0):
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
    rhs = jnp.asarray(rng.standard_normal((g, k, n)) / np.sqrt(k), dtype)
    dout = jnp.asarray(rng.standard_normal((m, n)), dtype)
    return lhs, rhs, dout


@functools.partial(jax.jit, static_argnames=("backend", "tiling", "transpose_rhs"))
def _gmm_fwd_bwd(lhs, rhs, gs, dout, *, backend, tiling, transpose_rhs):
    """(out, dlhs, drhs), jitted whole: one compile per shape, not per routing."""
    out, vjp = jax.vjp(lambda a, b: kernels.gmm(
        a, b, gs, backend=backend, tiling=tiling, transpose_rhs=transpose_rhs),
        lhs, rhs)
    return (out, *vjp(dout))


@functools.partial(jax.jit, static_argnames=("backend", "tiling", "num_groups"))
def _tgmm_fwd_bwd(lhs, dout, gs, cot, *, backend, tiling, num_groups):
    out, vjp = jax.vjp(lambda a, d: kernels.tgmm(
        a, d, gs, num_groups=num_groups, backend=backend, tiling=tiling),
        lhs, dout)
    return (out, *vjp(cot))


def check_gmm(backend, m, k, n, group_sizes, tiling, dtype=jnp.float32,
              transpose_rhs=False):
    """Forward and both gradients of gmm against the reference."""
    g = len(group_sizes)
    lhs, rhs, dout = _data(m, k, n, g, dtype)
    if transpose_rhs:
        rhs = rhs.transpose(0, 2, 1)
    out, dlhs, drhs = _gmm_fwd_bwd(lhs, rhs, jnp.asarray(group_sizes, jnp.int32),
                                   dout, backend=backend, tiling=tiling,
                                   transpose_rhs=transpose_rhs)
    assert out.shape == (m, n) and out.dtype == dtype
    assert dlhs.dtype == dtype and drhs.dtype == dtype
    # Rows past sum(group_sizes) are exactly zero, and get exactly zero gradient.
    used = min(sum(group_sizes), m)
    assert not np.any(np.asarray(out[used:])) and not np.any(np.asarray(dlhs[used:]))
    # Reference from the same (rounded) inputs.
    lhs64, rhs64, dout64 = (np.asarray(a, np.float64) for a in (lhs, rhs, dout))
    _close(out, ref_gmm(lhs64, rhs64, group_sizes, transpose_rhs), dtype, "out")
    # dlhs[m] = dout[m] @ W[g].T, drhs[g] = lhs_g.T @ dout_g (transposed if rhs is).
    _close(dlhs, ref_gmm(dout64, rhs64.transpose(0, 2, 1), group_sizes,
                         transpose_rhs), dtype, "dlhs")
    want_drhs = ref_tgmm(lhs64, dout64, group_sizes)
    if transpose_rhs:
        want_drhs = want_drhs.transpose(0, 2, 1)
    _close(drhs, want_drhs, dtype, "drhs")


def check_tgmm(backend, m, k, n, group_sizes, tiling, dtype=jnp.float32,
               num_groups=None):
    """Forward and both gradients of tgmm against the reference."""
    g = len(group_sizes)
    lhs, _, dout = _data(m, k, n, g, dtype, seed=1)
    ng = num_groups or g
    used = list(group_sizes[:ng])
    cot = jnp.asarray(np.random.default_rng(2).standard_normal((ng, k, n)), dtype)
    out, dlhs, ddout = _tgmm_fwd_bwd(lhs, dout, jnp.asarray(group_sizes, jnp.int32),
                                     cot, backend=backend, tiling=tiling,
                                     num_groups=num_groups)
    assert out.shape == (ng, k, n) and out.dtype == dtype
    lhs64, dout64, cot64 = (np.asarray(a, np.float64) for a in (lhs, dout, cot))
    _close(out, ref_tgmm(lhs64, dout64, used), dtype, "tgmm")
    _close(dlhs, ref_gmm(dout64, cot64.transpose(0, 2, 1), used), dtype, "dlhs")
    _close(ddout, ref_gmm(lhs64, cot64, used), dtype, "ddout")


# (M, K, N, group_sizes, tiling): each row is one edge case.
CASES = {
    "aligned": (64, 32, 48, [16, 32, 16], (16, 16, 16)),
    "partial_tiles": (37, 20, 24, [10, 0, 20, 3], (16, 16, 16)),
    "empty_groups": (48, 16, 16, [0, 20, 0, 0, 28, 0], (16, 16, 16)),
    "one_group_has_all": (40, 16, 32, [0, 0, 40, 0], (16, 16, 16)),
    "rows_past_sum": (64, 16, 16, [5, 9, 0, 11], (16, 16, 16)),
    "sum_past_m": (30, 16, 16, [20, 20, 20], (16, 16, 16)),
    "all_empty": (24, 16, 16, [0, 0, 0], (16, 16, 16)),
    "m_below_tile": (7, 3, 5, [2, 0, 3], (16, 16, 16)),
    "multi_tile_groups": (200, 24, 40, [70, 3, 0, 100, 27], (32, 16, 32)),
}


# ---------------------------------------------------------------------------
# XLA backend.


@pytest.mark.parametrize("case", CASES)
def test_xla_gmm(case):
    check_gmm("xla", *CASES[case])


@pytest.mark.parametrize("case", ["multi_tile_groups"])
def test_xla_gmm_transposed_rhs(case):
    check_gmm("xla", *CASES[case], transpose_rhs=True)


# tgmm is also checked as drhs in every gmm case above.
@pytest.mark.parametrize("case", ["empty_groups", "multi_tile_groups"])
def test_xla_tgmm(case):
    check_tgmm("xla", *CASES[case])


def test_tgmm_num_groups_prefix():
    m, k, n, gs, t = CASES["multi_tile_groups"]
    check_tgmm("xla", m, k, n, gs, t, num_groups=3)


def test_xla_bf16():
    check_gmm("xla", *CASES["multi_tile_groups"], dtype=jnp.bfloat16)


@pytest.mark.parametrize("tm", [8, 32, 512])
def test_xla_chunk_sizes(tm):
    """Every rung of the chunk ladder, the masked tail, and tm > M."""
    check_gmm("xla", 150, 16, 24, [33, 0, 64, 1, 40], (tm, tm, tm))


def test_default_tiling_and_preferred_type():
    lhs, rhs, _ = _data(300, 64, 96, 3, jnp.bfloat16)
    gs = jnp.asarray([100, 0, 150], jnp.int32)
    out = kernels.gmm(lhs, rhs, gs, preferred_element_type=jnp.float32)
    assert out.dtype == jnp.float32
    _close(out, ref_gmm(np.asarray(lhs, np.float64), np.asarray(rhs, np.float64),
                        [100, 0, 150]), jnp.float32, "out")
    assert kernels.resolve_backend("auto") == "xla"  # tests run on CPU


# Shapes fixed, sizes fuzzed: one compile, each example is a new routing.
FUZZ_M, FUZZ_K, FUZZ_N, FUZZ_G = 96, 16, 24, 5


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(0, 60), min_size=FUZZ_G, max_size=FUZZ_G))
def test_xla_fuzzed_group_sizes(group_sizes):
    check_gmm("xla", FUZZ_M, FUZZ_K, FUZZ_N, group_sizes, (32, 32, 32))


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(0, 60), min_size=FUZZ_G, max_size=FUZZ_G))
def test_xla_tgmm_fuzzed_group_sizes(group_sizes):
    check_tgmm("xla", FUZZ_M, FUZZ_K, FUZZ_N, group_sizes, (32, 32, 32))


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=4, max_size=4))
def test_tile_to_group_map(group_sizes):
    """Every row below sum(group_sizes) is covered by exactly one visit of
    its own group; visits of a tile are a contiguous range."""
    m, tm = 64, 16
    meta = jax.jit(kernels.make_group_metadata, static_argnums=(1, 2))(
        jnp.asarray(group_sizes, jnp.int32), m, tm)
    owner = np.full(m, -1)
    for g, (s, e) in enumerate(_group_rows(group_sizes, m)):
        owner[s:e] = g
    covered = np.zeros(m, int)
    nv = int(meta.num_visits)
    vg, vt = np.asarray(meta.visit_group), np.asarray(meta.visit_tile)
    tvs = np.asarray(meta.tile_visit_start)
    for v in range(nv):
        rows = np.arange(vt[v] * tm, min(vt[v] * tm + tm, m))
        covered[rows[owner[rows] == vg[v]]] += 1
    assert np.all(covered[owner >= 0] == 1)
    assert tvs[0] == 0 and tvs[-1] == nv and np.all(np.diff(tvs) >= 0)
    for t in range(len(tvs) - 1):
        assert np.all(vt[tvs[t]:tvs[t + 1]] == t)


def test_xla_inside_shard_map():
    """Each device runs its own routing; values and gradients of replicated
    weights match the unsharded computation."""
    mesh = jax.make_mesh((2,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    m, k, n, g = 40, 16, 24, 3
    lhs, rhs, dout = _data(2 * m, k, n, g, jnp.float32)
    sizes = np.array([[10, 0, 25], [5, 30, 2]], np.int32)

    def local(a, b, gs):
        return kernels.gmm(a, b, gs[0], backend="xla")

    def f(a, b, gs):
        return jax.shard_map(local, mesh=mesh, in_specs=(P("x"), P(), P("x")),
                             out_specs=P("x"))(a, b, gs)

    out, vjp = jax.vjp(lambda a, b: jax.jit(f)(a, b, jnp.asarray(sizes)), lhs, rhs)
    dlhs, drhs = vjp(dout)
    l64, r64, d64 = (np.asarray(a, np.float64) for a in (lhs, rhs, dout))
    halves = [slice(0, m), slice(m, 2 * m)]
    want = np.concatenate([ref_gmm(l64[h], r64, sizes[i]) for i, h in enumerate(halves)])
    want_drhs = sum(ref_tgmm(l64[h], d64[h], sizes[i]) for i, h in enumerate(halves))
    _close(out, want, jnp.float32, "out")
    _close(drhs, want_drhs, jnp.float32, "drhs")
    want_dlhs = np.concatenate([ref_gmm(d64[h], r64.transpose(0, 2, 1), sizes[i])
                                for i, h in enumerate(halves)])
    _close(dlhs, want_dlhs, jnp.float32, "dlhs")


# ---------------------------------------------------------------------------
# Pallas kernels (interpret mode on CPU).


@pytest.mark.parametrize("case", ["aligned", "partial_tiles", "empty_groups",
                                  "rows_past_sum", "sum_past_m", "m_below_tile"])
def test_pallas_gmm(case):
    check_gmm("pallas", *CASES[case])


def test_pallas_transposed_rhs():
    check_gmm("pallas", *CASES["partial_tiles"], transpose_rhs=True)


@pytest.mark.parametrize("case", ["partial_tiles", "one_group_has_all", "all_empty"])
def test_pallas_tgmm(case):
    check_tgmm("pallas", *CASES[case])


def test_pallas_bf16():
    check_gmm("pallas", *CASES["partial_tiles"], dtype=jnp.bfloat16)


@settings(max_examples=8, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=3, max_size=3))
def test_pallas_fuzzed_group_sizes(group_sizes):
    check_gmm("pallas", 48, 16, 16, group_sizes, (16, 16, 16))


# ---------------------------------------------------------------------------
# CUDA lowering of every shipped Triton configuration (runs on a CPU host).


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("key", list(PALLAS_TILINGS), ids=lambda k: "-".join(k))
def test_shipped_tilings_lower_for_cuda(key, dtype):
    tiling = PALLAS_TILINGS[key]
    m, k, n, g = 300, 96, 160, 4  # no dimension a tile multiple

    def fwd_bwd(a, b, gs, d):
        out, vjp = jax.vjp(lambda a, b: kernels.gmm(
            a, b, gs, backend="pallas", tiling=tiling, interpret=False), a, b)
        return (out, *vjp(d))

    args = (jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((g, k, n), dtype),
            jax.ShapeDtypeStruct((g,), jnp.int32), jax.ShapeDtypeStruct((m, n), dtype))
    text = jax.jit(fwd_bwd).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    # gmm, transposed gmm (dlhs) and tgmm (drhs): three Triton kernels.
    assert text.count("__gpu$xla.gpu.triton") == 3, text[:2000]


def test_default_pallas_tiling_picks_table():
    assert kernels.tiles.default_pallas_tiling(jnp.bfloat16, 4096, 14336) == \
        PALLAS_TILINGS[("bf16", "wide")]
    assert kernels.tiles.default_pallas_tiling(jnp.float32, 64, 64) == \
        PALLAS_TILINGS[("f32", "narrow")]


# ---------------------------------------------------------------------------
# Errors before compile.


def _args(m=8, k=4, n=6, g=2, dtype=jnp.float32):
    return (jnp.zeros((m, k), dtype), jnp.zeros((g, k, n), dtype),
            jnp.asarray([4, 4], jnp.int32))


@pytest.mark.parametrize("tiling,match", [
    ((24, 16, 16), "power"), ((16, 0, 16), "power"), ((16, 16, 2048), "at most"),
    ((16, 16), "tiling"), (Tiling(16, 16, 16, num_warps=3), "num_warps"),
])
def test_bad_tiling_raises(tiling, match):
    for backend in ("xla", "pallas"):
        with pytest.raises(ValueError, match=match):
            kernels.gmm(*_args(), backend=backend, tiling=tiling)


def test_pallas_only_tile_limits():
    with pytest.raises(ValueError, match="at least 16"):
        kernels.gmm(*_args(), backend="pallas", tiling=(8, 16, 16))
    with pytest.raises(ValueError, match="too large"):
        kernels.gmm(*_args(), backend="pallas", tiling=Tiling(256, 256, 256, num_stages=4))
    kernels.gmm(*_args(), backend="xla", tiling=(8, 16, 16))  # fine on xla


def test_bad_backend_raises():
    with pytest.raises(ValueError, match=r"backend='triton'.*'auto', 'xla', 'pallas'"):
        kernels.gmm(*_args(), backend="triton")
    with pytest.raises(ValueError, match="backend"):
        kernels.tgmm(jnp.zeros((8, 4)), jnp.zeros((8, 6)), jnp.asarray([4, 4]),
                     backend="cuda")


def test_bad_shapes_and_dtypes_raise():
    lhs, rhs, gs = _args()
    bad = [
        ((lhs[0], rhs, gs), "lhs must have shape"),
        ((lhs, rhs[0], gs), "rhs must have shape"),
        ((lhs, rhs, gs[None]), "group_sizes must have shape"),
        ((lhs, rhs, jnp.asarray([1, 2, 3], jnp.int32)), "must match"),
        ((lhs, jnp.zeros((2, 5, 6)), gs), "I=4"),
        ((lhs.astype(jnp.int32), rhs, gs), "lhs has dtype int32"),
        ((lhs, rhs, gs.astype(jnp.float32)), "group_sizes has dtype"),
    ]
    for args, match in bad:
        with pytest.raises(ValueError, match=match):
            kernels.gmm(*args)
    with pytest.raises(ValueError, match="preferred_element_type"):
        kernels.gmm(lhs, rhs, gs, preferred_element_type=jnp.int32)
    with pytest.raises(ValueError, match="same number of rows"):
        kernels.tgmm(lhs, jnp.zeros((9, 6)), gs)
    with pytest.raises(ValueError, match="num_groups"):
        kernels.tgmm(lhs, jnp.zeros((8, 6)), gs, num_groups=3)


def test_xla_ladder():
    assert xla_gmm.chunk_ladder(512, 8192) == (512, 256, 128)
    assert xla_gmm.chunk_ladder(1024, 300) == (300, 256, 128)
    assert xla_gmm.chunk_ladder(32, 100) == (32, 16, 8)
    assert xla_gmm.chunk_ladder(64, 7) == (7,)
