"""Logical axis names of the layer's weights, for Flax's partitioning tools.

The Linen and NNX modules annotate every weight with these names
(`nn.with_logical_partitioning`, `nnx.with_partitioning`), so
`nn.get_partition_spec` / `nnx.get_partition_spec` and
`nn.logical_to_mesh_sharding(specs, mesh, rules)` place them like any Flax
layer's weights. The names follow the Flax examples' conventions, so a host
model's own rules apply to jmoe's weights too (an FSDP rule
`("embed", "data")` shards D):

  expert -> the `expert` mesh axis (E of the routed experts)
  mlp    -> the `tensor` mesh axis (F: expert tensor parallelism)
  embed  -> replicated by default (D)

The router's E is unnamed (None): every device routes every token to all E
experts, so it is never split. `axis_rules(mesh)` resolves the defaults to
exactly `jmoe.sharding.specs.EXPERT_SPECS` for the routed experts.
"""

from __future__ import annotations

from typing import Optional, Sequence

AXIS_RULES = (("expert", "expert"), ("mlp", "tensor"), ("embed", None))

LOGICAL_AXES = {
    # router
    "w_DE": ("embed", None),
    # routed experts [E, ...]
    "w_gate_EDF": ("expert", "embed", "mlp"),
    "w_up_EDF": ("expert", "embed", "mlp"),
    "w_down_EFD": ("expert", "mlp", "embed"),
    # their biases (MoEConfig.expert_bias, GPT-OSS)
    "b_gate_EF": ("expert", "mlp"),
    "b_up_EF": ("expert", "mlp"),
    "b_down_ED": ("expert", "embed"),
    # shared experts: ordinary MLP weights
    "w_gate_DF": ("embed", "mlp"),
    "w_up_DF": ("embed", "mlp"),
    "w_down_FD": ("mlp", "embed"),
    "w_gate_D1": ("embed", None),
}


def axis_rules(mesh=None, rules: Sequence = AXIS_RULES) -> tuple:
    """`rules` with mesh axes that `mesh` lacks mapped to None (replicated).

    `nn.logical_to_mesh_sharding` refuses a rule naming an axis the mesh does
    not have (e.g. `tensor` on a (`data`, `expert`) mesh); this keeps a rule
    table valid for any mesh. `mesh=None` returns `rules` unchanged.
    """
    if mesh is None:
        return tuple(rules)
    names = set(mesh.axis_names)

    def keep(axes: Optional[str | tuple]):
        if axes is None:
            return None
        if isinstance(axes, str):
            return axes if axes in names else None
        kept = tuple(a for a in axes if a in names)
        return kept or None

    return tuple((logical, keep(axes)) for logical, axes in rules)
