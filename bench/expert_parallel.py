"""Expert parallelism on 8 (virtual CPU) devices: jmoe's explicit all-to-all
against the compiler-inferred (GSPMD) version and one device.

    python bench/expert_parallel.py --json bench/results/expert_parallel.json

Rows (forward + backward via `jax.vjp` with a random cotangent):

  one_device        the layer without a mesh
  gspmd_capacity    flaxformer-style: tokens in groups [G, S, D], per-group
                    capacity dispatch [G, E, C, D], sharding constraints move
                    E onto the `expert` axis and GSPMD inserts the all-to-all
  jmoe_capacity     jmoe's shard_map capacity path (explicit all_to_all)
  jmoe_dropless     jmoe's shard_map dropless path (ragged exchange; on CPU
                    the padded dense emulation, since XLA:CPU has no ragged
                    all-to-all), with the default `ep_buckets`
  jmoe_dropless_worst_case  the same with `ep_buckets=()`: every exchange
                    sized for the worst case (all tokens to one device)

Then bytes each device sends per all-to-all, against the analytic minimum
T_local*K*D*bytes*(EP-1)/EP (uniform routing).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import harness
import jmoe
from jmoe import dispatch, experts, routing
from jmoe.sharding import make_mesh, moe_shardings

harness.setup(host_devices=8)  # before the first computation


def gspmd_capacity(cfg, mesh, groups):
    """Per-group capacity dispatch with GSPMD-inferred collectives."""
    tok = NamedSharding(mesh, P(("data", "expert")))
    by_expert = NamedSharding(mesh, P("data", "expert"))

    def f(x_TD, params):
        t, d = x_TD.shape
        x_GSD = jax.lax.with_sharding_constraint(x_TD.reshape(groups, t // groups, d), tok)
        c = cfg.capacity(t // groups)

        def route_and_pack(x_SD):
            r = routing.route(routing.router_logits(x_SD, params["router"]["w_DE"]), cfg)
            plan = dispatch.capacity_permutation(r.experts_TK, r.weights_TK, cfg.num_experts, c)
            buf = dispatch.permute(x_SD, plan.slot_TK, plan.src_R)
            return buf.reshape(cfg.num_experts, c, d), (r.weights_TK, plan)

        buf_GECD, (w_GSK, plan) = jax.vmap(route_and_pack)(x_GSD)
        # Groups live on (data, expert); moving E onto `expert` is the all-to-all.
        buf_GECD = jax.lax.with_sharding_constraint(buf_GECD, by_expert)
        y_GECD = jax.vmap(lambda b: experts.batched_mlp(b, params["experts"], cfg.activation),
                          in_axes=1, out_axes=1)(buf_GECD)
        y_GECD = jax.lax.with_sharding_constraint(y_GECD, tok)

        def unpack(y_ECD, w_SK, pl):
            return dispatch.unpermute(y_ECD.reshape(-1, d), w_SK, pl.slot_TK, pl.src_R)
        return jax.vmap(unpack)(y_GECD, w_GSK, plan).reshape(t, d)
    return f


def layer(cfg, mesh):
    return lambda x_TD, params: jmoe.moe_apply(params, x_TD, cfg, mesh=mesh)[0]


def exchange_bytes(cfg, params, x, shards, ep):
    """Per-device bytes per dispatch all-to-all, averaged over devices."""
    t_local = x.shape[0] // shards
    r = routing.route(routing.router_logits(x, params["router"]["w_DE"]), cfg)
    experts_TK = np.asarray(r.experts_TK)
    e_local = cfg.num_experts // ep
    item = x.dtype.itemsize * cfg.d_model
    ragged, busiest = [], 0
    for s in range(shards):
        me = s % ep  # position on the expert axis (tokens go data-major)
        dest = experts_TK[s * t_local:(s + 1) * t_local] // e_local
        ragged.append(int(np.sum(dest != me)) * item)
        busiest = max(busiest, int(np.bincount(dest.reshape(-1), minlength=ep).max()))
    a_local = t_local * cfg.top_k
    minimum = a_local * item * (ep - 1) / ep
    c_local = cfg.capacity(t_local)
    # The dense emulation moves ep equal slots: the smallest bucket that holds
    # the busiest (source, destination) pair, else one shard's assignments.
    slot = next((b for b in cfg.ep_bucket_slots(a_local, ep) if b >= busiest),
                a_local)
    return {
        "analytic_min_bytes": minimum,
        "dropless_ragged_bytes": float(np.mean(ragged)),
        "dropless_dense_emulation_bytes": ep * slot * item * (ep - 1) / ep,
        "dropless_dense_worst_case_bytes": ep * a_local * item * (ep - 1) / ep,
        "capacity_bytes": cfg.num_experts * c_local * item * (ep - 1) / ep,
    }


def main(argv=None):
    p = harness.parser(__doc__, repeats=5, quick=dict(tokens=512, d_model=32, d_ff=64, repeats=2))
    harness.add_layer_flags(p, d_model=256, d_ff=1024)
    p.add_argument("--data", type=int, default=1)
    p.add_argument("--expert", type=int, default=8)
    a = p.parse_args(argv)
    mesh = make_mesh(data=a.data, expert=a.expert)
    shards = a.data * a.expert
    base = harness.layer_config(a)
    cap, drop = base.replace(dispatch="capacity"), base.replace(dispatch="dropless")
    params = jmoe.init_params(jax.random.key(0), base)
    sharded = jax.device_put(params, moe_shardings(base, mesh))
    tok = NamedSharding(mesh, P(("data", "expert"), None))
    x = jax.device_put(jax.random.normal(jax.random.key(1), (a.tokens, a.d_model)), tok)
    ct = jax.device_put(jax.random.normal(jax.random.key(2), x.shape), tok)
    x1, ct1 = jax.device_put(x, jax.devices()[0]), jax.device_put(ct, jax.devices()[0])
    p1 = jax.device_put(params, jax.devices()[0])
    fwd_bwd = harness.fwd_bwd
    rows = {
        "one_device": (fwd_bwd(layer(drop, None)), (ct1, x1, p1)),
        "gspmd_capacity": (fwd_bwd(gspmd_capacity(cap, mesh, shards)), (ct, x, sharded)),
        "jmoe_capacity": (fwd_bwd(layer(cap, mesh)), (ct, x, sharded)),
        "jmoe_dropless": (fwd_bwd(layer(drop, mesh)), (ct, x, sharded)),
        "jmoe_dropless_worst_case": (fwd_bwd(layer(drop.with_execution(ep_buckets=()), mesh)),
                                     (ct, x, sharded)),
    }
    shape = {**harness.layer_shape(a), "data": a.data, "expert": a.expert}
    print(f"platform={jax.default_backend()} mesh data={a.data} expert={a.expert} "
          + harness.describe(**harness.layer_shape(a)), flush=True)
    out_rows = harness.compare(rows, a.repeats, reference="gspmd_capacity")
    b = exchange_bytes(base, params, np.asarray(x), shards, a.expert)
    harness.print_markdown(
        ["bytes per device per all-to-all", "bytes", "ratio to analytic minimum"],
        [[k, f"{v:,.0f}", f"{v / b['analytic_min_bytes']:.2f}x"] for k, v in b.items()])
    result = {**harness.machine_info(), "shape": shape, "rows": out_rows, "bytes": b}
    harness.write_json(a.json, result)
    return result


if __name__ == "__main__":
    main()
