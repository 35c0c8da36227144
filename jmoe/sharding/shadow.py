"""Shadow experts (FasterMoE, PPoPP'22) on the expert-parallel dropless path.

Inside the layer's `shard_map`, after routing: the `s` experts with the most
assignments on the whole mesh this step (one [E] all-reduce of the counts,
so every device picks the same ones) are *shadowed*: every device computes
them for its own tokens. Each device gets `s` extra expert groups after its
own S (slots of a placement, or its E/P experts), holding the shadowed
experts' weights, gathered from their owners by one all-reduce of `s`
expert matrices; an assignment to a shadowed expert goes to that group *on
its own device* (a self-send that never leaves the device), every other
assignment to its usual owner. Autodiff transposes the gather into an
all-reduce of the shadows' gradients, which the owner adds to its expert's
gradient: the layer computes the same function and the same gradients.

What it trades: the busiest device no longer computes the hot experts' rows
of every device (each device computes its own), for two all-reduces of `s`
expert matrices per step (forward weights, backward gradients).
`jmoe.planner.layer_cost.shadow_price` prices it.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from jmoe.config import MoEConfig
from jmoe.layer import place_assignments
from jmoe.placement import PlacementArrays
from jmoe.sharding.exchange import dropless_exchange


def hottest_experts(experts_TK: jax.Array, num_experts: int, s: int, token_axes) -> jax.Array:
    """int32 [s]: the experts with the most assignments over the whole mesh
    (ties to the lower id), the same on every device."""
    counts_E = jnp.zeros((num_experts,), jnp.int32).at[experts_TK.reshape(-1)].add(1)
    if token_axes:
        counts_E = lax.psum(counts_E, token_axes)
    # Lower ids win ties: the key is count * E + (E - 1 - id), exact in int32
    # for any count that fits one step's assignments.
    key_E = counts_E * num_experts + (num_experts - 1 - jnp.arange(num_experts, dtype=jnp.int32))
    return lax.top_k(key_E, s)[1].astype(jnp.int32)


def shadow_regroup(cfg: MoEConfig, w: dict, ep: int, tp: bool, mesh_axes: tuple,
                   token_axes: tuple, placement: Optional[PlacementArrays]):
    """`moe_core`'s `regroup` for shadow experts (module docstring).

    `w`: this device's expert weights, [S, ...] each (its slots under
    `placement`, else its E/P experts). Returns a function of the routed
    experts_TK -> (groups_TK, ep*(S+s), the dropless expert step).
    """
    s = cfg.execution.shadow_experts
    e = cfg.num_experts
    local = next(iter(w.values())).shape[0]  # S

    def regroup(experts_TK):
        hot_s = hottest_experts(experts_TK, e, s, token_axes)
        me = lax.axis_index("expert")
        # Where each expert's owner copy lives: its first slot (placement) or e.
        first = placement.replica_slot_EY[:, 0] if placement is not None else jnp.arange(e)
        owner_s, index_s = first[hot_s] // local, first[hot_s] % local
        mine_s = owner_s == me
        # Gather: each owner contributes its copy, the others zeros.
        shadow = {k: lax.psum(jnp.where(mine_s.reshape((-1,) + (1,) * (v.ndim - 1)),
                                        v[index_s], jnp.zeros((), v.dtype)), "expert")
                  for k, v in w.items()}
        w_ext = {k: jnp.concatenate([v, shadow[k].astype(v.dtype)]) for k, v in w.items()}
        base_TK = (place_assignments(experts_TK, placement) if placement is not None
                   else experts_TK)
        match_TKs = experts_TK[..., None] == hot_s
        is_hot_TK = jnp.any(match_TKs, axis=-1)
        j_TK = jnp.argmax(match_TKs, axis=-1).astype(jnp.int32)
        width = local + s
        groups_TK = jnp.where(is_hot_TK, me * width + local + j_TK,
                              (base_TK // local) * width + base_TK % local)

        def run(buf, counts):
            return dropless_exchange(buf, counts, w_ext, cfg, ep, tp, mesh_axes)

        return groups_TK.astype(jnp.int32), ep * width, run

    return regroup
