"""Tile configurations, their checks, and the tile-to-group map.

The map drives the Pallas gmm kernel (the XLA backend walks groups directly,
see xla_gmm.py).

Rows of a grouped matmul are grouped contiguously: group g owns rows
[start[g], end[g]) with end = cumsum(group_sizes) (clipped at M) and
start = end - group_sizes. A row tile of `tm` rows may straddle a group
boundary. Like megablox and MegaBlocks we precompute, from `group_sizes`, the
list of *visits*: one (row tile, group) pair for every non-empty group that
intersects a row tile. A tile inside one group is visited once; a tile that
straddles b boundaries is visited b + 1 times, each time with a row mask.
Tiles past sum(group_sizes) are never visited, so their rows stay zero.

Visits are ordered by group and, because groups are contiguous, also by tile,
so the visits of tile t are the contiguous range
[tile_visit_start[t], tile_visit_start[t + 1]).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jmoe.config import GMM_TILINGS


class Tiling(NamedTuple):
    """Block sizes of a grouped matmul, plus Triton launch parameters.

    tm: rows of lhs per tile (the M dimension).
    tk: contraction block (the I dimension).
    tn: output-column block (the N dimension).
    num_warps, num_stages: passed to Triton on GPU; ignored elsewhere.

    A plain 3-tuple (tm, tk, tn) is accepted wherever a Tiling is.
    """

    tm: int
    tk: int
    tn: int
    num_warps: int = 4
    num_stages: int = 3


# Largest block edge we ship: beyond this a Triton tile no longer fits in
# registers/shared memory on any current GPU, and on CPU it buys nothing.
MAX_TILE = 1024
# Triton's tensor-core dot needs every block edge >= 16.
MIN_PALLAS_TILE = 16
# Shared-memory budget of one Triton program (H100: 227 KiB usable per block).
# Software pipelining keeps `num_stages` copies of the lhs and rhs blocks.
SMEM_BYTES = 227 * 1024


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def as_tiling(tiling: Tiling | tuple[int, ...], *, name: str = "tiling") -> Tiling:
    """Normalises a user tiling and raises ValueError if it cannot work."""
    if isinstance(tiling, Tiling):
        t = tiling
    else:
        try:
            t = Tiling(*tiling)
        except TypeError as e:
            raise ValueError(
                f"{name}={tiling!r} is invalid: pass (tm, tk, tn) or a "
                "jmoe.kernels.Tiling") from e
    for field in ("tm", "tk", "tn"):
        v = getattr(t, field)
        if not isinstance(v, int) or isinstance(v, bool) or not _is_pow2(v):
            raise ValueError(
                f"{name}.{field}={v!r} is invalid: tile sizes must be positive "
                "powers of two (Triton blocks are power-of-two tensors)")
        if v > MAX_TILE:
            raise ValueError(
                f"{name}.{field}={v} is invalid: tile sizes are at most "
                f"{MAX_TILE}")
    for field in ("num_warps", "num_stages"):
        v = getattr(t, field)
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}.{field}={v!r} is invalid: must be an int >= 1")
    if not _is_pow2(t.num_warps):
        raise ValueError(
            f"{name}.num_warps={t.num_warps} is invalid: must be a power of two")
    return t


def check_pallas_tiling(t: Tiling, itemsize: int, *, name: str = "tiling") -> None:
    """Raises ValueError for a tiling the Triton lowering cannot run."""
    for field in ("tm", "tk", "tn"):
        v = getattr(t, field)
        if v < MIN_PALLAS_TILE:
            raise ValueError(
                f"{name}.{field}={v} is invalid for backend='pallas': Triton "
                f"dots need blocks of at least {MIN_PALLAS_TILE}")
    smem = t.num_stages * (t.tm * t.tk + t.tk * t.tn) * itemsize
    if smem > SMEM_BYTES:
        raise ValueError(
            f"{name}={tuple(t)} is too large for backend='pallas': "
            f"{t.num_stages} stages x (tm*tk + tk*tn) x {itemsize} B = {smem} B "
            f"of shared memory > {SMEM_BYTES} B; use smaller tiles or fewer "
            "num_stages")


# Shipped Triton configurations, keyed by (dtype class, shape class). The
# shape class is "narrow" when the smaller of the two non-row dimensions is
# under 256 (small experts / tests) and "wide" otherwise. fp32 blocks are
# smaller because fp32 operands take twice the shared memory. Every entry is
# lowered for CUDA in tests/test_kernels.py.
PALLAS_TILINGS: dict[tuple[str, str], Tiling] = {
    ("bf16", "wide"): Tiling(128, 64, 128, num_warps=4, num_stages=3),
    ("bf16", "narrow"): Tiling(64, 32, 64, num_warps=4, num_stages=3),
    ("f32", "wide"): Tiling(64, 32, 128, num_warps=4, num_stages=3),
    ("f32", "narrow"): Tiling(32, 32, 64, num_warps=4, num_stages=2),
}


def dtype_class(dtype) -> str:
    return "f32" if jnp.dtype(dtype).itemsize >= 4 else "bf16"


def check_tiling_class(name: str) -> None:
    """Raises naming the choices unless `name` is `auto` or a shipped class."""
    if name not in GMM_TILINGS:
        raise ValueError(f"tiling={name!r} is unknown: use one of {GMM_TILINGS}, "
                         "(tm, tk, tn) or a Tiling.")


def default_pallas_tiling(dtype, k: int, n: int, shape_class: str = "auto") -> Tiling:
    """Picks the shipped Triton tiling for operands of `dtype`, I=k, N=n:
    of `shape_class` (`wide` or `narrow`), or by the shape for `auto`
    (wide when min(I, N) >= 256)."""
    check_tiling_class(shape_class)
    if shape_class == "auto":
        shape_class = "wide" if min(k, n) >= 256 else "narrow"
    return PALLAS_TILINGS[(dtype_class(dtype), shape_class)]


# Largest row chunk of the XLA backend (only tm matters there). On the shared
# 2-core CPU of bench/gmm.py, tm = 512, 1024 and 2048 came out within about 5%
# of each other in fwd+bwd CPU time. 512 has the fewest ladder rungs (512, 256,
# 128), so it compiles fastest, and it has the smallest masked tail.
XLA_TM = 512


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GroupMetadata:
    """The tile-to-group map of one call (all int32 arrays; shapes static).

    G groups, T = ceil(M / tm) row tiles, V = T + G - 1 visit slots (the most
    visits any group_sizes can need).

    group_start, group_end: [G] row range of each group, clipped to [0, M].
    visit_group, visit_tile: [V] group and row tile of each visit; slots past
      `num_visits` are padding (group G-1, tile T-1) and must not be executed.
    num_visits: [] number of real visits.
    tile_visit_start: [T + 1] visits of tile t are
      [tile_visit_start[t], tile_visit_start[t + 1]).
    """

    group_start: jax.Array
    group_end: jax.Array
    visit_group: jax.Array
    visit_tile: jax.Array
    num_visits: jax.Array
    tile_visit_start: jax.Array


def group_bounds(group_sizes_G: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """[G] start and end row of each group, clipped to [0, m]."""
    sizes = jnp.maximum(group_sizes_G.astype(jnp.int32), 0)
    csum = jnp.cumsum(sizes)
    end = jnp.minimum(csum, m)
    start = jnp.minimum(csum - sizes, m)
    return start, end


def make_group_metadata(group_sizes_G: jax.Array, m: int, tm: int) -> GroupMetadata:
    """Builds the tile-to-group map for M=m rows in tiles of tm rows."""
    num_groups = group_sizes_G.shape[0]
    num_tiles = -(-m // tm)
    num_slots = num_tiles + num_groups - 1
    start, end = group_bounds(group_sizes_G, m)
    first_tile = start // tm
    last_tile = (end + tm - 1) // tm  # exclusive
    visits_per_group = jnp.where(end > start, last_tile - first_tile, 0)
    visit_csum = jnp.cumsum(visits_per_group)
    num_visits = visit_csum[-1]
    slot = jnp.arange(num_slots, dtype=jnp.int32)
    # Group of visit v: the first group whose inclusive visit count exceeds v.
    visit_group = jnp.searchsorted(visit_csum, slot, side="right").astype(jnp.int32)
    visit_group = jnp.minimum(visit_group, num_groups - 1)
    first_visit = visit_csum - visits_per_group
    visit_tile = first_tile[visit_group] + slot - first_visit[visit_group]
    real = slot < num_visits
    visit_tile = jnp.where(real, visit_tile, num_tiles - 1).astype(jnp.int32)
    # Padding slots sort after every tile so they never enter a tile's range.
    sort_key = jnp.where(real, visit_tile, num_tiles)
    tile_visit_start = jnp.searchsorted(
        sort_key, jnp.arange(num_tiles + 1, dtype=jnp.int32), side="left"
    ).astype(jnp.int32)
    return GroupMetadata(
        group_start=start,
        group_end=end,
        visit_group=visit_group,
        visit_tile=visit_tile,
        num_visits=num_visits.astype(jnp.int32),
        tile_visit_start=tile_visit_start,
    )
