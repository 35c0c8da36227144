"""Grouped-matmul benchmark: jmoe.kernels.gmm against the dense limit and peers.

    python bench/gmm.py --json bench/results/gmm.json     # full (CPU: ~2 min)
    python bench/gmm.py --quick                           # smoke run
    python bench/gmm.py --cases unaligned --skip-ragged   # groups not padded

Shape (full run): M=8192 rows, K=512, N=2048, G=8 groups, fp32, two group-size
cases: balanced (M/G rows each) and skewed (Zipf-like, each group a multiple of
128 rows as the MoE layer pads them). For each case it times, forward and
forward+backward:

  dense (limit)    one [M, K] x [K, N] matmul: the same FLOPs with no grouping
  gmm[<backend>]   jmoe.kernels.gmm ('xla' everywhere, plus 'pallas' on GPU)
  ragged_dot       jax.lax.ragged_dot (MaxText's GPU path)
  per-group loop   G static slices, one jnp.dot each (sizes known at trace
                   time: a compile-per-routing oracle, not usable in a layer)

All in one process, repeats interleaved across variants (the machine is
shared and noisy), medians reported as ratios to the dense limit of the
same direction ("x limit": median over rounds of wall time / the limit's
wall time in the same round; "cpu x": the same in process CPU time, steadier when other
jobs share the cores). Backward is `jax.vjp` applied to a fixed random cotangent with every
weight a jit argument (closed-over weights become constants and XLA folds
part of the dense backward, which flatters the baseline).

On GPU the table also shows TFLOP/s and the fraction of the measured dense
matmul rate.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import harness
from jmoe import kernels


def balanced_sizes(m: int, g: int) -> np.ndarray:
    return np.full((g,), m // g, np.int32)


def skewed_sizes(m: int, g: int, align: int = 128, s: float = 1.2) -> np.ndarray:
    """Zipf-like sizes p_g ~ 1/(g+1)^s, each a multiple of `align`, summing to m."""
    p = 1.0 / np.arange(1, g + 1) ** s
    sizes = np.floor(p / p.sum() * m / align).astype(np.int64) * align
    sizes[0] += m - sizes.sum()
    return sizes.astype(np.int32)


def make_variants(sizes: np.ndarray, backends: list[str]) -> dict[str, Callable]:
    """name -> f(x_MI, w_GIN, gs_G) -> y_MN."""
    static_sizes = [int(s) for s in sizes]

    def dense(x, w, gs):
        del gs
        return x @ w[0]

    def per_group(x, w, gs):
        del gs
        outs, start = [], 0
        for g, size in enumerate(static_sizes):
            outs.append(x[start:start + size] @ w[g])
            start += size
        return jnp.concatenate(outs, axis=0)

    def ragged(x, w, gs):
        return jax.lax.ragged_dot(x, w, gs)

    variants = {"dense (limit)": dense}
    for b in backends:
        variants[f"gmm[{b}]"] = (
            lambda x, w, gs, b=b: kernels.gmm(x, w, gs, backend=b))
    variants["ragged_dot"] = ragged
    variants["per-group loop"] = per_group
    return variants


def main() -> None:
    ap = harness.parser(__doc__, repeats=7, quick=dict(repeats=3))
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="default: float32 on CPU, bfloat16 on GPU (where "
                    "fp32 Pallas dots run at full IEEE precision, no TF32)")
    ap.add_argument("--shape", default=None, metavar="M,K,N,G",
                    help="override the problem size, e.g. 32768,4096,14336,8")
    ap.add_argument("--cases", default="balanced,skewed",
                    help="comma list of balanced, skewed (Zipf, groups padded "
                    "to 128 rows), unaligned (Zipf, no padding)")
    ap.add_argument("--skip-ragged", action="store_true",
                    help="leave out lax.ragged_dot (slow on CPU)")
    a = ap.parse_args()

    if a.quick:
        m, k, n, g = 1024, 128, 256, 4
    else:
        m, k, n, g = 8192, 512, 2048, 8
    if a.shape:
        m, k, n, g = (int(v) for v in a.shape.split(","))
    on_gpu = jax.default_backend() in ("gpu", "cuda", "rocm")
    backends = ["xla", "pallas"] if on_gpu else ["xla"]
    dtype = jnp.dtype(a.dtype or ("bfloat16" if on_gpu else "float32"))

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((g, k, n)) / np.sqrt(k), dtype)
    dy = jnp.asarray(rng.standard_normal((m, n)), dtype)
    flops_fwd = 2.0 * m * k * n

    all_cases = {"balanced": balanced_sizes(m, g), "skewed": skewed_sizes(m, g),
                 "unaligned": skewed_sizes(m, g, align=1)}
    cases = {c: all_cases[c] for c in a.cases.split(",")}
    rows, lines = [], []
    header = (f"{'case':9} {'pass':8} {'variant':16} {'median ms':>10} "
              f"{'x limit':>8} {'cpu x':>8}")
    if on_gpu:
        header += f" {'TFLOP/s':>8} {'% dense':>8}"
    for case, sizes in cases.items():
        gs = jnp.asarray(sizes)
        variants = make_variants(sizes, backends)
        if a.skip_ragged:
            variants.pop("ragged_dot")
        timed = {}
        for name, f in variants.items():
            timed[("fwd", name)] = (jax.jit(f), (x, w, gs))
            # Differentiates x and w; the group sizes stay an argument.
            timed[("fwd+bwd", name)] = (harness.fwd_bwd(f, diff_args=2), (dy, x, w, gs))
        samples = harness.sample_interleaved(timed, a.repeats, log=None)
        med = {key: float(np.median(s["wall"])) for key, s in samples.items()}
        for (pss, name), t in med.items():
            # Ratios to the dense limit of the same pass, round by round.
            ref = (pss, "dense (limit)")
            ratio = harness.paired_ratio(samples, (pss, name), ref)
            cpu_ratio = harness.paired_ratio(samples, (pss, name), ref, clock="cpu")
            flops = flops_fwd * (1 if pss == "fwd" else 3)
            row = {"name": f"{case}/{pss}/{name}", "case": case, "pass": pss,
                   "variant": name, "median_s": t, "ratio": ratio,
                   "cpu_time_ratio": cpu_ratio}
            line = (f"{case:9} {pss:8} {name:16} {t * 1e3:10.2f} {ratio:8.2f}"
                    f" {cpu_ratio:8.2f}")
            if on_gpu:
                limit = med[ref]
                row["tflops"] = flops / t / 1e12
                row["fraction_of_dense"] = limit / t
                line += f" {row['tflops']:8.1f} {100 * limit / t:7.0f}%"
            rows.append(row)
            lines.append(line)
        # The headline: how much faster than ragged_dot.
        for pss in ("fwd", "fwd+bwd"):
            if (pss, "ragged_dot") in med:
                sp = med[(pss, "ragged_dot")] / med[(pss, "gmm[xla]")]
                lines.append(f"{case:9} {pss:8} gmm[xla] is {sp:.1f}x faster "
                             "than ragged_dot")

    print(f"platform={jax.default_backend()} devices={jax.devices()[0].device_kind} "
          f"M={m} K={k} N={n} G={g} dtype={dtype.name} repeats={a.repeats}")
    for case, sizes in cases.items():
        print(f"  {case} group sizes: {sizes.tolist()}")
    print(header)
    for line in lines:
        print(line)

    harness.write_json(a.json, {
        **harness.machine_info(),
        "shape": {"M": m, "K": k, "N": n, "G": g, "dtype": dtype.name},
        "group_sizes": {c: s.tolist() for c, s in cases.items()},
        "repeats": a.repeats,
        "rows": rows,
    })


if __name__ == "__main__":
    main()
