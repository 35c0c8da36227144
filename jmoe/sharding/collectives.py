"""The collectives of expert parallelism, over the `expert` mesh axis.

`all_to_all` is flat or two-level (Tutel's 2DH: within node groups of
`a2a_hierarchy` devices, then across them; bitwise the flat result).
`ragged_all_to_all` sends variable-size slices: XLA's native
`lax.ragged_all_to_all` (GPU, TPU) or `ragged_all_to_all_dense`, a padded
dense emulation with identical results (XLA:CPU has no ragged all-to-all).

Shapes: P peers on the `expert` axis, Z rows of one peer's buffer.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from jmoe.config import Execution


def all_to_all(x: jax.Array, ep: int, hierarchy: int = 0) -> jax.Array:
    """Tiled all-to-all over `expert` on axis 0: chunk j of `x[ep*m, ...]` goes
    to device j; the result holds, in source order, the chunks sent to us.

    `hierarchy = g` (1 < g < ep, g | ep) runs it as two all-to-alls: within
    node groups of g devices, then across groups with the same local index.
    """
    if ep == 1:
        return x
    if hierarchy <= 1 or hierarchy >= ep:
        return lax.all_to_all(x, "expert", 0, 0, tiled=True)
    g, nodes = hierarchy, ep // hierarchy
    m = x.shape[0] // ep
    rest = x.shape[1:]
    # Chunks are indexed by destination (node, local); send each to its local
    # index inside our node first.
    x = x.reshape((nodes, g, m) + rest).swapaxes(0, 1).reshape(x.shape)
    intra = [[n * g + l for l in range(g)] for n in range(nodes)]
    x = lax.all_to_all(x, "expert", 0, 0, tiled=True, axis_index_groups=intra)
    # Now [source local, destination node]: forward across nodes.
    x = x.reshape((g, nodes, m) + rest).swapaxes(0, 1).reshape(x.shape)
    inter = [[n * g + l for n in range(nodes)] for l in range(g)]
    return lax.all_to_all(x, "expert", 0, 0, tiled=True, axis_index_groups=inter)


def ragged_all_to_all_dense(operand, output, input_offsets, send_sizes, output_offsets,
                            recv_sizes, *, ep: int, hierarchy: int = 0,
                            slot_rows: Optional[int] = None):
    """`lax.ragged_all_to_all` over `expert`, built from a padded dense all-to-all.

    Same semantics: to every peer j this device sends
    `operand[input_offsets[j] : input_offsets[j] + send_sizes[j]]`, which
    lands in peer j's `output` at `output_offsets[j]`; from peer j it receives
    `recv_sizes[j]` rows. Rows of `output` nobody writes keep their value.
    Each peer's slice travels in a buffer of `slot_rows` rows (default
    `operand.shape[0]`, which fits any slice), so this sends `ep * slot_rows`
    rows per device; a smaller `slot_rows` is the caller's promise that no
    slice, sent or received, is longer.
    """
    n = operand.shape[0] if slot_rows is None else slot_rows
    rows = jnp.arange(n, dtype=jnp.int32)
    valid_PZ = rows[None, :] < send_sizes[:, None]
    src_end = operand.shape[0]
    idx_PZ = jnp.where(valid_PZ, input_offsets[:, None] + rows[None, :], src_end)
    padded = jnp.concatenate([operand, jnp.zeros((1,) + operand.shape[1:], operand.dtype)])
    send = padded[idx_PZ]                                       # [ep, n, ...]
    recv = all_to_all(send.reshape((ep * n,) + operand.shape[1:]), ep, hierarchy)
    # Where each source wants its slice placed in our output (sender's view).
    dest_off = all_to_all(output_offsets, ep, hierarchy)
    ok_PZ = rows[None, :] < recv_sizes[:, None]
    dest_PZ = jnp.where(ok_PZ, dest_off[:, None] + rows[None, :], output.shape[0])
    return output.at[dest_PZ.reshape(-1)].set(recv, mode="drop")


def ragged_all_to_all(ex: Execution, ep: int, *args, slot_rows: Optional[int] = None):
    """`lax.ragged_all_to_all(*args)` over `expert`, natively or emulated, as
    `ex.ragged` decides for this backend (`slot_rows`: see the dense form)."""
    if ex.ragged(jax.default_backend()) == "native":
        return lax.ragged_all_to_all(*args, axis_name="expert")
    return ragged_all_to_all_dense(*args, ep=ep, hierarchy=ex.a2a_hierarchy, slot_rows=slot_rows)
