"""The trainer's mesh and the partition table of its state.

Mesh axes are ('data', 'expert'). Tokens are split over both ("expert
parallel as data parallel"); expert weights `[E, ...]` and their optimizer
moments over 'expert'; everything else is replicated.
"""

from __future__ import annotations

import re
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH = P(("data", "expert"))  # [B, ...] token batches
REPLICATED = P()

# First match wins; the pattern is searched in the '/'-joined key path, so the
# same rule covers a weight and its Adam moments (".../mu/.../w_up_EDF").
RULES: tuple[tuple[str, P], ...] = (
    (r"experts/w_\w+_E\w+", P("expert")),
    (r".*", REPLICATED),
)


def mesh_shape(data: int, expert: int, num_devices: int) -> tuple[int, int]:
    """Resolves -1 entries; raises ValueError naming `config.mesh.<axis>`."""
    for name, v in (("data", data), ("expert", expert)):
        if v == 0 or v < -1:
            raise ValueError(f"config.mesh.{name}={v} is invalid: use a positive size or -1 "
                             "(the remaining devices).")
    if data == -1 and expert == -1:
        raise ValueError("config.mesh.data and config.mesh.expert are both -1: fix one of them.")
    if data == -1:
        if num_devices % expert:
            raise ValueError(f"config.mesh.expert={expert} does not divide the {num_devices} "
                             "devices: pick a divisor.")
        data = num_devices // expert
    if expert == -1:
        if num_devices % data:
            raise ValueError(f"config.mesh.data={data} does not divide the {num_devices} "
                             "devices: pick a divisor.")
        expert = num_devices // data
    if data * expert != num_devices:
        raise ValueError(f"config.mesh.data={data} x config.mesh.expert={expert} = "
                         f"{data * expert} but {num_devices} devices are present: make the "
                         "product match (or use -1).")
    return data, expert


def make_mesh(data: int, expert: int, devices=None) -> Mesh:
    d, e = mesh_shape(data, expert, len(jax.devices() if devices is None else devices))
    try:
        from jmoe.sharding import make_mesh as jmoe_make_mesh  # issue 4's mesh builder
    except ImportError:
        jmoe_make_mesh = None
    if jmoe_make_mesh is not None and devices is None:
        return jmoe_make_mesh(data=d, expert=e, tensor=1)
    devices = jax.devices() if devices is None else devices
    # Auto axes: GSPMD propagates shardings through the dense parts of the model;
    # the MoE layer does its own collectives with shard_map.
    return jax.make_mesh((d, e), ("data", "expert"), axis_types=(AxisType.Auto,) * 2,
                         devices=devices)


def _path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "/".join(parts)


def spec_for(path: str, ndim: int) -> P:
    for pattern, spec in RULES:
        if re.search(pattern, path):
            return spec if len(spec) <= ndim else REPLICATED
    return REPLICATED


def state_shardings(mesh: Mesh, abstract: Any) -> Any:
    """NamedShardings for a pytree of arrays / ShapeDtypeStructs, by the RULES."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, spec_for(_path_str(p), len(x.shape))), abstract)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, BATCH)
