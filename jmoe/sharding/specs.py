"""Every partition spec jmoe uses, in one table.

Tokens are sharded over (`data`, `expert`): "expert parallel as data
parallel". Expert weights are sharded over `expert` on their E dimension and,
with expert tensor parallelism, over `tensor` on F. Everything else is
replicated, unless FSDP (`fsdp_spec`) also shards it over `data`.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from jax.sharding import PartitionSpec as P

TOKEN_AXES = ("data", "expert")

TOKENS_TD = P(TOKEN_AXES, None)          # flat tokens [T, D]
BATCH_BTD = P(TOKEN_AXES, None, None)    # activations [B, T, D]
BATCH_BT = P(TOKEN_AXES, None)           # token ids [B, T]
REPLICATED = P()

FSDP_AXIS = "data"  # ZeRO-3: parameters and optimizer moments split over the data shards
FSDP_MIN_SIZE = 2 ** 14  # smaller leaves (norm scales, routers) stay as they are

EXPERT_SPECS = {
    "w_gate_EDF": P("expert", None, "tensor"),
    "w_up_EDF": P("expert", None, "tensor"),
    "w_down_EFD": P("expert", "tensor", None),
    # MoEConfig.expert_bias (GPT-OSS): biases follow their projections.
    "b_gate_EF": P("expert", "tensor"),
    "b_up_EF": P("expert", "tensor"),
    "b_down_ED": P("expert", None),
}


def moe_param_specs(params: Mapping) -> dict:
    """Partition specs for a `jmoe.init_params` tree (same structure)."""
    out = {}
    for group, leaves in params.items():
        if group == "experts":
            out[group] = {k: EXPERT_SPECS[k] for k in leaves}
        else:
            out[group] = {k: REPLICATED for k in leaves}
    return out


def restrict(spec: P, axis_names) -> P:
    """Drops mesh axes that `axis_names` does not have (e.g. a mesh without `tensor`)."""
    def keep(entry):
        if entry is None:
            return None
        if isinstance(entry, tuple):
            kept = tuple(a for a in entry if a in axis_names)
            return kept if kept else None
        return entry if entry in axis_names else None
    return P(*(keep(e) for e in spec))


def fsdp_spec(spec: P, shape: Sequence[int], fsdp_size: int, *,
              min_size: int = FSDP_MIN_SIZE) -> P:
    """`spec` plus `FSDP_AXIS` on one more dimension of a leaf of `shape`.

    The dimension is the largest one that `spec` leaves unsharded (None) and
    that `fsdp_size` (the size of the `data` axis) divides; the first of
    equal candidates. An expert weight `w_EDF` with spec ('expert', None,
    'tensor') thus gets ('expert', 'data', 'tensor'); an embedding `[V, D]`
    gets ('data', None) when V >= D. Returns `spec` unchanged when
    `fsdp_size` is 1, the leaf has fewer than `min_size` elements, no free
    dimension divides, or `spec` already uses `FSDP_AXIS`. Apply it before
    `restrict`.
    """
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    used = {a for e in entries if e is not None for a in (e if isinstance(e, tuple) else (e,))}
    if fsdp_size <= 1 or math.prod(shape) < min_size or FSDP_AXIS in used:
        return spec
    free = [i for i, e in enumerate(entries) if e is None and shape[i] % fsdp_size == 0]
    if not free:
        return spec
    dim = max(free, key=lambda i: (shape[i], -i))
    return P(*(FSDP_AXIS if i == dim else e for i, e in enumerate(entries)))
