"""Expert parallelism written out with `jax.shard_map` and explicit collectives.

Each device holds a shard of the tokens (over `data` x `expert`) and
`E / ep` experts. The layer's core (`jmoe.layer.moe_core`: route, plan,
permute, un-permute, combine) runs per shard with the exchange of
`jmoe.sharding.exchange` as its expert step; router statistics are summed
over all shards, so losses and loads equal the single-device layer's.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jmoe.config import MoEConfig
from jmoe.layer import expert_weights, moe_core
from jmoe.placement import PlacementArrays
from jmoe.sharding import specs
from jmoe.sharding.checks import check_layer_on_mesh
from jmoe.sharding.exchange import capacity_exchange, dropless_exchange
from jmoe.sharding.mesh import axis_size
from jmoe.sharding.schedule import after, chunk_bounds
from jmoe.sharding.shadow import shadow_regroup
from jmoe.stats import finalize

_OUR_AXES = ("data", "expert", "tensor")


def active_expert_mesh(mesh=None):
    """The mesh to run expert-parallel on, or None to run on one device.

    Uses `mesh`, else the mesh set by `jax.set_mesh`/`jax.sharding.use_mesh`.
    A mesh qualifies when its `data`/`expert`/`tensor` axes hold more than
    one device and none of them is already manual (inside a `shard_map`).
    """
    m = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    if m is None or not m.axis_names:
        return None
    ours = [a for a in m.axis_names if a in _OUR_AXES]
    if math.prod(axis_size(m, a) for a in ours) <= 1:
        return None
    manual = getattr(m, "manual_axes", ()) or ()
    if any(a in manual for a in ours):
        return None
    return m


def moe_apply_ep(params, x_TD: jax.Array, xr_TD: jax.Array, cfg: MoEConfig, mesh,
                 bias_E: Optional[jax.Array], placement: Optional[PlacementArrays] = None):
    """The MoE layer over `mesh`: [T, D] -> ([T, D], MoEAux); equals `jmoe.layer.local_moe`
    on one device (the capacity path computes C per token shard, like GShard's
    groups, so it matches when no shard overflows; with
    `capacity_scope='batch'` C counts over the batch, and it always matches).

    With a `placement`, device p runs the experts of its S slots and the
    exchange sends every row to its slot. The slots' weights are those of
    `jmoe.layer.expert_weights`: stored in slot order (`params["slots"]`,
    nothing moves) or gathered from logical order on every call (an
    all-gather of every expert, and an all-reduce of their gradients)."""
    check_layer_on_mesh(cfg, mesh, x_TD.shape[0], placement)
    names = mesh.axis_names
    ep = axis_size(mesh, "expert")
    # Axes of size 1 are left out of the specs: values are then invariant
    # over them, and shard_map's replication tracking needs no psum over
    # them. (XLA:CPU keeps collectives over size-1 groups: each one costs a
    # rendezvous of all devices and copies of its operands.)
    names = tuple(a for a in names if axis_size(mesh, a) > 1)
    tp = "tensor" in names
    tok = tuple(a for a in specs.TOKEN_AXES if a in names)
    tok_spec = P(tok, None) if tok else P()
    w_exp = expert_weights(params, placement)
    w_specs = {k: specs.restrict(specs.EXPERT_SPECS[k], names) for k in w_exp}
    if cfg.router_bias:
        bias_E = params["router"]["b_E"]  # topk_softmax's learned logit bias (GPT-OSS)
    elif bias_E is None:
        bias_E = jnp.zeros((cfg.num_experts,), jnp.float32)

    n_shards = math.prod(axis_size(mesh, a) for a in tok)

    def core(x, xr, w_DE, bias, w, placement):
        regroup = None
        if cfg.execution.shadow_experts and ep > 1:
            regroup = shadow_regroup(cfg, w, ep, tp, names, tok, placement)
        return moe_core(
            x, xr, w_DE, cfg, bias,
            # The packed capacity layout sends only the kept rows, through
            # the dropless exchange (None: capacity routing on packed rows).
            capacity_experts=(None if cfg.packed_capacity else
                              functools.partial(capacity_exchange, w=w, cfg=cfg, ep=ep, tp=tp)),
            dropless_experts=lambda buf, counts: dropless_exchange(
                buf, counts, w, cfg, ep, tp, names),
            # Rows are sorted per global expert before the exchange; the
            # receiving side pads to `group_align` when it regroups them.
            dropless_align=1, placement=placement, regroup=regroup,
            reduce_need=(lambda n: lax.pmax(n, tok)) if tok else None,
            token_shards=n_shards, rank_offsets=functools.partial(_batch_rank_offsets, tok=tok)
            if tok else None)

    def body(x, xr, w_DE, bias, w, placement):
        if cfg.dispatch == "dropless" and cfg.execution.overlap_chunks > 1:
            # Dropless chunks by token: routing is per token and nothing drops,
            # so each chunk's pipeline is independent and the sum is exact.
            parts = []
            for i, (a, b) in enumerate(chunk_bounds(x.shape[0], cfg.execution.overlap_chunks)):
                xa, xra = x[a:b], xr[a:b]
                if parts:
                    xa, xra = after((xa, xra), parts[-1][0])
                with jax.named_scope(f"chunk{i}"):
                    parts.append(core(xa, xra, w_DE, bias, w, placement))
            out = jnp.concatenate([p_[0] for p_ in parts], axis=0)
            sums = functools.reduce(operator.add, [p_[1] for p_ in parts])
        else:
            out, sums = core(x, xr, w_DE, bias, w, placement)
        if tok:
            sums = lax.psum(sums, tok)
        return out, finalize(sums, cfg.router == "expert_choice")

    # The placement enters as an argument (replicated), never by closure: a
    # closed-over array that already lives on the mesh cannot enter the
    # manual region.
    fn = jax.shard_map(body, mesh=mesh,
                       in_specs=(tok_spec, tok_spec, P(), P(), w_specs, P()),
                       out_specs=(tok_spec, P()))
    return fn(x_TD, xr_TD, params["router"]["w_DE"], bias_E, w_exp, placement)


def _batch_rank_offsets(count_KG: jax.Array, tok: tuple) -> jax.Array:
    """Rows of the other token shards that rank before this shard's, per
    top-k position k and group g, in the one-device position order (every
    top-k' < k choice of the batch, then the top-k choices of earlier
    shards): int32 [K, G] -> [K, G]. Tokens are sharded over `tok` in
    order, so shard i holds the i-th block of the batch."""
    all_NKG = lax.all_gather(count_KG, tok)
    me = lax.axis_index(tok)
    earlier_N = (jnp.arange(all_NKG.shape[0]) < me)[:, None, None]
    before_KG = jnp.sum(jnp.where(earlier_N, all_NKG, 0), axis=0)
    others_KG = jnp.sum(all_NKG, axis=0) - count_KG
    # Exclusive over k: the other shards' top-k' choices for every k' < k.
    return before_KG + jnp.cumsum(others_KG, axis=0) - others_KG
