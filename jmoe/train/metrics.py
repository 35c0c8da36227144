"""What the user sees: progress bar, log lines, TensorBoard events, metrics.jsonl.

Only process 0 reports. Every `log_every` steps the window's metrics (already
fetched from the device one step late by the loop) are averaged and written
to:

  * the terminal: a rich progress bar (step, loss, tokens/s, MFU, ETA) and one
    log line per window;
  * `workdir/tb/`: TensorBoard scalars (loss, lr, grad norm, aux losses,
    dropped fraction, router entropy, per-layer expert load);
  * `workdir/metrics.jsonl`: one JSON object per window with the full
    per-layer expert loads (read by `python -m jmoe.plot`).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

# Per-expert TensorBoard scalars only up to this many experts per layer; the
# full loads are always in metrics.jsonl.
_MAX_PER_EXPERT_SCALARS = 16


def measure_peak_flops(dtype: str = "float32", seconds: float = 0.5) -> float:
    """Measured dense matmul FLOP/s of all local devices together.

    The MFU denominator: what this machine's matmul actually reaches (a
    datasheet peak means little on a shared CPU).
    """
    dev = jax.local_devices()[0]
    n = 2048 if dev.platform == "cpu" else 8192
    dt = jnp.dtype(dtype)
    a = jax.device_put(jnp.ones((n, n), dt) * 0.01, dev)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    # The fastest single matmul: on a shared machine other processes slow some
    # repetitions, and the peak is what the hardware can do, not the average.
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end or best == float("inf"):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best * jax.local_device_count() * jax.process_count()


def _scalar(x) -> float:
    return float(np.mean(np.asarray(x, dtype=np.float64)))


class Reporter:
    def __init__(self, workdir: str, *, total_steps: int, start_step: int,
                 tokens_per_step: int, flops_per_step: float, peak_flops: float,
                 enabled: bool = True, console: Optional[Console] = None):
        self.enabled = enabled
        self.total_steps, self.tokens_per_step = total_steps, tokens_per_step
        self.flops_per_step, self.peak_flops = flops_per_step, peak_flops
        # soft_wrap: log lines stay whole in files and pipes (no 80-column wrap).
        self.console = console or Console(soft_wrap=True)
        self.window: list[dict] = []
        self.window_t0 = time.perf_counter()
        self.window_step0 = start_step
        self.last = {}
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        from tensorboardX import SummaryWriter  # imported here: only process 0 writes

        self.tb = SummaryWriter(os.path.join(workdir, "tb"))
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("MFU {task.fields[mfu]}"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), console=self.console, transient=False,
            disable=not self.console.is_terminal)
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step,
                                           loss="-", tps="-", mfu="-")
        self.progress.start()

    def log(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)
            self.console.file.flush()  # visible at once when stdout is a file or pipe

    def reset_clock(self, step: int) -> None:
        """Starts a new timing window (after the first step's compile)."""
        self.window_t0, self.window_step0 = time.perf_counter(), step

    def exclude(self, seconds: float) -> None:
        """Leaves `seconds` (an evaluation, its compile included) out of the
        current timing window, whose steps still count toward tokens/s."""
        self.window_t0 += seconds

    def add(self, step: int, metrics: dict) -> None:
        """Metrics of the step that produced `step` (host NumPy values)."""
        self.window.append(metrics)
        if self.enabled:
            self.progress.update(self.task, completed=step)

    def flush(self, step: int, timed: bool = True) -> dict:
        if self.enabled and self.jsonl.closed:
            return {}
        return self._flush(step, timed)

    def _flush(self, step: int, timed: bool) -> dict:
        """Averages and writes the window ending at `step`; returns the means.

        `timed=False` leaves out tokens/s and MFU (a window that compiled).
        """
        if not self.window:
            return {}
        dt = max(time.perf_counter() - self.window_t0, 1e-9)
        nsteps = max(step - self.window_step0, 1)
        # Adaptive plans: which plans the window's steps ran (an index set,
        # not a mean).
        ran = sorted({int(m["plan"]) for m in self.window if "plan" in m})
        mean = {k: np.mean(np.stack([np.asarray(m[k], np.float64) for m in self.window]), 0)
                for k in self.window[0] if k != "plan"}
        self.window = []
        speed = ""
        if timed:
            tps = nsteps * self.tokens_per_step / dt
            mfu = nsteps * self.flops_per_step / dt / self.peak_flops
            mean.update(tokens_per_s=tps, mfu=mfu, step_time_s=dt / nsteps)
            speed = f"  {tps:,.0f} tok/s  MFU {100 * mfu:.1f}%"
        self.last = mean
        self.window_t0, self.window_step0 = time.perf_counter(), step
        if not self.enabled:
            return mean
        self._write(step, mean, prefix="train", extra={"plans": ran} if ran else None)
        if ran:
            self.tb.add_scalar("train/plan", float(ran[-1]), step)
        if timed:
            self.progress.update(self.task, tps=f"{tps:,.0f}", mfu=f"{100 * mfu:.1f}%")
        self.progress.update(self.task, loss=f"{mean['loss']:.3f}")
        line = (f"step {step:>6d}  loss {mean['loss']:.4f}  ce {mean['ce']:.4f}  "
                f"lr {mean['lr']:.2e}  |g| {mean['grad_norm']:.3f}{speed}")
        if "expert_load" in mean:
            imb = float(np.max(mean["expert_load"]) * mean["expert_load"].shape[-1])
            line += (f"  lb {_scalar(mean['load_balance_loss']):.3f}  "
                     f"max-load x{imb:.2f}  drop {_scalar(mean['dropped_fraction']):.3f}")
        if _scalar(mean.get("capacity_factor", 0.0)) > 0:  # capacity dispatch: the buffers used
            line += f"  cap x{_scalar(mean['capacity_factor']):.2f}"
        if ran:  # adaptive plans: the plans the window's steps ran (indices)
            line += f"  plan {ran[0]}" if len(ran) == 1 else (
                "  plans " + ",".join(map(str, ran)) + " (timing)")
        if "busiest_device" in mean:  # online re-placement: busiest device / mean
            line += (f"  dev-load x{_scalar(mean['busiest_device']):.2f} "
                     f"(static x{_scalar(mean['busiest_device_static']):.2f})")
        self.log(line)
        return mean

    def event(self, step: int, split: str, fields: dict, message: str) -> None:
        """Logs `message` and writes `fields` to metrics.jsonl as a record of
        its own `split` (e.g. "adaptive": a timing round of the plan switch)."""
        if not self.enabled:
            return
        self.log(message)
        self.jsonl.write(json.dumps({"step": step, "split": split, "time": time.time(),
                                     **fields}) + "\n")
        self.jsonl.flush()

    def placement(self, step: int, decision, every: int) -> None:
        """Logs a re-placement decision (`jmoe.train.rebalance.Decision`) with
        its predicted gain and move cost, and the measured move time."""
        if not self.enabled:
            return
        self.log(decision.message(every))
        rec = {"step": step, "split": "placement", "time": time.time(),
               "moved": bool(decision.moved),
               "busiest_before": [float(x) for x in decision.busiest_before],
               "busiest_after": [float(x) for x in decision.busiest_after],
               "busiest_static": [float(x) for x in decision.busiest_static],
               "predicted_gain_s": float(decision.predicted_gain_s),
               "predicted_move_s": float(decision.predicted_move_s),
               "move_s": float(decision.move_s) if decision.moved else None}
        self.tb.add_scalar("placement/moved", float(decision.moved), step)
        self.tb.add_scalar("placement/busiest_after", float(np.mean(decision.busiest_after)), step)
        if decision.moved:
            self.tb.add_scalar("placement/move_ms", 1e3 * float(decision.move_s), step)
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()

    def eval(self, step: int, val_loss: float, seconds: float) -> None:
        """Reports a validation loss; the `seconds` it took are not training time."""
        self.exclude(seconds)
        if not self.enabled:
            return
        self._write(step, {"loss": val_loss}, prefix="val")
        self.log(f"step {step:>6d}  [bold]val loss {val_loss:.4f}[/bold] "
                 f"({val_loss / np.log(2):.3f} bits/token, {seconds:.1f}s)")

    def _write(self, step: int, mean: dict, prefix: str, extra: Optional[dict] = None) -> None:
        rec: dict[str, Any] = {"step": step, "split": prefix, "time": time.time(), **(extra or {})}
        for k, v in mean.items():
            v = np.asarray(v)
            if v.ndim == 0:
                self.tb.add_scalar(f"{prefix}/{k}", float(v), step)
                rec[k] = float(v)
            else:
                rec[k] = v.tolist()
                self._write_per_layer(step, k, v)
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()

    def _write_per_layer(self, step: int, key: str, v: np.ndarray) -> None:
        """[L] per-layer scalars and [L, E] expert loads."""
        self.tb.add_scalar(f"moe/{key}", float(np.mean(v)), step)
        if v.ndim == 1:
            for layer, x in enumerate(v):
                self.tb.add_scalar(f"moe_layer/{key}/{layer:02d}", float(x), step)
        elif v.ndim == 2:
            e = v.shape[1]
            for layer, load_E in enumerate(v):
                self.tb.add_scalar(f"{key}_max/{layer:02d}", float(load_E.max() * e), step)
                self.tb.add_scalar(f"{key}_min/{layer:02d}", float(load_E.min() * e), step)
                if e <= _MAX_PER_EXPERT_SCALARS:
                    for j, x in enumerate(load_E):
                        self.tb.add_scalar(f"{key}/{layer:02d}/{j:02d}", float(x), step)

    def close(self) -> None:
        if self.enabled and not self.jsonl.closed:
            self.progress.stop()
            self.tb.close()
            self.jsonl.close()
