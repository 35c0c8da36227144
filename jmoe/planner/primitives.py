"""Roofline prices of the primitive operations on one device: matmuls and
memory passes, the all-to-all (flat or two-level), ring all-gathers and
all-reduces, and the two-resource pipeline that overlaps them.

All times are seconds, sizes bytes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

from jmoe.planner.hardware import Hardware


def dtype_bytes(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1}[dtype]


@dataclasses.dataclass(frozen=True)
class Prim:
    """Roofline prices of primitive operations on one device."""

    hw: Hardware
    dtype: str = "bfloat16"

    def matmul(self, flops: float, nbytes: float, eff: Optional[float] = None) -> float:
        e = self.hw.mm_eff if eff is None else eff
        return (max(flops / (self.hw.flops(self.dtype) * e),
                    nbytes / (self.hw.mem_bw * self.hw.mem_eff))
                + self.hw.kernel_overhead)

    def mem(self, nbytes: float, kernels: int = 1) -> float:
        return nbytes / (self.hw.mem_bw * self.hw.mem_eff) + kernels * self.hw.kernel_overhead

    def gather(self, nbytes: float, kernels: int = 1) -> float:
        return nbytes / (self.hw.mem_bw * self.hw.gather_eff) + kernels * self.hw.kernel_overhead

    def scatter(self, nbytes: float, kernels: int = 1) -> float:
        return nbytes / (self.hw.mem_bw * self.hw.scatter_eff) + kernels * self.hw.kernel_overhead

    def sort(self, n: int) -> float:
        """Sorting n int32 keys: ~log2(n) passes over 8-byte (key, index) pairs."""
        return self.mem(2 * 8 * n * max(1.0, math.log2(max(n, 2))), kernels=3)


# ----------------------------------------------------------- collectives --

def ep_layout(ep: int, devices_per_node: int) -> tuple[int, int]:
    """(devices per node, nodes) spanned by one expert-parallel group whose
    devices are consecutive in the node-major device order."""
    g = math.gcd(ep, devices_per_node) if ep > devices_per_node else ep
    return g, ep // g


def _flat_a2a(nbytes: float, size: int, per_node: int, hw: Hardware) -> dict:
    """One all-to-all over `size` devices, `per_node` of them sharing a node;
    `nbytes` is each device's whole buffer (its own chunk included)."""
    if size <= 1:
        return {"time": 0.0, "intra": 0.0, "inter": 0.0}
    chunk = nbytes / size
    intra = (per_node - 1) * (hw.intra_peer + chunk / (hw.intra_bw * hw.comm_eff))
    inter = (size - per_node) * (hw.inter_peer + chunk / (hw.inter_bw * hw.comm_eff))
    alpha = hw.inter_alpha if size > per_node else hw.intra_alpha
    return {"time": alpha + max(intra, inter), "intra": intra, "inter": inter}


def all_to_all_time(nbytes: float, ep: int, hw: Hardware, hierarchy: int = 0) -> dict:
    """Seconds for one tiled all-to-all of `nbytes` per device over `ep` devices.

    `hierarchy = h` (1 < h < ep, h | ep): Tutel's two-level form as written
    in `jmoe.sharding.collectives` -- within groups of h consecutive
    devices, a local reorder, then across groups, and a reorder back.
    Returns {"time", "intra", "inter"} (the link terms of the levels).
    """
    g, _ = ep_layout(ep, hw.devices_per_node)
    if hierarchy <= 1 or hierarchy >= ep or ep % hierarchy:
        return _flat_a2a(nbytes, ep, g, hw)
    h = hierarchy
    lvl1 = _flat_a2a(nbytes, h, min(h, g), hw)
    lvl2 = _flat_a2a(nbytes, ep // h, max(1, g // h), hw)
    copies = 2 * 2 * nbytes / (hw.mem_bw * hw.mem_eff) + 2 * hw.kernel_overhead
    return {"time": lvl1["time"] + copies + lvl2["time"],
            "intra": lvl1["intra"] + lvl2["intra"], "inter": lvl1["inter"] + lvl2["inter"]}


def ring_gather(nbytes: float, group: int, spans_nodes: bool, hw: Hardware) -> float:
    """A ring all-gather (or reduce-scatter) whose full result is `nbytes`."""
    if group <= 1 or nbytes <= 0:
        return 0.0
    bw = (hw.inter_bw if spans_nodes else hw.intra_bw) * hw.comm_eff
    alpha = hw.inter_alpha if spans_nodes else hw.intra_alpha
    return alpha * math.log2(group) + (group - 1) / group * nbytes / bw


def ring_allreduce(nbytes: float, group: int, spans_nodes: bool, hw: Hardware) -> float:
    """A ring all-reduce of `nbytes` per device: a reduce-scatter and an all-gather."""
    return 2 * ring_gather(nbytes, group, spans_nodes, hw)


# -------------------------------------------------------------- pipeline --

def pipeline_time(comm_in: Sequence[float], compute: Sequence[float],
                  comm_out: Sequence[float], overlap: bool) -> float:
    """Makespan of chunks i = 0..n-1: comm_in[i] -> compute[i] -> comm_out[i].

    Communication and compute are two resources; with `overlap`, each starts
    an operation as soon as its inputs are ready (every inbound chunk is
    issued first, the outbound ones as their chunk's compute ends). Neither
    resource idles while the other waits, so this never exceeds the serial
    sum, and one chunk is exactly the serial sum.
    """
    n = len(compute)
    if not overlap or n == 1:
        return sum(comm_in) + sum(compute) + sum(comm_out)
    t_comm, t_comp = 0.0, 0.0
    in_done = []
    for a in comm_in:
        t_comm += a
        in_done.append(t_comm)
    comp_done = []
    for i, c in enumerate(compute):
        t_comp = max(t_comp, in_done[i]) + c
        comp_done.append(t_comp)
    for i, b in enumerate(comm_out):
        t_comm = max(t_comm, comp_done[i]) + b
    return max(t_comm, t_comp)
