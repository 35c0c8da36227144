"""The trainer's mesh and the partition table of its state.

Mesh axes are jmoe's ('data', 'expert', 'tensor'). Token batches are split
over ('data', 'expert') ("expert parallel as data parallel"); expert weights
and their Adam moments follow `jmoe.sharding.specs.EXPERT_SPECS` (E over
'expert', F over 'tensor'); everything else is replicated.
"""

from __future__ import annotations

import re
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jmoe.sharding import make_mesh as _jmoe_make_mesh, specs

# An expert weight anywhere in the state: the params and every optimizer
# moment that mirrors them (".../mu/blocks/0/ffn/experts/w_up_EDF/value").
_EXPERT_LEAF = re.compile(r"(?:^|/)experts/(w_\w+)(?:/|$)")


def make_mesh(mesh_cfg: Any, num_experts: int | None = None) -> Mesh:
    """The mesh of `config.mesh` (data, expert, tensor; one of them may be -1)."""
    try:
        return _jmoe_make_mesh(data=mesh_cfg.data, expert=mesh_cfg.expert,
                               tensor=mesh_cfg.get("tensor", 1), num_experts=num_experts)
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith("config.") else f"config.{msg}") from e


def _path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "/".join(parts)


def spec_for(path: str, ndim: int, axis_names) -> P:
    """The partition spec of the state leaf at `path` ('/'-joined keys)."""
    m = _EXPERT_LEAF.search(path)
    if m and m.group(1) in specs.EXPERT_SPECS and ndim == len(specs.EXPERT_SPECS[m.group(1)]):
        return specs.restrict(specs.EXPERT_SPECS[m.group(1)], axis_names)
    return specs.REPLICATED


def state_shardings(mesh: Mesh, abstract: Any) -> Any:
    """NamedShardings for a pytree of arrays or ShapeDtypeStructs."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, spec_for(_path_str(p), len(x.shape), mesh.axis_names)),
        abstract)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[B, T+1] token batches: rows over ('data', 'expert')."""
    return NamedSharding(mesh, specs.restrict(specs.BATCH_BT, mesh.axis_names))
