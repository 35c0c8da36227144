"""The MoE layer: a functional core (`moe_apply`) and a Flax NNX module (`MoE`).

The module only owns parameters; all the work happens in `moe_apply`, which
plain-JAX users can call directly with the dict from `init_params`:

    params = jmoe.init_params(jax.random.key(0), cfg)
    y_BTD, aux = jmoe.moe_apply(params, x_BTD, cfg)
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jmoe import dispatch, experts, routing
from jmoe.config import MoEConfig

Params = Mapping[str, Any]


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
    """

    load_balance_loss: jax.Array
    z_loss: jax.Array
    dropped_fraction: jax.Array
    router_entropy: jax.Array
    expert_load: jax.Array
    expert_prob: jax.Array


def combine_aux(auxes, cfg: MoEConfig, weights=None) -> MoEAux:
    """The `MoEAux` of a layer applied to token chunks, as if applied to all
    tokens at once. `weights`: the chunks' token counts (default: equal); the
    load-balance loss is rebuilt from the merged means."""
    w = [1.0] * len(auxes) if weights is None else [float(v) for v in weights]
    mean = lambda xs: sum(wi * x for wi, x in zip(w, xs)) / sum(w)
    load = mean([a.expert_load for a in auxes])
    prob = mean([a.expert_prob for a in auxes])
    if cfg.router == "expert_choice":
        lb = jnp.zeros((), jnp.float32)
    else:
        lb = cfg.num_experts * jnp.sum(jax.lax.stop_gradient(load) * prob)
    return MoEAux(load_balance_loss=lb, z_loss=mean([a.z_loss for a in auxes]),
                  dropped_fraction=mean([a.dropped_fraction for a in auxes]),
                  router_entropy=mean([a.router_entropy for a in auxes]),
                  expert_load=load, expert_prob=prob)


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
    if cfg.activation == "swiglu":
        expert_w["w_gate_EDF"] = _normal(next(keys), (e, d, f), d, dt)
    params = {"router": {"w_DE": _normal(next(keys), (d, e), d, dt)}, "experts": expert_w}
    if cfg.num_shared_experts:
        fs = cfg.shared_hidden
        shared = {"w_up_DF": _normal(next(keys), (d, fs), d, dt),
                  "w_down_FD": _normal(next(keys), (fs, d), fs, dt)}
        if cfg.activation == "swiglu":
            shared["w_gate_DF"] = _normal(next(keys), (d, fs), d, dt)
        if cfg.shared_gate:
            shared["w_gate_D1"] = _normal(next(keys), (d, 1), d, dt)
        params["shared"] = shared
    return params


def init_bias(cfg: MoEConfig) -> jax.Array:
    """The aux-loss-free selection bias, float32 [E] of zeros."""
    return jnp.zeros((cfg.num_experts,), jnp.float32)


# ------------------------------------------------------ functional core ----

def _check_input(x: jax.Array, cfg: MoEConfig) -> None:
    if x.ndim < 1 or x.shape[-1] != cfg.d_model:
        raise ValueError(
            f"MoE input has shape {x.shape} but MoEConfig.d_model={cfg.d_model}: the last "
            "dimension of x must equal d_model.")


def router_input(x_TD: jax.Array, cfg: MoEConfig, train: bool,
                 rng: Optional[jax.Array]) -> jax.Array:
    """The router's view of the tokens: jittered when training with `jitter_eps`."""
    if train and cfg.jitter_eps > 0:
        if rng is None:
            raise ValueError("MoEConfig.jitter_eps > 0 needs an `rng` key when train=True: "
                             "pass rng=... or set jitter_eps=0.")
        return routing.jitter(x_TD, cfg.jitter_eps, rng)
    return x_TD


def router_sums(r, cfg: MoEConfig) -> dict:
    """Additive router statistics over the local tokens.

    Sums (not means) so that expert-parallel shards can `psum` them and then
    call `finalize_stats`, giving exactly the single-device values.
    """
    if isinstance(r, routing.ExpertChoice):
        counts_E = jnp.full((cfg.num_experts,), r.tokens_EC.shape[1], jnp.int32)
        num_a = r.tokens_EC.size
    else:
        counts_E = routing.expert_counts(r.experts_TK, cfg.num_experts)
        num_a = r.experts_TK.size
    lse_T = jax.nn.logsumexp(r.logits_TE, axis=-1)
    p = r.probs_TE
    return dict(counts_E=counts_E, probs_sum_E=jnp.sum(p, axis=0),
                z_sum=jnp.sum(jnp.square(lse_T)),
                ent_sum=-jnp.sum(p * jnp.log(jnp.maximum(p, 1e-20))),
                num_tokens=jnp.asarray(p.shape[0], jnp.float32),
                num_assignments=jnp.asarray(num_a, jnp.float32))


def finalize_stats(sums: dict, cfg: MoEConfig, dropped: jax.Array) -> MoEAux:
    """Turns (possibly all-reduced) `router_sums` and a dropped count into `MoEAux`."""
    f_E = sums["counts_E"].astype(jnp.float32) / sums["num_assignments"]
    p_E = sums["probs_sum_E"] / sums["num_tokens"]
    if cfg.router == "expert_choice":
        lb = jnp.zeros((), jnp.float32)  # balanced by construction
    else:
        lb = cfg.num_experts * jnp.sum(jax.lax.stop_gradient(f_E) * p_E)
    return MoEAux(load_balance_loss=lb, z_loss=sums["z_sum"] / sums["num_tokens"],
                  dropped_fraction=dropped.astype(jnp.float32) / (
                      sums["num_tokens"] if cfg.router == "expert_choice"
                      else sums["num_assignments"]),
                  router_entropy=sums["ent_sum"] / sums["num_tokens"], expert_load=f_E,
                  expert_prob=p_E)


def shared_experts(params: Params, x_TD: jax.Array, cfg: MoEConfig) -> jax.Array:
    """Always-on shared experts (Qwen-MoE / DeepSeek), optionally sigmoid-gated."""
    with jax.named_scope("shared_experts"):
        w = params["shared"]
        y_TD = experts.dense_mlp(x_TD, w, cfg.activation)
        if cfg.shared_gate:
            y_TD = y_TD * jax.nn.sigmoid(jnp.dot(x_TD, w["w_gate_D1"].astype(x_TD.dtype)))
        return y_TD


def local_experts_capacity(w: Params, cfg: MoEConfig):
    """Experts on `[E, C, D]` buffers held by this device."""
    return lambda buf_ECD: experts.batched_mlp(buf_ECD, w, cfg.activation)


def local_experts_dropless(w: Params, cfg: MoEConfig):
    """Experts on rows grouped by expert; drops nothing."""
    def run(buf_RD, group_sizes_E):
        y_RD = experts.grouped_mlp(buf_RD, w, group_sizes_E, cfg.activation, cfg.gmm_backend)
        return y_RD, jnp.zeros((), jnp.int32)
    return run


def moe_core(x_TD: jax.Array, xr_TD: jax.Array, w_DE: jax.Array, cfg: MoEConfig,
             bias_E: Optional[jax.Array], capacity_experts, dropless_experts,
             dropless_align: int):
    """Route -> plan -> permute -> experts -> un-permute -> combine, on flat tokens.

    The expert step is pluggable so the same code runs on one device and
    inside the expert-parallel `shard_map` (where it includes the all-to-alls):
      capacity_experts(buf_ECD) -> y_ECD, or None to run capacity routing on
        packed rows through `dropless_experts` (one device: no empty slots);
      dropless_experts(buf_RD, group_sizes_E) -> (y_RD, extra_dropped).
    Returns (out_TD, router_sums, dropped assignment count).
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
        return out_TD, router_sums(r, cfg), untouched_tokens(r.tokens_EC, t)
    e = cfg.num_experts
    # Capacity without an all-to-all (capacity_experts=None) packs the kept
    # rows like dropless, so no expert computes empty slots.
    packed = cfg.dispatch == "dropless" or capacity_experts is None
    with jax.named_scope("plan"):
        if cfg.dispatch == "capacity":
            plan = dispatch.capacity_plan(r.experts_TK, r.weights_TK, e, cfg.capacity(t),
                                          cfg.drop_policy, packed_align=dropless_align if packed else 0)
        else:
            plan = dispatch.dropless_plan(r.experts_TK, e, dropless_align)
    with jax.named_scope("permute"):
        buf_RD = dispatch.permute(x_TD, plan.slot_TK, plan.src_R)
    with jax.named_scope("experts"):
        if not packed:
            y_RD = capacity_experts(buf_RD.reshape(e, -1, x_TD.shape[1])).reshape(buf_RD.shape)
            dropped = plan.dropped
        else:
            y_RD, extra = dropless_experts(buf_RD, plan.group_sizes_E)
            dropped = plan.dropped + extra
    with jax.named_scope("unpermute"):
        out_TD = dispatch.unpermute(y_RD, r.weights_TK, plan.slot_TK, plan.src_R)
    return out_TD, router_sums(r, cfg), dropped


def _local_moe(params: Params, x_TD: jax.Array, xr_TD: jax.Array, cfg: MoEConfig, bias_E):
    """Single-device layer on flat tokens: [T, D] -> ([T, D], MoEAux)."""
    w = params["experts"]
    # Expert choice fills exactly C slots per expert: the dense [E, C] layout.
    cap = local_experts_capacity(w, cfg) if cfg.router == "expert_choice" else None
    out_TD, sums, dropped = moe_core(x_TD, xr_TD, params["router"]["w_DE"], cfg, bias_E, cap,
                                     local_experts_dropless(w, cfg), cfg.group_align)
    return out_TD, finalize_stats(sums, cfg, dropped)


def untouched_tokens(tokens_EC: jax.Array, num_tokens: int) -> jax.Array:
    """Expert choice: how many of the tokens no expert took (int32 [])."""
    taken_T = jnp.zeros((num_tokens,), jnp.int32).at[tokens_EC.reshape(-1)].max(1)
    return num_tokens - jnp.sum(taken_T)


def moe_apply(params: Params, x: jax.Array, cfg: MoEConfig, *,
              bias: Optional[jax.Array] = None, train: bool = False,
              rng: Optional[jax.Array] = None, mesh: Optional[jax.sharding.Mesh] = None):
    """Applies the MoE layer to `x[..., D]`; returns `(y[..., D], MoEAux)`.

    Args:
      params: from `init_params` (or an NNX/Linen module's state, same names).
      x: tokens with any leading shape, e.g. `x_BTD`.
      cfg: the layer's `MoEConfig`.
      bias: float32 [E] selection bias for `router='sigmoid_topk'` (None = 0).
      train: enables router jitter (needs `rng`).
      mesh: a mesh with an `expert` axis of size > 1 runs the layer expert-
        parallel; by default the mesh of the enclosing `jax.set_mesh` (if any).
    """
    _check_input(x, cfg)
    x_TD = x.reshape(-1, cfg.d_model).astype(jnp.dtype(cfg.dtype))
    from jmoe.sharding import expert_parallel  # the sharding layer imports this module

    xr_TD = router_input(x_TD, cfg, train, rng)
    ep_mesh = expert_parallel.active_expert_mesh(mesh)
    if ep_mesh is not None:
        y_TD, aux = expert_parallel.moe_apply_ep(params, x_TD, xr_TD, cfg, ep_mesh, bias)
    else:
        y_TD, aux = _local_moe(params, x_TD, xr_TD, cfg, bias)
    if cfg.num_shared_experts:
        y_TD = y_TD + shared_experts(params, x_TD, cfg)
    return y_TD.reshape(x.shape).astype(x.dtype), aux


# ---------------------------------------------------------- NNX module ----

class RouterBias(nnx.Variable):
    """The aux-loss-free selection bias: state, not a trained parameter."""


class Router(nnx.Module):
    def __init__(self, w_DE: jax.Array, cfg: MoEConfig):
        self.w_DE = nnx.Param(w_DE)
        self.bias = RouterBias(init_bias(cfg))


class Experts(nnx.Module):
    def __init__(self, weights: Mapping[str, jax.Array]):
        for name, value in weights.items():
            setattr(self, name, nnx.Param(value))


class MoE(nnx.Module):
    """A Mixture-of-Experts FFN layer (Flax NNX).

        layer = jmoe.MoE(cfg, rngs=nnx.Rngs(params=0))
        y_BTD, aux = layer(x_BTD, train=True, rng=key)

    Submodules: `router` (`w_DE` and a `RouterBias` `bias`), `experts`
    (stacked `w_*_EDF`/`w_down_EFD`), and `shared` when configured.
    """

    def __init__(self, cfg: MoEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        p = init_params(rngs.params(), cfg)
        self.router = Router(p["router"]["w_DE"], cfg)
        self.experts = Experts(p["experts"])
        self.shared = Experts(p["shared"]) if "shared" in p else None

    def params_dict(self) -> dict:
        """The layer's weights in `moe_apply`'s layout."""
        p = {"router": {"w_DE": self.router.w_DE[...]},
             "experts": {k: v[...] for k, v in vars(self.experts).items()
                         if isinstance(v, nnx.Param)}}
        if self.shared is not None:
            p["shared"] = {k: v[...] for k, v in vars(self.shared).items()
                           if isinstance(v, nnx.Param)}
        return p

    def __call__(self, x: jax.Array, *, train: bool = False, rng: Optional[jax.Array] = None,
                 mesh: Optional[jax.sharding.Mesh] = None):
        return moe_apply(self.params_dict(), x, self.cfg, bias=self.router.bias[...],
                         train=train, rng=rng, mesh=mesh)

    def update_bias(self, aux: MoEAux) -> None:
        """Aux-loss-free balancing step from the loads in `aux` (outside the optimizer)."""
        self.router.bias[...] = routing.update_bias(self.router.bias[...], aux.expert_load,
                                                    self.cfg.bias_update_rate)
