"""bench/gpu.py keeps working between GPU days: its `--dry` mode runs here.

The GPU check is one prepared script (issue 17); GPUs come rarely, so the
suite runs its reduced CPU mode (tiny shapes, Pallas in interpret mode) and
reads what it wrote, and checks that its kernel checks can fail.
"""

import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")


@pytest.mark.slow  # ~45 s on the shared 2-core CPU: every section compiles
def test_gpu_bench_dry_runs_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               # Two devices and --expert 2: the train step's all-to-alls
               # exist, so the overlap report has something to count.
               XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "gpu.py"), "--dry", "--expert",
                           "2", "--json", str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| section | case | variant |" in proc.stdout  # the one table
    result = json.loads(out.read_text())
    assert result["dry"] and result["platform"] == "cpu"
    rows = result["rows"]

    # Kernels: every variant x dtype x case x implementation, with a checked error.
    kern = [r for r in rows if r["section"] == "kernels"]
    seen = {(r["case"].split()[0], r["case"].split()[-1], r["dtype"], r["variant"]) for r in kern}
    impls = ["dense x@w (limit)", "dense x.T@dy (limit)", "gmm[pallas]", "tgmm[pallas]",
             "gmm[xla]", "tgmm[xla]", "ragged_dot"]
    assert seen == {(v, c, d, i) for v in ("small", "mixtral_8x7b") for c in ("balanced", "skewed")
                    for d in ("bfloat16", "float32") for i in impls}
    for r in kern:
        if r["variant"].startswith("dense"):
            assert r["fraction_of_limit"] == pytest.approx(1.0) and r["ok"] is None
        else:
            assert r["ok"] and 0 <= r["max_rel_err"] <= r["tolerance"], r
            assert r["median_s"] > 0 and r["tflops"] > 0
    skewed = [r["group_sizes"] for r in kern if r["case"].endswith("skewed")]
    assert all(len(set(s)) > 1 for s in skewed)  # the skewed case is skewed

    # The layer: the limit and three paths per variant; Pallas checked against XLA.
    layer = [r for r in rows if r["section"] == "layer fwd+bwd"]
    assert len(layer) == 8
    pallas = [r for r in layer if r["variant"] == "dropless[pallas]"]
    assert len(pallas) == 2 and all(r["ok"] for r in pallas)

    # The train step: compiled once, memory analysed, all-to-alls counted.
    train = result["train"]
    assert train["mesh"]["expert"] == 2
    assert train["compile"]["compile_s"] > 0 and train["compile"]["temp_bytes"] > 0
    assert train["compile"]["argument_bytes"] > 0
    # XLA:CPU runs collectives synchronously: they show as sync all-to-alls.
    assert train["overlap"]["all_to_all"] + train["overlap"]["async_pairs"] > 0
    assert np.isfinite(train["loss"]) and train["tokens_per_s"] > 0 and 0 < train["mfu"] < 1


def test_gpu_bench_kernel_check_fails_on_a_wrong_kernel(monkeypatch, capsys):
    """A Pallas gmm that gives group 0's rows group 1's weights is reported
    FAIL and makes the script exit 1: the check can catch a kernel bug."""
    monkeypatch.syspath_prepend(BENCH)
    gpu = importlib.import_module("gpu")
    real = gpu.kernels.gmm

    def wrong(x, w, gs, backend="auto", **kw):
        if backend != "pallas":
            return real(x, w, gs, backend=backend, **kw)
        return real(x, w[np.r_[1, 1:w.shape[0]]], gs, backend=backend, **kw)

    monkeypatch.setattr(gpu.kernels, "gmm", wrong)
    rc = gpu.main(["--dry", "--only", "kernels", "--dtypes", "float32"])
    assert rc == 1
    rows = [l for l in capsys.readouterr().out.splitlines() if "| gmm[" in l]
    assert rows and all(("FAIL" in l) == ("gmm[pallas]" in l) for l in rows), rows
