"""Replication types inside `shard_map` (JAX's "varying manual axes").

Inside `shard_map` every value records the manual mesh axes it varies over.
Loop carries and custom-VJP cotangents must carry exactly their primal's
type; these two helpers make that so. Outside `shard_map` both are no-ops.
"""

from __future__ import annotations

import jax
from jax import lax


def varying_axes(x: jax.Array) -> frozenset:
    mat = getattr(jax.typeof(x), "manual_axis_type", None)
    return frozenset(getattr(mat, "varying", ()) or ())


def varying_like(init: jax.Array, *refs: jax.Array) -> jax.Array:
    """`init` marked as varying over every axis that one of `refs` varies over."""
    axes = frozenset().union(*(varying_axes(r) for r in refs)) - varying_axes(init)
    return lax.pcast(init, tuple(sorted(axes)), to="varying") if axes else init


def match_cotangent(ct: jax.Array, primal: jax.Array) -> jax.Array:
    """A cotangent summed over the axes its primal is replicated on.

    The gradient of a value replicated over an axis is the sum of the
    per-device gradients (what JAX's own transpose rules do).
    """
    extra = varying_axes(ct) - varying_axes(primal)
    ct = lax.psum(ct, tuple(sorted(extra))) if extra else ct
    return varying_like(ct, primal)


def struct_like(shape, dtype, *refs: jax.Array) -> jax.ShapeDtypeStruct:
    """A `ShapeDtypeStruct` for a kernel's output that varies over every
    manual axis one of `refs` varies over (inside `shard_map` with
    `check_vma=True`, a `pallas_call` must declare this; elsewhere a plain
    struct)."""
    mats = [m for m in (getattr(jax.typeof(r), "manual_axis_type", None) for r in refs)
            if m is not None]
    if not mats:
        return jax.ShapeDtypeStruct(shape, dtype)
    varying = frozenset().union(*(m.varying for m in mats))
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mats[0].update(varying=varying))
