"""Device meshes with the axes jmoe shards over: `data`, `expert`, `tensor`."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jmoe.config import FieldError

AXES = ("data", "expert", "tensor")


def _get(cfg: Any, name: str, default):
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def mesh_shape(num_devices: int, data: int = -1, expert: int = 1, tensor: int = 1, *,
               owner: str = "mesh") -> tuple:
    """Resolves one `-1` axis and checks the sizes multiply to `num_devices`.

    `owner` names where the sizes were set in error messages (`config.mesh`
    in the trainer)."""
    sizes = {"data": data, "expert": expert, "tensor": tensor}
    for name, v in sizes.items():
        if not isinstance(v, int) or v == 0 or v < -1:
            raise FieldError(owner, name, v, "use a positive size or -1 (fill).")
    free = [n for n, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"{owner} axes {free} are all -1: at most one axis may be -1.")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"{owner}: {num_devices} devices do not divide by the fixed axes "
                f"(product {fixed}) of {sizes}: choose sizes whose product divides "
                f"{num_devices}.")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(
            f"{owner}: data*expert*tensor = {fixed} but there are {num_devices} devices: "
            "make the product equal the device count, or set one axis to -1.")
    return tuple(sizes[n] for n in AXES)


def make_mesh(cfg: Any = None, *, data: Optional[int] = None, expert: Optional[int] = None,
              tensor: Optional[int] = None,
              devices: Optional[Sequence[jax.Device]] = None, owner: str = "mesh") -> Mesh:
    """A `Mesh` over all global devices (every process) with axes `AXES`.

    `cfg` may be a ConfigDict/dict/object with `data`, `expert`, `tensor`
    fields; keyword arguments override it. One axis may be -1 (fill).
    The axes are `Auto`: GSPMD propagates shardings outside jmoe's own
    `shard_map` regions, where the collectives are written out explicitly.
    """
    data = _get(cfg, "data", -1) if data is None else data
    expert = _get(cfg, "expert", 1) if expert is None else expert
    tensor = _get(cfg, "tensor", 1) if tensor is None else tensor
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(len(devices), data, expert, tensor, owner=owner)
    if devices == list(jax.devices()):
        # Topology-aware order (and multi-process layout) from JAX itself.
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * 3)


def axis_size(mesh, name: str) -> int:
    """Size of axis `name` in `mesh`, 1 if the mesh has no such axis."""
    return dict(zip(mesh.axis_names, mesh.axis_sizes)).get(name, 1) if mesh is not None else 1
