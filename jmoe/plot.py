"""PNG plots of a training run, read from `workdir/metrics.jsonl`.

  python -m jmoe.plot runs/NAME            # writes runs/NAME/plots/*.png
  python -m jmoe.plot runs/A runs/B --out cmp/   # loss curves of several runs

Writes `loss.png` (train and validation loss over steps, one colour per run),
`optim.png` (learning rate and gradient norm), and for MoE runs
`expert_load.png`: one heatmap per MoE layer of each expert's share of the
token-expert assignments over steps (balanced = 1/E everywhere), plus
`moe.png` (load-balance loss, router entropy, dropped fraction). Runs with
online re-placement (`config.placement.every`) also get `device_load.png`
(each device's share of the rows, moves dotted) and `busiest_device.png`
(busiest device / mean under the placement in use and the static layout).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np


def read_metrics(workdir: str) -> tuple[list[dict], list[dict]]:
    """(train records, val records) from `workdir/metrics.jsonl`, oldest first.

    A resumed run appends to the same file; a later record for a step
    replaces an earlier one, so the curves show the run that was kept.
    """
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} a jmoe workdir?")
    recs: dict[tuple[str, int], dict] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                recs[(r["split"], r["step"])] = r
    train = sorted((r for (s, _), r in recs.items() if s == "train"), key=lambda r: r["step"])
    val = sorted((r for (s, _), r in recs.items() if s == "val"), key=lambda r: r["step"])
    return train, val


def _series(recs: list[dict], key: str):
    pts = [(r["step"], r[key]) for r in recs if key in r and np.ndim(r[key]) == 0]
    return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts], dtype=float))


def plot_runs(workdirs: list[str], out_dir: str) -> list[str]:
    """Writes the PNGs for one or more runs; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only; works without a display
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    runs = {os.path.basename(os.path.normpath(w)): read_metrics(w) for w in workdirs}
    written = []

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, (train, val)) in enumerate(runs.items()):
        color = f"C{i}"
        s, y = _series(train, "ce")
        ax.plot(s, y, color=color, alpha=0.6, label=f"{name} train")
        s, y = _series(val, "loss")
        if len(s):
            ax.plot(s, y, "o-", color=color, label=f"{name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, out_dir, "loss.png"))

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, (train, _)) in enumerate(runs.items()):
        ax1.plot(*_series(train, "lr"), color=f"C{i}", label=name)
        ax2.plot(*_series(train, "grad_norm"), color=f"C{i}", label=name)
    ax1.set_title("learning rate")
    ax2.set_title("gradient global norm (before clipping)")
    for ax in (ax1, ax2):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax1.legend()
    written.append(_save(fig, out_dir, "optim.png"))

    moe_runs = {n: t for n, (t, _) in runs.items() if t and "expert_load" in t[-1]}
    if moe_runs:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for i, (name, train) in enumerate(moe_runs.items()):
            for ax, key in zip(axes, ("load_balance_loss", "router_entropy", "dropped_fraction")):
                ax.plot(*_series_mean(train, key), color=f"C{i}", label=name)
                ax.set_title(key.replace("_", " ") + " (mean over layers)")
                ax.set_xlabel("step")
                ax.grid(alpha=0.3)
        axes[0].legend()
        written.append(_save(fig, out_dir, "moe.png"))
        # The heatmap is per run; with several runs the first one is drawn.
        name, train = next(iter(moe_runs.items()))
        written.append(_expert_load_heatmap(plt, train, out_dir, name))
        if "device_load" in train[-1]:  # online re-placement: devices, and the moves
            workdir = next(w for w in workdirs if os.path.basename(os.path.normpath(w)) == name)
            moves = tuple(read_moves(workdir))
            written.append(_expert_load_heatmap(plt, train, out_dir, name, key="device_load",
                                                unit="device", moves=moves))
            written.append(_busiest_device(plt, train, out_dir, name, moves))
    return written


def _series_mean(recs, key):
    pts = [(r["step"], float(np.mean(r[key]))) for r in recs if key in r]
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def _expert_load_heatmap(plt, train: list[dict], out_dir: str, name: str,
                         key: str = "expert_load", unit: str = "expert",
                         moves: tuple = ()) -> str:
    """One heatmap per MoE layer of `key` ([L, N] shares per record) over
    steps, relative to an even share; `moves`: steps to mark (re-placements)."""
    recs = [r for r in train if key in r]
    steps = np.array([r["step"] for r in recs])
    load_WLE = np.array([r[key] for r in recs], dtype=float)
    n_layers, n_exp = load_WLE.shape[1], load_WLE.shape[2]
    cols = min(n_layers, 4)
    rows = math.ceil(n_layers / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 1.0, 3.2 * rows + 0.6),
                             squeeze=False, layout="constrained")
    # Colour = load relative to perfect balance (1/E): 1 is balanced, 2 is twice the share.
    vmax = max(2.0, float(np.percentile(load_WLE * n_exp, 99)))
    for layer in range(rows * cols):
        ax = axes[layer // cols][layer % cols]
        if layer >= n_layers:
            ax.axis("off")
            continue
        im = ax.imshow((load_WLE[:, layer, :] * n_exp).T, aspect="auto", origin="lower",
                       cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest",
                       extent=(steps[0], steps[-1], -0.5, n_exp - 0.5))
        for m in moves:
            ax.axvline(m, color="white", lw=0.8, ls=":")
        ax.set_title(f"MoE layer {layer}")
        ax.set_xlabel("step")
        ax.set_ylabel(unit)
    symbol = "E" if unit == "expert" else "P"
    fig.colorbar(im, ax=axes, shrink=0.8, label=f"load x {symbol} (1 = balanced)")
    fig.suptitle(f"{name}: {unit} load per MoE layer"
                 + (" (dotted: re-placements)" if moves else ""))
    return _save(fig, out_dir, f"{unit}_load.png", tight=False)


def read_moves(workdir: str) -> list[int]:
    """Steps at which online re-placement moved experts (`metrics.jsonl`)."""
    out = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("split") == "placement" and r.get("moved"):
                out.append(r["step"])
    return sorted(set(out))


def _busiest_device(plt, train: list[dict], out_dir: str, name: str, moves) -> str:
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(*_series_mean(train, "busiest_device_static"), label="static layout")
    ax.plot(*_series_mean(train, "busiest_device"), label="placement in use")
    for m in moves:
        ax.axvline(m, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("busiest device / mean (mean over layers)")
    ax.set_title(f"{name}: device load" + (" (dotted: re-placements)" if moves else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out_dir, "busiest_device.png")


def _save(fig, out_dir: str, name: str, tight: bool = True) -> str:
    path = os.path.join(out_dir, name)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jmoe.plot", description=__doc__.split("\n")[0])
    ap.add_argument("workdirs", nargs="+", help="run directories (hold metrics.jsonl)")
    ap.add_argument("--out", default=None, help="output folder (default: WORKDIR/plots)")
    args = ap.parse_args(argv)
    out = args.out or os.path.join(args.workdirs[0], "plots")
    try:
        paths = plot_runs(args.workdirs, out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
