"""The GPU check: what only a GPU can show, in one run of at most ~8 minutes.

    python bench/gpu.py --json bench/results/gpu.json    # on one H100 / H200
    python bench/gpu.py --dry                            # CPU: tiny shapes, Pallas interpret mode

GPUs are lent to this project now and then, for minutes: this script is the
whole check, prepared in advance, and `tests/test_gpu_bench.py` runs `--dry`
so it still runs the day one is available. It prints one table and writes
everything as JSON. Sections (`--only` picks some):

  kernels  Pallas `gmm` and `tgmm` against a float32 per-group reference
           (max error / max |reference|, checked against a tolerance), and
           their TFLOP/s next to a dense matmul of the same FLOPs (cuBLAS on
           GPU: the limit), the XLA backend and `lax.ragged_dot`; bf16 and
           fp32, balanced and skewed (Zipf) group sizes, on the expert shapes
           of configs/gpt_moe.py's `small` and `mixtral_8x7b` variants.
  layer    the MoE layer's forward+backward (`jax.vjp`, random cotangent)
           against the dense limit (one expert-sized FFN on T*K tokens), for
           the dropless path on Pallas and on XLA and the capacity path; the
           Pallas layer's outputs and gradients are checked against the XLA one.
  train    the `small` variant's train step: compile time and XLA's memory
           analysis, tokens/s, MFU against the bf16 dense matmul rate measured
           in `kernels` (the measured peak, not a datasheet), peak device
           memory, and the HLO overlap report (async all-to-all pairs; there
           are none on one device with mesh.expert=1: pass --expert N on N GPUs).

Timings: each timed call runs the op `inner` times back to back (GPU launches
are asynchronous, so short kernels are not measured as launch latency), the
variants of one case interleaved round by round (harness.sample_interleaved),
medians reported. `% limit` is the dense limit's median time over the row's.
Exit status 1 when any check fails (after the table and JSON are written).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import harness  # first: puts this checkout's jmoe ahead of an installed one

from jmoe.runtime import xla_flags  # noqa: E402

# Before the first computation: on GPU the latency-hiding scheduler flags the
# trainer uses (so the overlap report shows what a training run would get);
# on CPU the workarounds the expert-parallel layer needs.
xla_flags.configure_gpu_overlap()
harness.setup()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import gmm as gmm_bench  # noqa: E402  (bench/gmm.py: the group-size cases)
import jmoe  # noqa: E402
from jmoe import experts, kernels, model_config  # noqa: E402
from jmoe.config import GATED_ACTIVATIONS  # noqa: E402
from jmoe.train import cli, compile_report  # noqa: E402

CONFIG_FILE = os.path.join(harness.ROOT, "configs", "gpt_moe.py")
VARIANTS = ("small", "mixtral_8x7b")
# Max |out - ref| / max |ref| allowed. fp32 Pallas dots run at HIGHEST
# precision (no TF32): accumulation-order noise only. bf16 outputs are
# rounded to 8 bits of mantissa (2^-9 relative), inputs are identical.
TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-2}
# Rows per device of each variant's grouped matmuls (tokens x top_k): the
# small variant's 64 x 1024 batch on one GPU is 65536 tokens; mixtral's 4096
# tokens per GPU of an 8-GPU expert-parallel node.
ROWS = {"small": 32768, "mixtral_8x7b": 8192}
LAYER_TOKENS = {"small": 16384, "mixtral_8x7b": 4096}


def expert_shape(variant: str, dry: bool) -> dict:
    """{"D", "F", "E", "K", "act", "align"} of a config variant's experts (tiny when dry)."""
    m = cli.load_config(CONFIG_FILE, variant).model
    if dry:  # same structure (E, K, activation), toy widths
        return dict(D=32 if variant == "small" else 64, F=64 if variant == "small" else 128,
                    E=min(m.num_experts, 4), K=m.top_k, act=m.activation, align=8)
    return dict(D=m.d_model, F=m.d_ff, E=m.num_experts, K=m.top_k, act=m.activation,
                align=m.group_align)


def on_gpu() -> bool:
    return jax.default_backend() in ("gpu", "cuda", "rocm")


def repeat(fn, inner: int):
    """`fn` run `inner` times per call (asynchronous launches back to back)."""
    if inner == 1:
        return fn
    return lambda *args: [fn(*args) for _ in range(inner)]


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(out - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def tree_rel_err(out, ref) -> float:
    return max(rel_err(o, r) for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))


def _row(section, case, variant, dtype, median_s=None, flops=None, limit_s=None, err=None,
         tol=None, **extra) -> dict:
    r = {"section": section, "case": case, "variant": variant, "dtype": dtype,
         "median_s": median_s, "tflops": None, "fraction_of_limit": None,
         "max_rel_err": err, "tolerance": tol, "ok": None if err is None else bool(err <= tol)}
    if median_s:
        if flops:
            r["tflops"] = flops / median_s / 1e12
        if limit_s:
            r["fraction_of_limit"] = limit_s / median_s
    r.update(extra)
    return r


# ---------------------------------------------------------------- kernels --

def _reference(x_MK, w_GKN, dy_MN, sizes):
    """float32 per-group loops at HIGHEST precision: gmm's and tgmm's outputs."""
    hi = jax.lax.Precision.HIGHEST
    x, w, dy = (a.astype(jnp.float32) for a in (x_MK, w_GKN, dy_MN))
    outs, grads, start = [], [], 0
    for g, s in enumerate(sizes):
        outs.append(jnp.dot(x[start:start + s], w[g], precision=hi))
        grads.append(jnp.dot(x[start:start + s].T, dy[start:start + s], precision=hi))
        start += s
    return jnp.concatenate(outs, axis=0), jnp.stack(grads)


def kernel_rows(a, dtypes) -> list:
    rows = []
    backends = ["pallas", "xla"]
    for variant in VARIANTS:
        s = expert_shape(variant, a.dry)
        m = 256 if a.dry else ROWS[variant]
        k, n, g = s["D"], s["F"], s["E"]
        flops = 2.0 * m * k * n
        inner = 1 if a.dry else max(1, int(2e12 // flops))  # ~ >= 1 ms of work per call
        for dt_name in dtypes:
            dt = jnp.dtype(dt_name)
            rng = np.random.default_rng(0)
            x = jnp.asarray(rng.standard_normal((m, k)), dt)
            w = jnp.asarray(rng.standard_normal((g, k, n)) / np.sqrt(k), dt)
            dy = jnp.asarray(rng.standard_normal((m, n)), dt)
            w_KN = w[0]
            cases = {"balanced": gmm_bench.balanced_sizes(m, g),
                     "skewed": gmm_bench.skewed_sizes(m, g, align=s["align"])}
            fns = {"dense x@w (limit)": (jax.jit(lambda x, w, dy, gs: x @ w_KN.astype(x.dtype)),
                                         "gmm"),
                   "dense x.T@dy (limit)": (jax.jit(lambda x, w, dy, gs: x.T @ dy), "tgmm")}
            for b in backends:
                fns[f"gmm[{b}]"] = (jax.jit(
                    lambda x, w, dy, gs, b=b: kernels.gmm(x, w, gs, backend=b)), "gmm")
                fns[f"tgmm[{b}]"] = (jax.jit(
                    lambda x, w, dy, gs, b=b: kernels.tgmm(x, dy, gs, backend=b)), "tgmm")
            fns["ragged_dot"] = (jax.jit(lambda x, w, dy, gs: jax.lax.ragged_dot(x, w, gs)), "gmm")
            for case, sizes in cases.items():
                gs = jnp.asarray(sizes)
                ref_out, ref_grad = jax.jit(_reference, static_argnums=3)(x, w, dy, tuple(int(v) for v in sizes))
                timed = {name: (repeat(f, inner), (x, w, dy, gs)) for name, (f, _) in fns.items()}
                samples = harness.sample_interleaved(timed, a.repeats, log=None)
                med = {name: float(np.median(v["wall"])) / inner for name, v in samples.items()}
                label = f"{variant} M={m} K={k} N={n} G={g} {case}"
                for name, (f, op) in fns.items():
                    err = tol = None
                    if name.startswith(("gmm[", "tgmm[", "ragged_dot")):
                        out = f(x, w, dy, gs)
                        err = rel_err(out, ref_out if op == "gmm" else ref_grad)
                        tol = TOLERANCE[dt_name]
                    limit = med["dense x@w (limit)" if op == "gmm" else "dense x.T@dy (limit)"]
                    rows.append(_row("kernels", label, name, dt_name, med[name], flops, limit,
                                     err, tol, group_sizes=sizes.tolist()))
                print(f"  kernels: {label} {dt_name} done", flush=True)
    return rows


# ------------------------------------------------------------------ layer --

def layer_rows(a) -> list:
    rows = []
    dt = "bfloat16" if on_gpu() else "float32"
    for variant in VARIANTS:
        s = expert_shape(variant, a.dry)
        t = 128 if a.dry else LAYER_TOKENS[variant]
        base = jmoe.MoEConfig(d_model=s["D"], d_ff=s["F"], num_experts=s["E"], top_k=s["K"],
                              activation=s["act"], group_align=s["align"], dtype=dt,
                              param_dtype=dt)
        params = jmoe.init_params(jax.random.key(0), base)
        x = jax.random.normal(jax.random.key(1), (t, s["D"]), dt)
        ct = jax.random.normal(jax.random.key(2), (t, s["D"]), dt)
        # The limit: one expert-sized FFN (expert 0's weights) on T*K rows.
        w0 = {name.replace("_E", "_"): v[0] for name, v in params["experts"].items()}
        x_dense = jnp.tile(x, (s["K"], 1))
        ct_dense = jnp.tile(ct, (s["K"], 1))

        def dense(x_TD, w):
            return experts.dense_mlp(x_TD, w, s["act"])

        def layer(cfg):
            return lambda x_TD, p: jmoe.moe_apply(p, x_TD, cfg)[0]

        mats = 3 if s["act"] in GATED_ACTIVATIONS else 2
        flops = 3 * 2.0 * t * s["K"] * s["D"] * s["F"] * mats  # fwd + 2x bwd, active experts
        variants = {
            "dense FFN on T*K (limit)": (harness.fwd_bwd(dense), (ct_dense, x_dense, w0)),
            "dropless[pallas]": (harness.fwd_bwd(layer(base.with_execution(gmm_backend="pallas"))),
                                 (ct, x, params)),
            "dropless[xla]": (harness.fwd_bwd(layer(base.with_execution(gmm_backend="xla"))),
                              (ct, x, params)),
            "capacity cf=1.25": (harness.fwd_bwd(layer(base.replace(dispatch="capacity"))),
                                 (ct, x, params)),
        }
        inner = 1 if a.dry else max(1, int(5e12 // flops))
        timed = {name: (repeat(f, inner), args) for name, (f, args) in variants.items()}
        samples = harness.sample_interleaved(timed, a.repeats, log=None)
        med = {name: float(np.median(v["wall"])) / inner for name, v in samples.items()}
        # The Pallas layer against the XLA one: outputs and gradients.
        f_p, args = variants["dropless[pallas]"]
        f_x, _ = variants["dropless[xla]"]
        err = tree_rel_err(f_p(*args), f_x(*args))
        label = f"{variant} T={t} D={s['D']} F={s['F']} E={s['E']} K={s['K']} {s['act']}"
        limit = med["dense FFN on T*K (limit)"]
        for name in variants:
            e, tol = (err, TOLERANCE[dt]) if name == "dropless[pallas]" else (None, None)
            rows.append(_row("layer fwd+bwd", label, name, dt, med[name], flops, limit, e, tol))
        print(f"  layer: {label} done", flush=True)
    return rows


# ------------------------------------------------------------------ train --

def train_rows(a, peak_flops: float | None) -> tuple[list, dict]:
    from jmoe.train import bench as train_bench, metrics as metrics_lib
    from jmoe.runtime.xla_flags import overlap_report

    config = cli.load_config(CONFIG_FILE, "small")
    if a.dry:
        config.model.update(d_model=32, num_layers=2, num_heads=2, num_experts=4, d_ff=32,
                            group_align=8, dtype="float32")
        config.data.seq_len = 32
        config.batch_size = 4 * jax.device_count()
    config.mesh.update(data=-1, expert=a.expert)
    config.total_steps = max(config.total_steps, 100)
    gpt = model_config.from_config(config.model, config.execution)
    mesh, train_fn, state, batch, tokens = train_bench.build(copy.deepcopy(config))
    with jax.set_mesh(mesh):
        compiled, report = compile_report.compile_step(train_fn, state, batch)
        hlo = overlap_report(compiled.as_text())
        for _ in range(2):  # warm-up; the first call reuses the compilation above
            state, m = train_fn(state, batch)
        jax.block_until_ready((state, m))
        times = []
        for _ in range(a.train_steps):
            t0 = time.perf_counter()
            state, m = train_fn(state, batch)
            jax.block_until_ready((state, m))
            times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    flops = model_config.flops_per_token(gpt, config.data.seq_len) * tokens
    if peak_flops is None:
        peak_flops = metrics_lib.measure_peak_flops(gpt.dtype)
    peak_flops *= jax.device_count()
    stats = jax.devices()[0].memory_stats() or {}
    info = {"compile": report.as_dict(), "overlap": hlo, "step_s": step_s,
            "tokens_per_step": tokens, "tokens_per_s": tokens / step_s,
            "mfu": flops / step_s / peak_flops, "peak_flops_per_device": peak_flops
            / jax.device_count(), "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
            "mesh": dict(mesh.shape), "loss": float(m["loss"])}
    label = (f"small L={gpt.num_layers} D={gpt.d_model} B={config.batch_size} "
             f"T={config.data.seq_len} mesh={dict(mesh.shape)}")
    finite = bool(np.isfinite(info["loss"]))
    rows = [_row("train step", label, "step", gpt.dtype, step_s, flops / jax.device_count(),
                 None, tokens_per_s=info["tokens_per_s"], mfu=info["mfu"],
                 compile_s=report.compile_s, xla_peak_bytes=report.peak_bytes,
                 peak_bytes_in_use=info["peak_bytes_in_use"],
                 overlap=hlo, loss=info["loss"])]
    rows[0]["ok"] = finite  # a non-finite loss fails the check
    return rows, info


# ------------------------------------------------------------------ table --

def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def print_table(rows) -> None:
    def notes(r):
        parts = []
        if r.get("group_sizes") is not None and r["variant"].startswith("dense x@w"):
            parts.append(f"sizes {r['group_sizes']}")
        if "tokens_per_s" in r:
            gib = lambda b: "n/a" if b is None else f"{b / 2**30:.2f} GiB"
            o = r["overlap"]
            parts.append(f"{r['tokens_per_s']:,.0f} tok/s, MFU {100 * r['mfu']:.1f}%, compile "
                         f"{r['compile_s']:.1f} s, peak mem {gib(r['peak_bytes_in_use'])} "
                         f"(XLA {gib(r['xla_peak_bytes'])}), a2a sync {o['all_to_all']} / async "
                         f"{o['async_pairs']} ({o['compute_between']} overlapped), "
                         f"loss {r['loss']:.3f}")
        return "; ".join(parts)

    harness.print_markdown(
        ["section", "case", "variant", "dtype", "median ms", "TFLOP/s", "% limit", "max err",
         "check", "notes"],
        [[r["section"], r["case"], r["variant"], r["dtype"],
          _fmt(None if r["median_s"] is None else r["median_s"] * 1e3, ".3f"),
          _fmt(r["tflops"], ".1f"),
          _fmt(None if r["fraction_of_limit"] is None else 100 * r["fraction_of_limit"], ".0f"),
          _fmt(r["max_rel_err"], ".1e"),
          "" if r["ok"] is None else ("ok" if r["ok"] else "FAIL"), notes(r)] for r in rows])


def main(argv=None) -> int:
    p = harness.parser(__doc__, repeats=5)
    p.add_argument("--dry", action="store_true",
                   help="tiny shapes, Pallas in interpret mode: checks the script runs (CPU)")
    p.add_argument("--only", default="kernels,layer,train",
                   help="comma list of sections: kernels, layer, train")
    p.add_argument("--dtypes", default="bfloat16,float32", help="kernel dtypes")
    p.add_argument("--expert", type=int, default=1,
                   help="train step: mesh.expert (N GPUs: N shows the all-to-all overlap)")
    p.add_argument("--train_steps", type=int, default=10, help="timed train steps")
    a = p.parse_args(argv)
    if a.dry:
        a.repeats, a.train_steps = min(a.repeats, 2), min(a.train_steps, 2)
    sections = a.only.split(",")
    unknown = set(sections) - {"kernels", "layer", "train"}
    if unknown:
        p.error(f"--only: unknown sections {sorted(unknown)}; choose from kernels, layer, train")
    if not on_gpu() and not a.dry:
        print("no GPU found: the full check is meant for one; running it anyway "
              "(use --dry for the quick CPU run)", flush=True)
    t_start = time.perf_counter()
    print(harness.describe(platform=jax.default_backend(), device=jax.devices()[0].device_kind,
                           devices=jax.device_count(), dry=a.dry, repeats=a.repeats), flush=True)
    rows, train_info = [], None
    if "kernels" in sections:
        rows += kernel_rows(a, a.dtypes.split(","))
    if "layer" in sections:
        rows += layer_rows(a)
    if "train" in sections:
        dense = [r["tflops"] for r in rows if r["section"] == "kernels"
                 and r["variant"].startswith("dense") and r["dtype"] == "bfloat16"]
        peak = max(dense) * 1e12 if dense and on_gpu() else None
        train, train_info = train_rows(a, peak)
        rows += train
    print_table(rows)
    failed = [r for r in rows if r["ok"] is False]
    wall = time.perf_counter() - t_start
    print(f"\n{len(rows)} rows, {len(failed)} failed checks, {wall:.0f} s", flush=True)
    harness.write_json(a.json, {**harness.machine_info(), "dry": a.dry, "repeats": a.repeats,
                                "wall_s": wall, "tolerance": TOLERANCE, "rows": rows,
                                "train": train_info})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
