"""Router statistics and losses, computed one way.

Every statistic of a layer is first an additive sum over tokens
(`RouterSums`): shards of an expert-parallel layer and token chunks of a
Lancet block add theirs, and `finalize` turns the total into the `MoEAux`
the caller sees. The single-device layer, the expert-parallel layer and chunk
merging all go through `finalize`, so they cannot disagree.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import struct

from jmoe import routing


@struct.dataclass
class MoEAux:
    """Per-call statistics and losses of one MoE layer (all float32).

    load_balance_loss: GShard/Switch loss, 1.0 when balanced (0 for expert choice,
      which is balanced by construction).
    z_loss: router z-loss.
    dropped_fraction: capacity path: fraction of the T*K assignments that found
      no slot; expert choice: fraction of tokens no expert took; dropless: 0.
    router_entropy: mean per-token entropy of the router distribution (nats).
    expert_load: [E] fraction of assignments routed to each expert (before drops).
    expert_prob: [E] mean router probability of each expert over the tokens.
    capacity_factor: capacity path: the capacity the buffers had, as a
      multiple of the balanced load T*K/E (per token shard; with a dynamic
      capacity, the smallest choice that held the busiest shard's need); 0
      for dropless and expert choice.
    """

    load_balance_loss: jax.Array
    z_loss: jax.Array
    dropped_fraction: jax.Array
    router_entropy: jax.Array
    expert_load: jax.Array
    expert_prob: jax.Array
    capacity_factor: jax.Array = 0.0


@struct.dataclass
class RouterSums:
    """Additive statistics of some tokens (sum them over shards or chunks).

    counts_E: int32 [E] assignments per expert; probs_sum_E: float32 [E] sum of
    router probabilities; z_sum / ent_sum: sums over tokens of logsumexp^2 and
    entropy; num_tokens, num_assignments: float32 counts; dropped: int32
    assignments (tokens, for expert choice) that were not computed;
    capacity_tokens: float32 capacity factor x num_tokens of parts already
      finalized (`sums_of`: its token-weighted sum, so that merged chunks
      average it).
    capacity_over: float32 [L-1], with `capacity_levels` (static, the L
      capacity factors a capacity layer may use, smallest first): for each
      of the L-1 smaller levels, how many of the summed parts needed more.
      After the sum (an all-reduce over shards), the level used is the first
      that no part needed more than: the busiest part's, with no collective
      of its own.
    """

    counts_E: jax.Array
    probs_sum_E: jax.Array
    z_sum: jax.Array
    ent_sum: jax.Array
    num_tokens: jax.Array
    num_assignments: jax.Array
    dropped: jax.Array
    capacity_tokens: jax.Array = 0.0
    capacity_over: jax.Array = ()
    capacity_levels: tuple = struct.field(pytree_node=False, default=())

    def __add__(self, other: "RouterSums") -> "RouterSums":
        return jax.tree.map(jnp.add, self, other)


def router_sums(r, num_experts: int, dropped: jax.Array | int = 0,
                capacity_levels: tuple = (), need: jax.Array | int = 0) -> RouterSums:
    """`RouterSums` of one routing decision (`routing.Routing` or `ExpertChoice`).

    A capacity layer passes `capacity_levels` (its capacities as static
    `(rows, factor)` pairs, smallest first) and `need`, the rows its busiest
    group needed here: the factor reported is that of the smallest level
    holding the busiest need of all parts summed."""
    if isinstance(r, routing.ExpertChoice):
        counts_E = jnp.full((num_experts,), r.tokens_EC.shape[1], jnp.int32)
        num_a = r.tokens_EC.size
    else:
        counts_E = routing.expert_counts(r.experts_TK, num_experts)
        num_a = r.experts_TK.size
    p_TE = r.probs_TE
    lse_T = jax.nn.logsumexp(r.logits_TE, axis=-1)
    return RouterSums(counts_E=counts_E, probs_sum_E=jnp.sum(p_TE, axis=0),
                      z_sum=jnp.sum(jnp.square(lse_T)),
                      ent_sum=-jnp.sum(p_TE * jnp.log(jnp.maximum(p_TE, 1e-20))),
                      num_tokens=jnp.asarray(p_TE.shape[0], jnp.float32),
                      num_assignments=jnp.asarray(num_a, jnp.float32),
                      dropped=jnp.asarray(dropped, jnp.int32),
                      capacity_over=_over(need, capacity_levels),
                      capacity_levels=tuple(f for _, f in capacity_levels))


def _over(need, capacity_levels: tuple) -> jax.Array:
    """float32 [L-1]: 1 where `need` exceeds each smaller level's rows. Built
    from ops, not a constant (a constant would enter an enclosing
    `shard_map` as an extra input)."""
    over = [jnp.asarray(need > rows, jnp.float32) for rows, _ in capacity_levels[:-1]]
    return jnp.stack(over) if over else jnp.zeros((0,), jnp.float32)


def finalize(s: RouterSums, expert_choice: bool = False) -> MoEAux:
    """Means and losses from (possibly all-reduced or merged) sums."""
    f_E = s.counts_E.astype(jnp.float32) / s.num_assignments
    p_E = s.probs_sum_E / s.num_tokens
    if expert_choice:
        lb = jnp.zeros((), jnp.float32)  # balanced by construction
    else:
        lb = f_E.shape[0] * jnp.sum(jax.lax.stop_gradient(f_E) * p_E)
    # Expert choice drops tokens (none of the experts took them), not assignments.
    dropped_of = s.num_tokens if expert_choice else s.num_assignments
    capacity = jnp.asarray(s.capacity_tokens, jnp.float32) / s.num_tokens
    if s.capacity_levels:
        level = jnp.sum(s.capacity_over > 0)
        capacity = capacity + jnp.asarray(s.capacity_levels, jnp.float32)[level]
    return MoEAux(load_balance_loss=lb, z_loss=s.z_sum / s.num_tokens,
                  dropped_fraction=s.dropped.astype(jnp.float32) / dropped_of,
                  router_entropy=s.ent_sum / s.num_tokens, expert_load=f_E, expert_prob=p_E,
                  capacity_factor=capacity)


def sums_of(aux: MoEAux, num_tokens: int, num_assignments: int,
            expert_choice: bool = False) -> RouterSums:
    """The `RouterSums` an `MoEAux` was finalized from, given its token and
    assignment counts (the inverse of `finalize`)."""
    t, a = float(num_tokens), float(num_assignments)
    return RouterSums(counts_E=aux.expert_load * a, probs_sum_E=aux.expert_prob * t,
                      z_sum=aux.z_loss * t, ent_sum=aux.router_entropy * t,
                      num_tokens=jnp.asarray(t, jnp.float32),
                      num_assignments=jnp.asarray(a, jnp.float32),
                      dropped=aux.dropped_fraction * (t if expert_choice else a),
                      capacity_tokens=jnp.asarray(aux.capacity_factor, jnp.float32) * t)


def combine_aux(auxes: Sequence[MoEAux], num_tokens: Sequence[int], assignments_per_token: float,
                expert_choice: bool = False) -> MoEAux:
    """The `MoEAux` of a layer applied to token chunks, as if applied to all
    tokens at once. `num_tokens`: the chunks' token counts."""
    total = None
    for aux, t in zip(auxes, num_tokens):
        s = sums_of(aux, t, t * assignments_per_token, expert_choice)
        total = s if total is None else jax.tree.map(jnp.add, total, s)
    return finalize(total, expert_choice)
