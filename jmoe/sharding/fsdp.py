"""FSDP weight gathering overlapped with the matmul that needs the weight.

With `config.mesh.fsdp` every large dense weight is split over `data` on the
one dimension `specs.fsdp_spec` picks, and GSPMD all-gathers it before use.
`ring_einsum(spec, x, w)` computes `jnp.einsum(spec, x, w)` instead as a
`shard_map` over the context mesh: x's rows (its first dimension, the batch)
over ('data', 'expert') as the trainer shards them, w as its FSDP shard, and
inside `collective_matmul.all_gather_einsum`, a ring of `ppermute`s over
`data` in which each step multiplies by the block already here while the next
block travels. The in_specs are the state's own shardings (the same
`fsdp_spec` call), so no resharding happens around the ring.

In the backward pass the ring's `ppermute`s transpose to `ppermute`s: the
weight gradient comes back to its owner as a reduce-scatter ring (and is
summed over `expert`, where w is replicated).

Where the ring does not apply (no context mesh, `data` of size 1, inside
another `shard_map`, a weight too small or indivisible for FSDP, a batch
that does not split over the token shards) both functions are exactly
`jnp.einsum` / `jnp.dot`. Turned on by `GPTConfig.fsdp_collective_matmul`.
"""

from __future__ import annotations

import functools
import math
import string
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jmoe.sharding import collective_matmul, specs
from jmoe.sharding.mesh import AXES, axis_size


def ring_mesh(mesh=None):
    """The mesh to run the ring on, or None.

    `mesh`, else the context mesh (`jax.set_mesh`), when it has a `data`
    axis of more than one device and none of jmoe's axes is already manual.
    """
    m = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    if m is None or specs.FSDP_AXIS not in (m.axis_names or ()):
        return None
    if axis_size(m, specs.FSDP_AXIS) <= 1:
        return None
    manual = getattr(m, "manual_axes", ()) or ()
    if any(a in manual for a in m.axis_names if a in AXES):
        return None
    return m


def weight_spec(shape, mesh) -> P:
    """The partition spec the trainer gives a non-expert weight of `shape` under FSDP.

    The same rule as `jmoe.train.mesh.spec_for` for leaves outside the
    experts: `fsdp_spec` on a replicated spec, restricted to the mesh's axes.
    """
    spec = specs.fsdp_spec(specs.REPLICATED, tuple(shape), axis_size(mesh, specs.FSDP_AXIS))
    return specs.restrict(spec, mesh.axis_names)


def _ring_layout(spec: str, x: jax.Array, w: jax.Array, mesh) -> Optional[tuple[P, int, tuple]]:
    """(w's spec, its FSDP dimension, token axes), or None where the ring does not apply."""
    w_spec = weight_spec(w.shape, mesh)
    entries = tuple(w_spec)
    if specs.FSDP_AXIS not in entries:
        return None  # small or indivisible: replicated, nothing to gather
    ins, out = spec.replace(" ", "").split("->")
    xs, ws = ins.split(",")
    if not xs or xs[0] in ws or not out.startswith(xs[0]):
        return None  # x's first dimension must be a batch dimension carried to the output
    # Size-1 axes stay out of the specs, so the backward has no psum over them.
    tok = tuple(a for a in specs.TOKEN_AXES
                if a in mesh.axis_names and axis_size(mesh, a) > 1)
    if x.shape[0] % math.prod(axis_size(mesh, a) for a in tok):
        return None
    return w_spec, entries.index(specs.FSDP_AXIS), tok


def ring_einsum(spec: str, x: jax.Array, w: jax.Array, *, mesh=None) -> jax.Array:
    """`jnp.einsum(spec, x, w)`, gathering w's FSDP shards in a ring.

    spec: two operands with explicit labels, e.g. "btd,dhk->bthk"; x's first
      label is the batch (rows sharded over ('data', 'expert')) and must lead
      the output.
    x [B, ...]: activations, sharded over the batch as the trainer shards them.
    w: a weight with the trainer's FSDP sharding (`weight_spec`).
    mesh: defaults to the context mesh (`ring_mesh`).
    """
    return _ring_or_plain(spec, x, w, mesh, lambda: jnp.einsum(spec, x, w))


def ring_dot(x: jax.Array, w: jax.Array, *, mesh=None) -> jax.Array:
    """`jnp.dot(x, w)` for x [B, ..., K] and w [K, N] -> [B, ..., N], via the ring."""
    plain = lambda: jnp.dot(x, w)
    if w.ndim != 2 or not 2 <= x.ndim <= 24:
        return plain()
    lead = string.ascii_lowercase[:x.ndim - 1]
    return _ring_or_plain(f"{lead}y,yz->{lead}z", x, w, mesh, plain)


def ring_applies(spec: str, x: jax.Array, w: jax.Array, *, mesh=None) -> bool:
    """Whether `ring_einsum(spec, x, w)` runs the ring (else it is `jnp.einsum`)."""
    m = ring_mesh(mesh)
    return m is not None and _ring_layout(spec, x, w, m) is not None


def _ring_or_plain(spec, x, w, mesh, plain):
    m = ring_mesh(mesh)
    layout = None if m is None else _ring_layout(spec, x, w, m)
    if layout is None:
        return plain()
    w_spec, w_dim, tok = layout
    x_spec = P(tok) if tok else P()
    ring = functools.partial(collective_matmul.all_gather_einsum, spec,
                             axis_name=specs.FSDP_AXIS, w_dim=w_dim)
    with jax.named_scope("fsdp_ring"):
        return jax.shard_map(ring, mesh=m, in_specs=(x_spec, w_spec), out_specs=x_spec)(x, w)
