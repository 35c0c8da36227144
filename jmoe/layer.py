"""The MoE layer's core on one set of tokens: route -> permute -> experts ->
un-permute -> combine, with its parameters and statistics.

Nothing here knows about meshes: the expert step is a function the caller
plugs in (`moe_core`), so the single-device layer (`local_moe`) and the
expert-parallel one (`jmoe.sharding.expert_parallel`) share every line of the
maths. `jmoe.moe` chooses between them.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from jmoe import dispatch, experts, routing
from jmoe.config import GATED_ACTIVATIONS, MoEConfig
from jmoe.placement import PlacementArrays, replica_slot
from jmoe.stats import MoEAux, finalize, router_sums

Params = Mapping[str, Any]


# ------------------------------------------------------------ parameters ----

def _normal(key, shape, fan_in, dtype):
    return (jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)
            / math.sqrt(fan_in)).astype(dtype)


def init_params(key: jax.Array, cfg: MoEConfig) -> dict:
    """Parameters of one layer as a nested dict of arrays (see module docstring)."""
    d, f, e = cfg.d_model, cfg.d_ff, cfg.num_experts
    dt = jnp.dtype(cfg.param_dtype)
    keys = iter(jax.random.split(key, 8))
    expert_w = {"w_up_EDF": _normal(next(keys), (e, d, f), d, dt),
                "w_down_EFD": _normal(next(keys), (e, f, d), f, dt)}
    if cfg.activation in GATED_ACTIVATIONS:
        expert_w["w_gate_EDF"] = _normal(next(keys), (e, d, f), d, dt)
    if cfg.expert_bias:
        expert_w.update(b_gate_EF=jnp.zeros((e, f), dt), b_up_EF=jnp.zeros((e, f), dt),
                        b_down_ED=jnp.zeros((e, d), dt))
    params = {"router": {"w_DE": _normal(next(keys), (d, e), d, dt)}, "experts": expert_w}
    if cfg.router_bias:
        params["router"]["b_E"] = jnp.zeros((e,), dt)
    if cfg.num_shared_experts:
        fs = cfg.shared_hidden
        shared = {"w_up_DF": _normal(next(keys), (d, fs), d, dt),
                  "w_down_FD": _normal(next(keys), (fs, d), fs, dt)}
        if cfg.activation in GATED_ACTIVATIONS:
            shared["w_gate_DF"] = _normal(next(keys), (d, fs), d, dt)
        if cfg.shared_gate:
            shared["w_gate_D1"] = _normal(next(keys), (d, 1), d, dt)
        params["shared"] = shared
    return params


def init_bias(cfg: MoEConfig) -> jax.Array:
    """The aux-loss-free selection bias, float32 [E] of zeros."""
    return jnp.zeros((cfg.num_experts,), jnp.float32)


# ------------------------------------------------------ functional core ----

def check_call(x: jax.Array, cfg: MoEConfig, bias: Optional[jax.Array]) -> None:
    """Raises ValueError for an input or a selection bias the layer cannot use."""
    if x.ndim < 1 or x.shape[-1] != cfg.d_model:
        raise ValueError(
            f"MoE input has shape {x.shape} but MoEConfig.d_model={cfg.d_model}: the last "
            "dimension of x must equal d_model.")
    if bias is None:
        return
    if cfg.router != "sigmoid_topk":
        raise ValueError(
            f"bias= was passed but MoEConfig.router={cfg.router!r} has no selection bias "
            "(only 'sigmoid_topk' uses one): drop bias=, or set router='sigmoid_topk'.")
    if tuple(bias.shape) != (cfg.num_experts,):
        raise ValueError(
            f"bias has shape {tuple(bias.shape)} but MoEConfig.num_experts="
            f"{cfg.num_experts}: pass a float32 [{cfg.num_experts}] array "
            "(jmoe.init_bias(cfg) makes one).")


def router_input(x_TD: jax.Array, cfg: MoEConfig, train: bool,
                 rng: Optional[jax.Array]) -> jax.Array:
    """The router's view of the tokens: jittered when training with `jitter_eps`."""
    if train and cfg.jitter_eps > 0:
        if rng is None:
            raise ValueError("MoEConfig.jitter_eps > 0 needs an `rng` key when train=True: "
                             "pass rng=... or set jitter_eps=0.")
        return routing.jitter(x_TD, cfg.jitter_eps, rng)
    return x_TD


def shared_experts(params: Params, x_TD: jax.Array, cfg: MoEConfig) -> jax.Array:
    """Always-on shared experts (Qwen-MoE / DeepSeek), optionally sigmoid-gated."""
    with jax.named_scope("shared_experts"):
        w = params["shared"]
        y_TD = experts.dense_mlp(x_TD, w, cfg.activation, alpha=cfg.swiglu_alpha,
                                 limit=cfg.swiglu_limit)
        if cfg.shared_gate:
            y_TD = y_TD * jax.nn.sigmoid(jnp.dot(x_TD, w["w_gate_D1"].astype(x_TD.dtype)))
        return y_TD


def local_experts_capacity(w: Params, cfg: MoEConfig):
    """Experts on `[E, C, D]` buffers held by this device."""
    return lambda buf_ECD: experts.batched_mlp(buf_ECD, w, cfg.activation, cfg.swiglu_alpha,
                                               cfg.swiglu_limit)


def local_experts_dropless(w: Params, cfg: MoEConfig):
    """Experts on rows grouped by expert; drops nothing."""
    def run(buf_RD, group_sizes_E):
        y_RD = experts.grouped_mlp(buf_RD, w, group_sizes_E, cfg.activation,
                                   cfg.execution.gmm_backend, cfg.swiglu_alpha, cfg.swiglu_limit,
                                   tiling=cfg.execution.gmm_tiling)
        return y_RD, jnp.zeros((), jnp.int32)
    return run


def moe_core(x_TD: jax.Array, xr_TD: jax.Array, w_DE: jax.Array, cfg: MoEConfig,
             bias_E: Optional[jax.Array], capacity_experts, dropless_experts,
             dropless_align: int, placement: Optional[PlacementArrays] = None,
             regroup=None, reduce_need=None, token_shards: int = 1, rank_offsets=None):
    """Route -> plan -> permute -> experts -> un-permute -> combine, on flat tokens.

    The expert step is pluggable so the same code runs on one device and
    inside the expert-parallel `shard_map` (where it includes the all-to-alls):
      capacity_experts(buf_ECD) -> y_ECD, or None to run capacity routing on
        packed rows through `dropless_experts` (one device: no empty slots);
      dropless_experts(buf_RD, group_sizes_E) -> (y_RD, extra_dropped).
    With a `placement`, the groups are its P*S physical slots instead of the E
    experts: each assignment goes to one replica of its expert (the split of
    `jmoe.placement`), and the expert step runs the slots' weights.
    `regroup(experts_TK) -> (groups_TK, num_groups, dropless_experts)`, when
    given, decides the groups from the routing instead (shadow experts,
    `jmoe.sharding.shadow`), with the expert step that runs them.
    A dynamic capacity (`MoEConfig.capacity_factor <= 0`) picks its buffer
    size per call among `cfg.capacity_choices` (dense [E, C] buffers;
    `reduce_need`, a max over the mesh, makes every shard pick the same one)
    or runs packed rows at the largest choice.
    A batch-wide capacity (`MoEConfig.capacity_scope='batch'`) counts over
    the `token_shards` shards of the call: `rank_offsets(count_KG) ->
    offset_KG` (int32 [K, G] each) gives, per top-k position and group, the
    rows of the other shards that rank before this shard's.
    Returns (out_TD, `RouterSums` of these tokens, dropped count included).
    """
    t = x_TD.shape[0]
    with jax.named_scope("route"):
        r = routing.route(routing.router_logits(xr_TD, w_DE), cfg, bias_E)
    if isinstance(r, routing.ExpertChoice):
        with jax.named_scope("permute"):
            buf_ECD = dispatch.expert_choice_gather(x_TD, r.tokens_EC)
        with jax.named_scope("experts"):
            y_ECD = capacity_experts(buf_ECD)
        with jax.named_scope("unpermute"):
            out_TD = dispatch.expert_choice_combine(y_ECD, r.weights_EC.astype(jnp.float32),
                                                    r.tokens_EC, t)
        return out_TD, router_sums(r, cfg.num_experts, untouched_tokens(r.tokens_EC, t))
    e = cfg.num_experts
    groups_TK = r.experts_TK
    if regroup is not None:
        with jax.named_scope("regroup"):
            groups_TK, e, dropless_experts = regroup(r.experts_TK)
    elif placement is not None:
        with jax.named_scope("place"):
            groups_TK = place_assignments(r.experts_TK, placement)
            e = placement.slot_expert_PS.size
    # Capacity without an all-to-all (capacity_experts=None) packs the kept
    # rows like dropless, so no expert computes empty slots.
    packed = cfg.dispatch == "dropless" or capacity_experts is None
    d = x_TD.shape[1]
    offset_KG = None
    if cfg.batch_capacity and rank_offsets is not None:
        with jax.named_scope("batch_rank"):
            k = groups_TK.shape[1]
            k_TK = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), groups_TK.shape)
            count_KG = jnp.zeros((k, e), jnp.int32).at[k_TK, groups_TK].add(1)
            offset_KG = rank_offsets(count_KG)

    def run(capacity, x_TD, groups_TK, weights_TK):
        """plan -> permute -> experts -> un-permute for one (static) capacity
        (None: every row, the dropless plan)."""
        with jax.named_scope("plan"):
            if capacity is not None:
                perm = dispatch.capacity_permutation(
                    groups_TK, weights_TK, e, capacity, cfg.drop_policy,
                    packed_align=dropless_align if packed else 0, rank_offset_KE=offset_KG)
            else:
                perm = dispatch.dropless_permutation(groups_TK, e, dropless_align)
        with jax.named_scope("permute"):
            buf_RD = dispatch.permute(x_TD, perm.slot_TK, perm.src_R)
        with jax.named_scope("experts"):
            if not packed:
                y_RD = capacity_experts(buf_RD.reshape(e, -1, d)).reshape(buf_RD.shape)
                dropped = perm.dropped
            else:
                y_RD, extra = dropless_experts(buf_RD, perm.group_sizes_E)
                dropped = perm.dropped + extra
        with jax.named_scope("unpermute"):
            out_TD = dispatch.unpermute(y_RD, weights_TK, perm.slot_TK, perm.src_R)
        return out_TD, dropped

    if cfg.dispatch == "dropless":
        out_TD, dropped = run(None, x_TD, groups_TK, r.weights_TK)
        return out_TD, router_sums(r, cfg.num_experts, dropped)
    # Capacity is per expert, as without a placement: every slot gets the
    # buffer one expert gets in the static layer, so an expert with r
    # replicas holds r of them (the balancer spreads its rows over them).
    t_cap = t * token_shards if cfg.batch_capacity else t
    choices = cfg.capacity_choices(t_cap)
    need = 0
    if packed and cfg.capacity_factor <= 0:
        # Packed rows cost what is kept, whatever C: one run at the bound.
        # At capacity 0 the bound holds every row (a group gets at most one
        # per token), so the dropless plan keeps the same rows, sorted more
        # cheaply. The capacity reported is the smallest choice that held
        # the busiest shard's need: `RouterSums` finds it in its all-reduce,
        # so this path needs no collective of its own.
        bound = None if cfg.capacity_factor == 0 else choices[-1]
        out_TD, dropped = run(bound, x_TD, groups_TK, r.weights_TK)
        need = _busiest_group(groups_TK, e)
    elif len(choices) == 1:
        out_TD, dropped = run(choices[0], x_TD, groups_TK, r.weights_TK)
    else:
        need = _busiest_group(groups_TK, e)
        if reduce_need is not None:
            need = reduce_need(need)  # every shard must take the same branch
        out_TD, dropped = _dynamic_capacity(run, choices, need, x_TD, groups_TK, r.weights_TK)
    levels = tuple((c, c * cfg.num_experts / (t_cap * cfg.top_k)) for c in choices)
    return out_TD, router_sums(r, cfg.num_experts, dropped, capacity_levels=levels, need=need)


def _dynamic_capacity(run, choices: list, need, x_TD, groups_TK, weights_TK):
    """Runs the smallest of the static `choices` that holds `need` rows
    (`jax.lax.switch`; on a mesh `need` must be the same on every shard).
    Each branch is rematerialised in the backward pass: a switch otherwise
    keeps every branch's residuals. Returns (out_TD, dropped)."""
    branch = jnp.sum(need > jnp.asarray(choices[:-1], jnp.int32)).astype(jnp.int32)
    branches = [jax.checkpoint(functools.partial(run, c)) for c in choices]
    with jax.named_scope("dynamic_capacity"):
        return jax.lax.switch(branch, branches, x_TD, groups_TK, weights_TK)


def _busiest_group(groups_TK, num_groups: int) -> jax.Array:
    """int32 []: the rows the busiest of `num_groups` groups gets here."""
    return jax.lax.stop_gradient(jnp.max(routing.expert_counts(groups_TK, num_groups)))


def place_assignments(experts_TK: jax.Array, placement: PlacementArrays) -> jax.Array:
    """int32 [T, K] physical slot of each assignment: the r-th assignment (in
    token-major order) of expert e, of the n it has here, goes to the replica
    whose share of ranks holds r (`jmoe.placement.replica_slot`)."""
    e = placement.replica_slot_EY.shape[0]
    expert_A = experts_TK.reshape(-1)
    order_A = jnp.argsort(expert_A, stable=True)
    sorted_A = expert_A[order_A]
    a = jnp.arange(expert_A.shape[0], dtype=jnp.int32)
    start_A = jnp.searchsorted(sorted_A, sorted_A, side="left").astype(jnp.int32)
    rank_A = jnp.zeros_like(a).at[order_A].set(a - start_A)
    count_E = jnp.zeros((e,), jnp.int32).at[expert_A].add(1)
    return replica_slot(placement, expert_A, rank_A, count_E).reshape(experts_TK.shape)


def slot_weights(w: Params, placement: PlacementArrays) -> dict:
    """Expert weights [E, ...] -> the placement's slots [P*S, ...]. A gather:
    its transpose sums a replicated expert's slot gradients into one."""
    idx_S = placement.slot_expert_PS.reshape(-1)
    return {k: jnp.take(v, idx_S, axis=0) for k, v in w.items()}


def expert_weights(params: Params, placement: Optional[PlacementArrays]) -> dict:
    """The expert weights the expert step runs, one entry per group it computes.

      params["experts"], no placement: [E, ...], expert e is group e.
      params["experts"] with a placement: gathered into slot order [P*S, ...]
        on every call (weights stay in logical order; on a mesh the gather
        all-gathers every expert and the backward all-reduces all of them).
      params["slots"] (stored in the placement's slot order, [P*S, ...], e.g.
        by `jmoe.placement.to_slots`): used as they are; the replicas of an
        expert are tied (`tie_replicas`), so each gets the sum of their
        gradients and an optimizer keeps them equal.
    """
    if "slots" in params:
        if placement is None:
            raise ValueError("params hold expert weights in slot order ('slots') but no "
                             "placement= was passed: pass the placement they are stored for.")
        w = params["slots"]
        num_slots = placement.slot_expert_PS.size
        for k, v in w.items():
            if v.shape[0] != num_slots:
                raise ValueError(
                    f"params['slots'][{k!r}] has {v.shape[0]} slots but the placement has "
                    f"{num_slots}: store the weights with jmoe.placement.to_slots for this "
                    "placement (or pass the one they were stored for).")
        return tie_replicas(w, placement)
    w = params["experts"]
    return w if placement is None else slot_weights(w, placement)


def replica_groups(placement: PlacementArrays) -> tuple[jax.Array, int]:
    """(int32 [P*S] group of each slot, G): the replicated experts numbered
    0..G-1 in expert order, G = P*S - E (at most that many experts can have
    a second slot); slots of an expert with one replica get group G."""
    e = placement.replica_slot_EY.shape[0]
    g = placement.slot_expert_PS.size - e
    replicated_E = placement.num_replicas_E > 1
    group_E = jnp.where(replicated_E, jnp.cumsum(replicated_E) - 1, g).astype(jnp.int32)
    return group_E[placement.slot_expert_PS.reshape(-1)], g


def tie_replicas(w: Params, placement: PlacementArrays) -> dict:
    """Identity on slot-ordered weights `w` ([P*S, ...] each); in the
    backward each slot gets the sum of the gradients of its expert's slots.

    That is the gradient of one logical expert used in several places, so
    replicas that start equal stay equal under any elementwise optimizer.
    The sum runs over a [G+1, ...] buffer (G = P*S - E replicated experts at
    most), so on a mesh it all-reduces G+1 expert matrices, not E.
    """
    group_S, g = replica_groups(placement)
    return w if g == 0 else _tie(w, group_S, g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _tie(w, group_S, g):
    return w


def _tie_fwd(w, group_S, g):
    return w, group_S


def _tie_bwd(g, group_S, ct):
    def tied(ct_S):
        sums = jnp.zeros((g + 1,) + ct_S.shape[1:], ct_S.dtype).at[group_S].add(ct_S)
        mask = (group_S < g).reshape((-1,) + (1,) * (ct_S.ndim - 1))
        return jnp.where(mask, sums[group_S], ct_S)
    return jax.tree.map(tied, ct), None


_tie.defvjp(_tie_fwd, _tie_bwd)


def check_placement(cfg: MoEConfig, placement: Optional[PlacementArrays]) -> None:
    if placement is None:
        return
    if cfg.router == "expert_choice":
        raise ValueError("placement= needs token-choice routing: expert_choice fills a fixed "
                         "capacity per expert; drop placement= or change MoEConfig.router.")
    if placement.replica_slot_EY.shape[0] != cfg.num_experts:
        raise ValueError(
            f"placement is for {placement.replica_slot_EY.shape[0]} experts but "
            f"MoEConfig.num_experts={cfg.num_experts}: build it with "
            f"jmoe.balance.balance(load_E, ...) for this layer.")


def local_moe(params: Params, x_TD: jax.Array, xr_TD: jax.Array, cfg: MoEConfig,
              bias_E: Optional[jax.Array],
              placement: Optional[PlacementArrays] = None) -> tuple[jax.Array, MoEAux]:
    """Single-device layer on flat tokens: [T, D] -> ([T, D], MoEAux)."""
    w = expert_weights(params, placement)
    # Expert choice fills exactly C slots per expert: the dense [E, C] layout.
    cap = local_experts_capacity(w, cfg) if cfg.router == "expert_choice" else None
    if cfg.router_bias:
        bias_E = params["router"]["b_E"]  # topk_softmax's learned logit bias (routing.route)
    out_TD, sums = moe_core(x_TD, xr_TD, params["router"]["w_DE"], cfg, bias_E, cap,
                            local_experts_dropless(w, cfg), cfg.group_align, placement)
    return out_TD, finalize(sums, cfg.router == "expert_choice")


def untouched_tokens(tokens_EC: jax.Array, num_tokens: int) -> jax.Array:
    """Expert choice: how many of the tokens no expert took (int32 [])."""
    taken_T = jnp.zeros((num_tokens,), jnp.int32).at[tokens_EC.reshape(-1)].max(1)
    return num_tokens - jnp.sum(taken_T)


