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
from jmoe.placement import PlacementArrays
from jmoe.sharding import expert_parallel
from jmoe.stats import MoEAux

__all__ = ["MoE", "MoEAux", "RouterBias", "init_bias", "init_params", "moe_apply"]


def moe_apply(params: Params, x: jax.Array, cfg: MoEConfig, *,
              bias: Optional[jax.Array] = None, train: bool = False,
              rng: Optional[jax.Array] = None, mesh: Optional[jax.sharding.Mesh] = None,
              placement: Optional[PlacementArrays] = None):
    """Applies the MoE layer to `x[..., D]`; returns `(y[..., D], MoEAux)`.

    Args:
      params: from `init_params` (or an NNX/Linen module's state, same names).
      x: tokens with any leading shape, e.g. `x_BTD`.
      cfg: the layer's `MoEConfig`.
      bias: float32 [E] selection bias, only for `router='sigmoid_topk'` (None = 0).
      train: enables router jitter (needs `rng`).
      mesh: a mesh with an `expert` axis of size > 1 runs the layer expert-
        parallel; by default the mesh of the enclosing `jax.set_mesh` (if any).
      placement: where experts run (`jmoe.placement.Placement(...).as_arrays()`):
        P*S physical slots holding the E experts plus redundant replicas, P the
        expert axis size. Data, not shapes: another placement of the same
        sizes does not recompile. Changes where work runs, never the result
        (except that capacity dispatch sizes its buffers per slot).
    """
    check_call(x, cfg, bias)
    check_placement(cfg, placement)
    x_TD = x.reshape(-1, cfg.d_model).astype(jnp.dtype(cfg.dtype))
    xr_TD = router_input(x_TD, cfg, train, rng)
    ep_mesh = expert_parallel.active_expert_mesh(mesh)
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
                 mesh: Optional[jax.sharding.Mesh] = None,
                 placement: Optional[PlacementArrays] = None):
        """`moe_apply` with this module's weights and bias (same arguments)."""
        bias = selection_bias(self.cfg, self.router.bias[...])
        return moe_apply(self.params_dict(), x, self.cfg, bias=bias,
                         train=train, rng=rng, mesh=mesh, placement=placement)

    def update_bias(self, aux: MoEAux) -> None:
        """Aux-loss-free balancing step from the loads in `aux` (outside the optimizer)."""
        self.router.bias[...] = routing.update_bias(self.router.bias[...], aux.expert_load,
                                                    self.cfg.bias_update_rate)
