"""Overlap degree: measured on 8 CPU devices, predicted on GPU profiles.

    python bench/overlap.py --json bench/results/overlap.json

Part 1 times the expert-parallel MoE layer (forward + backward via `jax.vjp`,
mesh data=1 x expert=8) for `overlap_chunks` n in {1, 2, 4}, both dispatch
modes, interleaved in one process. XLA:CPU runs collectives synchronously, so
no gain is expected here: chunking only adds per-chunk overhead, and the
table shows how much.

Part 2 is the cost model's prediction (`jmoe.planner.layer_cost.moe_layer_cost`) of
one Mixtral-shaped MoE layer (bf16, D=4096, F=14336, E=8, K=2, 8192 tokens
per GPU, expert-parallel over the 8 GPUs of one node) for n in {1, 2, 4, 8}
on the GPU hardware profiles, where async collectives can hide the
all-to-all behind expert compute.
"""

from __future__ import annotations

import argparse

import harness  # first: puts this checkout ahead of an installed jmoe

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

harness.setup(host_devices=8, platforms="cpu")
import jmoe  # noqa: E402
from jmoe.planner import hardware, layer_cost  # noqa: E402
from jmoe.sharding import make_mesh, moe_shardings  # noqa: E402


def measure(a) -> list:
    mesh = make_mesh(data=1, expert=8)
    base = jmoe.MoEConfig(d_model=a.d_model, d_ff=a.d_ff, num_experts=8, top_k=2,
                          activation="gelu", capacity_factor=1.25)
    params = jax.device_put(jmoe.init_params(jax.random.key(0), base), moe_shardings(base, mesh))
    tok = NamedSharding(mesh, P(("data", "expert"), None))
    x = jax.device_put(jax.random.normal(jax.random.key(1), (a.tokens, a.d_model)), tok)
    ct = jax.device_put(jax.random.normal(jax.random.key(2), x.shape), tok)
    rows = {}
    for dispatch in ("capacity", "dropless"):
        for n in (1, 2, 4):
            cfg = base.replace(dispatch=dispatch).with_execution(overlap_chunks=n)

            @jax.jit
            def run(ct, x, p, cfg=cfg):
                y, vjp = jax.vjp(lambda x, p: jmoe.moe_apply(p, x, cfg, mesh=mesh)[0], x, p)
                return y, vjp(ct)
            rows[f"{dispatch}_n{n}"] = (run, (ct, x, params))
    med = harness.time_interleaved(rows, a.repeats, log=lambda m: print(m, flush=True))
    out = []
    for name, t in med.items():
        ref = med[name.rsplit("_", 1)[0] + "_n1"]
        out.append({"name": name, "median_s": t, "ratio": t / ref})
    print("\n| measured on 8 CPU devices | median fwd+bwd (s) | ratio to n=1 |\n|---|---|---|")
    for r in out:
        print(f"| {r['name']} | {r['median_s']:.4f} | {r['ratio']:.2f}x |")
    return out


def predict() -> list:
    moe = jmoe.MoEConfig(d_model=4096, d_ff=14336, num_experts=8, top_k=2, dispatch="dropless",
                         dtype="bfloat16", param_dtype="bfloat16")
    out = []
    for hw_name in ("a30", "a100", "h100", "h200"):
        hw = hardware.get(hw_name)
        base = None
        for n in (1, 2, 4, 8):
            lc = layer_cost.moe_layer_cost(moe.with_execution(overlap_chunks=n), 8192, 8, hw)
            base = base or lc.time
            out.append({"hardware": hw_name, "overlap_chunks": n, "predicted_ms": lc.time * 1e3,
                        "a2a_ms": lc.a2a * 1e3, "hidden_ms": lc.hidden * 1e3,
                        "ratio": lc.time / base})
    print("\n| GPU profile (predicted) | n | layer fwd+bwd (ms) | all-to-all (ms) | hidden (ms) "
          "| ratio to n=1 |\n|---|---|---|---|---|---|")
    for r in out:
        print(f"| {r['hardware']} | {r['overlap_chunks']} | {r['predicted_ms']:.2f} | "
              f"{r['a2a_ms']:.2f} | {r['hidden_ms']:.2f} | {r['ratio']:.2f}x |")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    # Small widths: on CPU every chunk size is overhead-bound anyway (larger
    # ones need the YNNPACK workaround flag that harness.py applies).
    p.add_argument("--d_model", type=int, default=64)
    p.add_argument("--d_ff", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats (smoke test)")
    p.add_argument("--json", type=str, default=None)
    a = p.parse_args(argv)
    if a.quick:
        a.tokens, a.d_model, a.d_ff, a.repeats = 512, 32, 64, 2
    print(f"platform={jax.default_backend()} devices={jax.device_count()} T={a.tokens} "
          f"D={a.d_model} F={a.d_ff} E=8 K=2", flush=True)
    result = {"platform": jax.default_backend(), "jax": jax.__version__,
              "shape": {"T": a.tokens, "D": a.d_model, "F": a.d_ff, "E": 8, "K": 2},
              "rows": measure(a), "predicted_gpu": predict()}
    harness.write_json(a.json, result)
    return result


if __name__ == "__main__":
    main()
