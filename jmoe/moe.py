"""The MoE layer's entry points: `moe_apply` (plain JAX) and `MoE` (Flax NNX).

`moe_apply` picks where the layer runs -- on one device (`jmoe.layer`) or
expert-parallel over the active mesh (`jmoe.sharding.expert_parallel`) --
and nothing imports this module back. Plain-JAX users call it with the dict
from `init_params`:

    params = jmoe.init_params(jax.random.key(0), cfg)
    y_BTD, aux = jmoe.moe_apply(params, x_BTD, cfg)
"""

from __future__ import annotations

from typing import Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jmoe import routing
from jmoe.config import MoEConfig
from jmoe.layer import (Params, check_call, check_placement, init_bias, init_params, local_moe,
                        router_input, shared_experts)
from jmoe.logical import LOGICAL_AXES
from jmoe.placement import PlacementArrays
from jmoe.sharding import expert_parallel
from jmoe.stats import MoEAux

__all__ = ["MoE", "MoEAux", "RouterBias", "init_bias", "init_params", "moe_apply"]

BIAS_COLLECTION = "router_bias"  # the selection bias's Linen collection / NNX type name


def moe_apply(params: Params, x: jax.Array, cfg: MoEConfig, *,
              bias: Optional[jax.Array] = None, train: bool = False,
              rng: Optional[jax.Array] = None, mesh: jax.sharding.Mesh | bool | None = None,
              placement: Optional[PlacementArrays] = None):
    """Applies the MoE layer to `x[..., D]`; returns `(y[..., D], MoEAux)`.

    Args:
      params: from `init_params` (or an NNX/Linen module's state, same names).
      x: tokens with any leading shape, e.g. `x_BTD`.
      cfg: the layer's `MoEConfig`.
      bias: float32 [E] selection bias, only for `router='sigmoid_topk'` (None = 0).
      train: enables router jitter (needs `rng`).
      mesh: a mesh with an `expert` axis of size > 1 runs the layer expert-
        parallel; by default (None) the mesh of the enclosing `jax.set_mesh`
        (if any); False runs the single-device path even inside one (GSPMD
        then partitions it like any other jitted code).
      placement: where experts run (`jmoe.placement.Placement(...).as_arrays()`):
        P*S physical slots holding the E experts plus redundant replicas, P the
        expert axis size. Data, not shapes: another placement of the same
        sizes does not recompile. Changes where work runs, never the result
        (except which rows capacity dispatch drops: every slot gets one
        expert's capacity, so a replicated expert holds more rows).
    """
    check_call(x, cfg, bias)
    check_placement(cfg, placement)
    x_TD = x.reshape(-1, cfg.d_model)
    if cfg.dtype is not None:  # None: compute in the input's dtype
        x_TD = x_TD.astype(jnp.dtype(cfg.dtype))
    xr_TD = router_input(x_TD, cfg, train, rng)
    ep_mesh = None if mesh is False else expert_parallel.active_expert_mesh(mesh)
    if ep_mesh is not None:
        y_TD, aux = expert_parallel.moe_apply_ep(params, x_TD, xr_TD, cfg, ep_mesh, bias,
                                                 placement)
    else:
        y_TD, aux = local_moe(params, x_TD, xr_TD, cfg, bias, placement)
    if cfg.num_shared_experts:
        y_TD = y_TD + shared_experts(params, x_TD, cfg)
    return y_TD.reshape(x.shape).astype(x.dtype), aux


# ---------------------------------------------------------- NNX module ----

def selection_bias(cfg: MoEConfig, bias_E: jax.Array) -> Optional[jax.Array]:
    """The modules keep a bias for every router; only `sigmoid_topk` reads it."""
    return bias_E if cfg.router == "sigmoid_topk" else None


class RouterBias(nnx.Variable):
    """The aux-loss-free selection bias: state, not a trained parameter."""


# One name for the bias in both frameworks: the Linen adapter's collection is
# "router_bias", and nnx.bridge converts it to (and from) this type.
nnx.register_variable_name(BIAS_COLLECTION, RouterBias, overwrite=True)


def _param(name: str, value: jax.Array) -> nnx.Param:
    """A weight carrying its logical axis names (`jmoe.logical`) as metadata.
    Not sharded at creation (`eager_sharding=False`): the names are not mesh
    axes until the user's rules map them, and the layer must build without a
    mesh."""
    return nnx.Param(value, out_sharding=LOGICAL_AXES[name], eager_sharding=False)


class Router(nnx.Module):
    def __init__(self, w_DE: jax.Array, cfg: MoEConfig):
        self.w_DE = _param("w_DE", w_DE)
        self.bias = RouterBias(init_bias(cfg))


class Experts(nnx.Module):
    def __init__(self, weights: Mapping[str, jax.Array]):
        for name, value in weights.items():
            setattr(self, name, _param(name, value))


class MoE(nnx.Module):
    """A Mixture-of-Experts FFN layer (Flax NNX).

        layer = jmoe.MoE(cfg, rngs=nnx.Rngs(params=0, dropout=1))
        y_BTD, aux = layer(x_BTD)                 # deterministic: no router jitter
        layer.train(); y_BTD, aux = layer(x_BTD)  # jitter from the `dropout` stream

    Submodules: `router` (`w_DE` and a `RouterBias` `bias`), `experts`
    (stacked `w_*_EDF`/`w_down_EFD`), and `shared` when configured. Every
    weight carries its logical axis names (`jmoe.logical.LOGICAL_AXES`) as
    `out_sharding` metadata for `nnx.get_partition_spec`.

    Args:
      cfg: the layer's `MoEConfig`.
      rngs: `params` initialises the weights; the `rng_collection` stream
        (else `default`), when present, feeds router jitter in training.
      deterministic: no jitter when True. Unlike `nnx.Dropout` it starts True,
        so a model that never calls `.train()` needs no jitter stream;
        `model.train()` / `model.eval()` flip it as for Dropout.
      return_aux: False makes the call return only `y` (an MLP's signature)
        and sow the `MoEAux` as an `nnx.Intermediate` named `aux`; collect it
        with `y, sown = nnx.capture(model, nnx.Intermediate)(x)` and
        `jmoe.aux_loss(sown, weights)` (outside `nnx.capture` it is dropped).
      mesh: default for the call's `mesh=` (False = always the local path).
    """

    def __init__(self, cfg: MoEConfig, *, rngs: nnx.Rngs, deterministic: bool = True,
                 return_aux: bool = True, mesh=None, rng_collection: str = "dropout"):
        if cfg.router_bias or cfg.expert_bias:
            raise ValueError("MoEConfig.router_bias / expert_bias (GPT-OSS) are not NNX/Linen "
                             "module weights yet: call jmoe.moe_apply with jmoe.init_params.")
        self.cfg = cfg
        p = init_params(rngs.params(), cfg)
        self.router = Router(p["router"]["w_DE"], cfg)
        self.experts = Experts(p["experts"])
        self.shared = Experts(p["shared"]) if "shared" in p else None
        self.deterministic = deterministic
        self.return_aux = return_aux
        self.mesh = mesh
        self.rng_collection = rng_collection
        # As nnx.Dropout: a fork of the stream (else no state is added, so
        # models built with params-only Rngs keep exactly their variables).
        has_stream = rng_collection in rngs or "default" in rngs
        self.rngs = rngs[rng_collection].fork() if has_stream else nnx.data(None)

    # True when `experts` holds slot-ordered weights [P*S, ...] for the
    # placement passed to each call (`jmoe.placement.to_slots`); the trainer
    # sets it when it re-places experts online.
    slot_weights: bool = False

    def params_dict(self) -> dict:
        """The layer's weights in `moe_apply`'s layout."""
        p = {"router": {"w_DE": self.router.w_DE[...]},
             "slots" if self.slot_weights else "experts": {
                 k: v[...] for k, v in vars(self.experts).items() if isinstance(v, nnx.Param)}}
        if self.shared is not None:
            p["shared"] = {k: v[...] for k, v in vars(self.shared).items()
                           if isinstance(v, nnx.Param)}
        return p

    def __call__(self, x: jax.Array, *, train: Optional[bool] = None,
                 deterministic: Optional[bool] = None, rng: Optional[jax.Array] = None,
                 rngs: nnx.Rngs | nnx.RngStream | None = None, mesh=None,
                 placement: Optional[PlacementArrays] = None):
        """`moe_apply` with this module's weights and bias (same arguments).

        Jitter runs when `train` (explicit, as before), else when not
        `deterministic` (the call's, else the module's). Its key: `rng`, else
        a draw from `rngs` (the call's, else the module's stream).
        Returns `(y, MoEAux)`, or `y` alone with `return_aux=False`.
        """
        if train is None:
            train = not (self.deterministic if deterministic is None else deterministic)
        if train and self.cfg.jitter_eps > 0 and rng is None:
            rng = _draw(rngs if rngs is not None else self.rngs, self.rng_collection)
        bias = selection_bias(self.cfg, self.router.bias[...])
        y, aux = moe_apply(self.params_dict(), x, self.cfg, bias=bias, train=train, rng=rng,
                           mesh=self.mesh if mesh is None else mesh, placement=placement)
        if self.return_aux:
            return y, aux
        # Sown only under nnx.capture (Flax's way to collect intermediates);
        # outside it the aux is dropped rather than left on the module as
        # state that would change the model's structure (and that Flax
        # deprecates).
        if hasattr(self, "__captures__"):
            self.sow(nnx.Intermediate, "aux", aux)
        return y

    def update_bias(self, aux: MoEAux) -> None:
        """Aux-loss-free balancing step from the loads in `aux` (outside the optimizer)."""
        self.router.bias[...] = routing.update_bias(self.router.bias[...], aux.expert_load,
                                                    self.cfg.bias_update_rate)


def _draw(rngs, collection: str) -> jax.Array:
    """A jitter key from an `nnx.Rngs` (its `collection` stream) or an `RngStream`."""
    if rngs is None:
        raise ValueError(
            f"MoEConfig.jitter_eps > 0 and the layer is training, but it has no "
            f"'{collection}' RNG stream: build it with rngs=nnx.Rngs(params=..., "
            f"{collection}=...), pass rngs= or rng= to the call, or call .eval().")
    return rngs[collection]() if isinstance(rngs, nnx.Rngs) else rngs()
