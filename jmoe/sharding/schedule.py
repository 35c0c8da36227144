"""Chunk scheduling: static token chunks and the order they run in.

Chunked execution (Tutel's overlap degree, Lancet's token chunks) splits a
computation into pieces whose collectives are independent, so a GPU can run
piece i+1's all-to-all while piece i computes. `chunk_bounds` cuts the
pieces; `after` orders them where overlap cannot help (XLA:CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def serialize_chunks() -> bool:
    """Whether chunk i+1 must wait for chunk i (XLA:CPU only).

    XLA:CPU runs collectives synchronously, so overlapping chunks gains
    nothing there; ordering them keeps every device's sequence of collectives
    the same, forward and backward. (A segfault first blamed on unordered
    chunks turned out to be a YNNPACK fusion bug: see
    `jmoe.runtime.xla_flags.CPU_WORKAROUND_FLAGS`.)
    """
    return jax.default_backend() == "cpu"


def after(x, dep):
    """`x`, made to depend on `dep` when chunks are serialized (identity values).

    The order holds in the backward pass too, reversed: the cotangent that
    flows to `dep` (a zero) is only available once `x`'s cotangent is, so
    chunk i's backward waits for chunk i+1's.
    """
    if not serialize_chunks():
        return x
    return _ordered(x, dep)


@jax.custom_vjp
def _ordered(x, dep):
    x, _ = lax.optimization_barrier((x, dep))
    return x


def _ordered_fwd(x, dep):
    return _ordered(x, dep), jax.tree.map(jnp.zeros_like, dep)


def _ordered_bwd(zero_dep, ct_x):
    ct_dep, ct_x = lax.optimization_barrier((zero_dep, ct_x))
    return ct_x, ct_dep


_ordered.defvjp(_ordered_fwd, _ordered_bwd)


def chunk_bounds(size: int, chunks: int) -> list:
    """Static [start, stop) pieces of `range(size)`, as equal as possible, none empty."""
    edges = np.linspace(0, size, min(chunks, max(size, 1)) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]
