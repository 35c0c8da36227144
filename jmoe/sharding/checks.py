"""Checks of a layer against a mesh, before anything compiles.

Each rule is written here once; the layer, sharded initialisation, mesh
construction and the trainer all call these, so the message is the same
wherever a mistake is caught (the trainer re-labels the field with
`FieldError.under`).
"""

from __future__ import annotations

from typing import Optional

import jax

from jmoe.config import GPU_PLATFORMS, FieldError, MoEConfig, resolve_gmm_backend
from jmoe.placement import PlacementArrays
from jmoe.sharding.mesh import axis_size


def check_experts_divide(num_experts: int, ep: int) -> None:
    """Experts must split evenly over the expert axis."""
    if num_experts % ep:
        raise FieldError(
            "MoEConfig", "num_experts", num_experts,
            f"it does not divide over the mesh's expert axis of size {ep}: choose an expert "
            f"axis size that divides {num_experts}, or change num_experts.")


def check_layer_on_mesh(cfg: MoEConfig, mesh, num_tokens: Optional[int] = None,
                        placement: Optional[PlacementArrays] = None) -> None:
    """Raises ValueError for a layer (and token count, placement) the mesh cannot run."""
    ep, tp = axis_size(mesh, "expert"), axis_size(mesh, "tensor")
    if placement is None:
        check_experts_divide(cfg.num_experts, ep)
    elif placement.slot_expert_PS.shape[0] != ep:
        raise ValueError(
            f"placement has {placement.slot_expert_PS.shape[0]} devices of slots but the mesh's "
            f"expert axis has {ep}: build the placement for ep={ep}.")
    shards = axis_size(mesh, "data") * ep
    if num_tokens is not None and num_tokens % shards:
        raise ValueError(
            f"{num_tokens} tokens do not split over data*expert={shards} devices: make "
            "batch*sequence (the token count) divisible by the data and expert axis sizes.")
    if cfg.d_ff % tp:
        raise FieldError("MoEConfig", "d_ff", cfg.d_ff,
                         f"it does not divide over the tensor axis of size {tp}: choose a "
                         "tensor axis size that divides d_ff.")
    if cfg.expert_bias and tp > 1:
        # The down projection's bias would be added on every tensor shard
        # before their partial sums are reduced.
        raise FieldError("MoEConfig", "expert_bias", True,
                         f"expert biases cannot run with a tensor axis of size {tp}: use "
                         "tensor=1 on the mesh (expert and data parallelism work).")
    h = cfg.execution.a2a_hierarchy
    if h > 1 and (ep % h or h >= ep):
        raise FieldError(
            "Execution", "a2a_hierarchy", h,
            f"it must divide the expert axis size {ep} and be smaller than it (devices per "
            "node group); use 0 for a flat all-to-all.")
    platform = jax.default_backend()
    if (resolve_gmm_backend(cfg.execution.gmm_backend, platform) == "pallas"
            and platform not in GPU_PLATFORMS):
        # Interpret mode evaluates the kernel body op by op, and JAX 0.10's
        # replication checks inside shard_map reject its index arithmetic.
        raise FieldError("Execution", "gmm_backend", cfg.execution.gmm_backend,
                         f"the Pallas kernel runs in interpret mode on {platform!r}, which "
                         "cannot run inside the expert-parallel shard_map: use 'xla' or "
                         "'auto' off GPU (the kernel's numerics are tested on one device).")
    if cfg.execution.ragged_impl == "native" and h > 1:
        raise FieldError("Execution", "ragged_impl", "native",
                         "it has no two-level form: set ragged_impl='dense' or 'auto', or "
                         "a2a_hierarchy=0.")
