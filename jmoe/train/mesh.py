"""The trainer's mesh and the partition table of its state.

Mesh axes are jmoe's ('data', 'expert', 'tensor'). Token batches are split
over ('data', 'expert') ("expert parallel as data parallel"); expert weights
and their Adam moments follow `jmoe.sharding.specs.EXPERT_SPECS` (E over
'expert', F over 'tensor'); everything else is replicated. With
`config.mesh.fsdp` (ZeRO-3) every leaf of at least `specs.FSDP_MIN_SIZE`
elements is also split over 'data' on one dimension (`specs.fsdp_spec`):
the largest free one for dense weights, D for expert weights. Adam moments
follow their parameters because the rule depends only on path and shape.
"""

from __future__ import annotations

import re
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jmoe.sharding import axis_size, specs

# An expert weight anywhere in the state: the params and every optimizer
# moment that mirrors them (".../mu/blocks/0/ffn/experts/w_up_EDF/value").
_EXPERT_LEAF = re.compile(r"(?:^|/)experts/(w_\w+)(?:/|$)")


def path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "/".join(parts)


# A leaf of layers stacked for `lax.scan` (model.scan_layers): a leading [R]
# axis over ".../stacks/<g>/layers/<j>/...", then one layer's shape.
_STACKED_LEAF = re.compile(r"(?:^|/)stacks/\d+/layers/\d+/")


def spec_for(path: str, shape: tuple[int, ...], axis_names, fsdp_size: int = 1) -> P:
    """The partition spec of the state leaf at `path` ('/'-joined keys) of `shape`.

    `fsdp_size` > 1 (the 'data' axis size, with FSDP on) adds the FSDP split.
    A stacked leaf (scan_layers) is split as one layer's, its [R] axis whole:
    the scan slices one layer per step without moving data between devices.
    """
    if is_stacked(path) and shape:
        return P(None, *_layer_spec(path, tuple(shape[1:]), axis_names, fsdp_size))
    return _layer_spec(path, shape, axis_names, fsdp_size)


def is_stacked(path: str) -> bool:
    """Whether the state leaf at `path` holds one entry per layer of a scan
    (model.scan_layers): its first axis is the [R] layers, not the weight's."""
    return _STACKED_LEAF.search(path) is not None


def _layer_spec(path: str, shape: tuple[int, ...], axis_names, fsdp_size: int) -> P:
    m = _EXPERT_LEAF.search(path)
    expert = specs.EXPERT_SPECS.get(m.group(1)) if m else None
    spec = expert if expert is not None and len(shape) == len(expert) else specs.REPLICATED
    return specs.restrict(specs.fsdp_spec(spec, shape, fsdp_size), axis_names)


def state_shardings(mesh: Mesh, abstract: Any, fsdp: bool = False) -> Any:
    """NamedShardings for a pytree of arrays or ShapeDtypeStructs.

    `fsdp=True` also shards parameters and their optimizer moments over
    'data' (ZeRO-3); a no-op when the mesh's 'data' axis has size 1.
    """
    fsdp_size = axis_size(mesh, specs.FSDP_AXIS) if fsdp else 1
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(
            mesh, spec_for(path_str(p), tuple(x.shape), mesh.axis_names, fsdp_size)),
        abstract)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[B, T+1] token batches: rows over ('data', 'expert')."""
    return NamedSharding(mesh, specs.restrict(specs.BATCH_BT, mesh.axis_names))
