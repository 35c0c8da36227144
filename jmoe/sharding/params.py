"""Sharded parameter initialisation: no full expert tensor ever lives on one device."""

from __future__ import annotations

import functools

import jax
from jax.sharding import NamedSharding

from jmoe.config import MoEConfig
from jmoe.layer import init_params
from jmoe.sharding import specs
from jmoe.sharding.checks import check_layer_on_mesh


def moe_shardings(cfg: MoEConfig, mesh) -> dict:
    """NamedShardings for `jmoe.init_params(key, cfg)` on `mesh` (same tree)."""
    shapes = jax.eval_shape(functools.partial(init_params, cfg=cfg), jax.random.key(0))
    tree = specs.moe_param_specs(shapes)
    return jax.tree.map(lambda s: NamedSharding(mesh, specs.restrict(s, mesh.axis_names)), tree,
                        is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))


def init_params_sharded(key: jax.Array, cfg: MoEConfig, mesh) -> dict:
    """`init_params` compiled with output shardings: each device creates only
    its own expert slice `[E/ep, D, F/tp]`."""
    check_layer_on_mesh(cfg, mesh)
    return jax.jit(functools.partial(init_params, cfg=cfg),
                   out_shardings=moe_shardings(cfg, mesh))(key)
