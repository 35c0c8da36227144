"""Every partition spec jmoe uses, in one table.

Tokens are sharded over (`data`, `expert`): "expert parallel as data
parallel". Expert weights are sharded over `expert` on their E dimension and,
with expert tensor parallelism, over `tensor` on F. Everything else is
replicated.
"""

from __future__ import annotations

from typing import Mapping

from jax.sharding import PartitionSpec as P

TOKEN_AXES = ("data", "expert")

TOKENS_TD = P(TOKEN_AXES, None)          # flat tokens [T, D]
BATCH_BTD = P(TOKEN_AXES, None, None)    # activations [B, T, D]
BATCH_BT = P(TOKEN_AXES, None)           # token ids [B, T]
REPLICATED = P()

EXPERT_SPECS = {
    "w_gate_EDF": P("expert", None, "tensor"),
    "w_up_EDF": P("expert", None, "tensor"),
    "w_down_EFD": P("expert", "tensor", None),
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
