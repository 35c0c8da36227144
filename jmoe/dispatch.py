"""Token permutation plans (pure): which buffer row each assignment goes to.

Both dispatch modes reduce to one *plan* over the T*K token-expert
assignments `a = t * K + k` and the R rows of an expert buffer:

  slot_TK: int32 [T, K] buffer row of assignment (t, k); R if it was dropped.
  src_R:   int32 [R]    assignment that fills row r; T*K if the row is empty.

`capacity` lays the buffer out as `[E, C]` (R = E*C, static). `dropless`
sorts assignments by expert and pads each expert's rows to a multiple of
`group_align` (R = T*K + E*(group_align-1), rounded up to `group_align`), so
a grouped matmul never has a tile that straddles two experts; nothing drops.

Moving rows is done by gathers only, forward and backward: the two maps are
inverse to each other, so each op's transpose is a gather through the other
map (XLA's default transpose of a gather is a scatter-add, which is slow on
CPU and serialises on GPU).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from jmoe.vma import match_cotangent


@struct.dataclass
class Permutation:
    """A permutation plan; see the module docstring.

    group_sizes_E: int32 [E] rows of each expert in the buffer (padded rows
      included for dropless; at most C for capacity).
    kept_E: int32 [E] assignments each expert actually processes.
    dropped: int32 [] assignments that found no slot (0 for dropless).
    """

    slot_TK: jax.Array
    src_R: jax.Array
    group_sizes_E: jax.Array
    kept_E: jax.Array
    dropped: jax.Array

    @property
    def num_rows(self) -> int:
        return self.src_R.shape[0]


def _rank_within_expert(expert_A: jax.Array, order_A: jax.Array, num_experts: int):
    """Rank of each assignment among those of its expert, in priority `order_A`.

    Returns (rank_A, perm_A, counts_E, starts_E): `perm_A` lists assignments
    sorted by (expert, priority); `starts_E` is each expert's first index in it.
    """
    perm_A = order_A[jnp.argsort(expert_A[order_A], stable=True)]
    counts_E = jnp.zeros((num_experts,), jnp.int32).at[expert_A].add(1)
    starts_E = jnp.cumsum(counts_E) - counts_E
    sorted_rank = jnp.arange(expert_A.shape[0], dtype=jnp.int32) - starts_E[expert_A[perm_A]]
    rank_A = jnp.zeros_like(sorted_rank).at[perm_A].set(sorted_rank, unique_indices=True)
    return rank_A, perm_A, counts_E, starts_E


def _packed(expert_A, rank_A, perm_A, starts_E, kept_E, keep_A, group_align, num_rows):
    """Kept assignments sorted by expert, each expert's rows padded to
    `group_align`; returns (slot_A, src_R, padded_E)."""
    num_a = expert_A.shape[0]
    num_experts = kept_E.shape[0]
    padded_E = -(-kept_E // group_align) * group_align
    pstart_E = jnp.cumsum(padded_E) - padded_E
    slot_A = jnp.where(keep_A, pstart_E[expert_A] + rank_A, num_rows)
    r = jnp.arange(num_rows, dtype=jnp.int32)
    # Expert owning row r: the first expert whose padded block ends after r.
    e_R = jnp.clip(jnp.searchsorted(pstart_E + padded_E, r, side="right"), 0, num_experts - 1)
    c_R = r - pstart_E[e_R]
    # The kept assignments of an expert are the first ones in its priority order.
    filled_R = (c_R < kept_E[e_R]) & (r < jnp.sum(padded_E))
    src_R = jnp.where(filled_R, perm_A[jnp.clip(starts_E[e_R] + c_R, 0, num_a - 1)], num_a)
    return slot_A, src_R, padded_E


def capacity_permutation(experts_TK: jax.Array, weights_TK: jax.Array, num_experts: int,
                  capacity: int, drop_policy: str = "position",
                  packed_align: int = 0,
                  rank_offset_KE: Optional[jax.Array] = None) -> Permutation:
    """At most `capacity` assignments per expert; the rest are dropped by `drop_policy`.

    `position`: all top-1 choices beat all top-2 choices, then earlier tokens
    win (GShard). `probability`: higher combine weight wins, ties by position
    (batch-prioritised routing, V-MoE).

    `rank_offset_KE` (int32 [K, E], position policy): rows of expert e that
    rank before this call's top-(k+1) choices of e but are not in this call
    (other token shards, `MoEConfig.capacity_scope='batch'`); an assignment
    is kept when its rank here plus that offset is below `capacity`. The
    offsets must grow with k, so the kept rows stay a prefix of each
    expert's priority order.

    Layout: `packed_align = 0` gives fixed `[E, C]` slots (R = E*C, what the
    expert-parallel all-to-all exchanges). `packed_align = a > 0` packs the
    kept rows by expert, each expert padded to a multiple of `a`, for a
    grouped matmul that never computes empty slots; the same assignments are
    kept and dropped either way.
    """
    t, k = experts_TK.shape
    num_a = t * k
    expert_A = experts_TK.reshape(-1)
    # Priority order as a permutation of assignments: position policy is k-major.
    position_order = jnp.arange(num_a, dtype=jnp.int32).reshape(t, k).T.reshape(-1)
    if drop_policy == "position":
        order_A = position_order
    elif drop_policy == "probability":
        w = weights_TK.reshape(-1)[position_order]
        order_A = position_order[jnp.argsort(-jax.lax.stop_gradient(w), stable=True)]
    else:
        raise ValueError(f"drop_policy={drop_policy!r} is unknown; use 'position' or 'probability'.")
    rank_A, perm_A, counts_E, starts_E = _rank_within_expert(expert_A, order_A, num_experts)
    if rank_offset_KE is None:
        keep_A = rank_A < capacity
        kept_E = jnp.minimum(counts_E, capacity)
    else:
        if drop_policy != "position":
            raise ValueError("rank offsets order rows by position: use drop_policy='position'.")
        k_A = jnp.tile(jnp.arange(k, dtype=jnp.int32), t)
        keep_A = rank_A + rank_offset_KE[k_A, expert_A] < capacity
        kept_E = jnp.zeros((num_experts,), jnp.int32).at[expert_A].add(keep_A.astype(jnp.int32))
    dropped = (num_a - jnp.sum(kept_E)).astype(jnp.int32)
    if packed_align:
        num_rows = dropless_rows(min(num_a, num_experts * capacity), num_experts, packed_align)
        slot_A, src_R, padded_E = _packed(expert_A, rank_A, perm_A, starts_E, kept_E, keep_A,
                                          packed_align, num_rows)
        return Permutation(slot_A.reshape(t, k).astype(jnp.int32), src_R.astype(jnp.int32),
                    padded_E.astype(jnp.int32), kept_E, dropped)
    num_rows = num_experts * capacity
    slot_A = jnp.where(keep_A, expert_A * capacity + rank_A, num_rows)
    # Row r = e*C + c holds the c-th assignment of expert e, if it has one.
    e_R = jnp.arange(num_rows, dtype=jnp.int32) // capacity
    c_R = jnp.arange(num_rows, dtype=jnp.int32) % capacity
    # Kept rows are a prefix of each expert's priority order (a keep implies
    # rank < C, so they fit its C slots).
    filled_R = c_R < kept_E[e_R]
    src_R = jnp.where(filled_R, perm_A[jnp.minimum(starts_E[e_R] + c_R, num_a - 1)], num_a)
    return Permutation(slot_A.reshape(t, k).astype(jnp.int32), src_R.astype(jnp.int32), kept_E,
                kept_E, dropped)


def dropless_rows(num_assignments: int, num_experts: int, group_align: int) -> int:
    """Static buffer rows that fit any routing when groups are padded to `group_align`."""
    if group_align == 1:
        return num_assignments
    rows = num_assignments + num_experts * (group_align - 1)
    return -(-rows // group_align) * group_align


def dropless_permutation(experts_TK: jax.Array, num_experts: int, group_align: int = 1) -> Permutation:
    """Sort assignments by expert (stable in token order); pad groups to `group_align`."""
    t, k = experts_TK.shape
    num_a = t * k
    expert_A = experts_TK.reshape(-1)
    rank_A, perm_A, counts_E, starts_E = _rank_within_expert(
        expert_A, jnp.arange(num_a, dtype=jnp.int32), num_experts)
    num_rows = dropless_rows(num_a, num_experts, group_align)
    slot_A, src_R, padded_E = _packed(expert_A, rank_A, perm_A, starts_E, counts_E,
                                      jnp.ones((num_a,), bool), group_align, num_rows)
    return Permutation(slot_A.reshape(t, k).astype(jnp.int32), src_R.astype(jnp.int32),
                padded_E.astype(jnp.int32), counts_E, jnp.zeros((), jnp.int32))


# ------------------------------------------------------ row permutations ----

def _pad_row(x_RD: jax.Array) -> jax.Array:
    """Appends one zero row: index N is the 'nothing here' sentinel."""
    return jnp.concatenate([x_RD, jnp.zeros((1,) + x_RD.shape[1:], x_RD.dtype)], axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=())
def permute(x_TD: jax.Array, slot_TK: jax.Array, src_R: jax.Array) -> jax.Array:
    """buf[r] = x[src_R[r] // K] (zeros for empty rows): [T, D] -> [R, D]."""
    k = slot_TK.shape[1]
    return _pad_row(x_TD)[src_R // k]


def _permute_fwd(x_TD, slot_TK, src_R):
    # x_TD[:0] is empty: it only carries x's replication type to the backward.
    return permute(x_TD, slot_TK, src_R), (slot_TK, src_R, x_TD[:0])


def _permute_bwd(res, dbuf_RD):
    slot_TK, src_R, x_type = res
    # Each token's K copies went to rows slot_TK[t]; dropped ones to the zero row.
    dx_TD = jnp.sum(_pad_row(dbuf_RD)[slot_TK], axis=1)
    return match_cotangent(dx_TD, x_type), None, None


permute.defvjp(_permute_fwd, _permute_bwd)


@jax.custom_vjp
def unpermute(y_RD: jax.Array, weights_TK: jax.Array, slot_TK: jax.Array,
              src_R: jax.Array) -> jax.Array:
    """out[t] = sum_k weights[t, k] * y[slot[t, k]] (dropped: 0): [R, D] -> [T, D]."""
    y_TKD = _pad_row(y_RD)[slot_TK]
    w = weights_TK.astype(jnp.float32)[..., None]
    return jnp.sum(y_TKD.astype(jnp.float32) * w, axis=1).astype(y_RD.dtype)


def _unpermute_fwd(y_RD, weights_TK, slot_TK, src_R):
    return unpermute(y_RD, weights_TK, slot_TK, src_R), (y_RD, weights_TK, slot_TK, src_R)


def _unpermute_bwd(res, dout_TD):
    y_RD, weights_TK, slot_TK, src_R = res
    t, k = slot_TK.shape
    dout32 = dout_TD.astype(jnp.float32)
    # dy[r] = w[a] * dout[token(a)] for the assignment a that filled row r.
    w_A = _pad_row(weights_TK.reshape(-1, 1).astype(jnp.float32))[src_R]
    dy_RD = (w_A * _pad_row(dout32)[src_R // k]).astype(y_RD.dtype)
    y_TKD = _pad_row(y_RD)[slot_TK].astype(jnp.float32)
    dw_TK = jnp.einsum("tkd,td->tk", y_TKD, dout32).astype(weights_TK.dtype)
    return match_cotangent(dy_RD, y_RD), match_cotangent(dw_TK, weights_TK), None, None


unpermute.defvjp(_unpermute_fwd, _unpermute_bwd)


# ---------------------------------------------------- expert-choice path ----

def expert_choice_gather(x_TD: jax.Array, tokens_EC: jax.Array) -> jax.Array:
    """[T, D] -> [E, C, D]: the tokens each expert chose."""
    return x_TD[tokens_EC]


def expert_choice_combine(y_ECD: jax.Array, weights_EC: jax.Array, tokens_EC: jax.Array,
                          num_tokens: int) -> jax.Array:
    """out[t] = sum over (e, c) with tokens[e, c] == t of weights[e, c] * y[e, c]."""
    e, c, d = y_ECD.shape
    contrib = (y_ECD.astype(jnp.float32) * weights_EC[..., None]).reshape(e * c, d)
    out = jax.ops.segment_sum(contrib, tokens_EC.reshape(-1), num_segments=num_tokens)
    return out.astype(y_ECD.dtype)
