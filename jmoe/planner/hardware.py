"""Hardware profiles for the cost model: datasheet peaks, stated assumptions,
and `cpu-local`, built from measurements of the running machine
(`jmoe.planner.calibrate`).

A profile describes one accelerator and how it is wired:

  peak_flops     dense matmul FLOP/s per device, by compute dtype (no sparsity)
  mem_bw         device memory bandwidth, bytes/s
  mem_bytes      device memory capacity, bytes
  devices_per_node
  intra_bw       all-to-all bandwidth inside a node, bytes/s per device per
                 direction (NVLink / PCIe)
  inter_bw       bandwidth across nodes, bytes/s per device per direction
                 (the device's share of the node's InfiniBand NICs)
  *_alpha        fixed cost of one collective call on that fabric, seconds
  *_peer         extra cost per peer message (what makes many small messages
                 slow: the reason for Tutel's two-level all-to-all), seconds
  attention      the attention implementation the model runs (memory):
                 "xla" (materialised scores) or "flash"

Datasheet numbers carry their source on the line. Everything a datasheet
does not give (achieved efficiencies, latencies, NIC counts where no
reference system exists) is an *assumption*, marked as such; override any
field with `profile.replace(...)` or `python -m jmoe.plan --set FIELD=VALUE`.

Sources (NVIDIA product datasheets and DGX system datasheets):
  [A100]  NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM column), nvidia.com
  [A800]  NVIDIA A800 Tensor Core GPU datasheet (A800 80GB SXM column), nvidia.com
  [A30]   NVIDIA A30 Tensor Core GPU datasheet, nvidia.com
  [H100]  NVIDIA H100 Tensor Core GPU datasheet (H100 SXM column), nvidia.com
  [H200]  NVIDIA H200 Tensor Core GPU datasheet (H200 SXM column), nvidia.com
  [DGXA]  NVIDIA DGX A100 datasheet: 8x single-port ConnectX-6 200 Gb/s HDR
          InfiniBand for the compute fabric, one per GPU
  [DGXH]  NVIDIA DGX H100 / DGX H200 datasheets: 8x single-port ConnectX-7
          400 Gb/s InfiniBand, one per GPU
Datasheets quote Tensor Core FLOP/s "with sparsity" (2:4); the dense figure
used here is half of it. NVLink figures are totals over both directions; the
per-direction bandwidth used here is half.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from jmoe.planner import calibrate

GB = 1e9
TERA = 1e12
GBIT = 1e9 / 8  # bytes/s in one Gb/s


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    description: str
    peak_flops: dict  # dtype name -> FLOP/s per device
    mem_bw: float
    mem_bytes: float
    devices_per_node: int
    intra_bw: float
    inter_bw: float
    intra_alpha: float
    intra_peer: float
    inter_alpha: float
    inter_peer: float
    # Achieved fraction of the peaks (assumptions on GPUs, 1.0 where measured).
    mm_eff: float = 0.7  # large dense matmuls (cuBLAS-class GEMM)
    gmm_eff: float = 0.55  # grouped matmul over experts (jmoe's Triton kernel)
    attn_eff: float = 0.45  # flash attention forward + backward
    mem_eff: float = 0.8  # streaming elementwise kernels
    gather_eff: float = 0.6  # row gathers (permute / un-permute), as a share of mem_bw
    scatter_eff: float = 0.4  # row scatters (ragged emulation, gather transposes)
    comm_eff: float = 0.75  # share of link bandwidth an NCCL all-to-all reaches
    kernel_overhead: float = 4e-6  # per kernel launch, seconds
    launch_overhead: float = 50e-6  # per jitted step call, seconds
    async_collectives: bool = True  # can an all-to-all run while compute runs
    causal_skip: bool = True  # attention skips masked blocks (flash attention)
    # The attention the model runs, for memory: "xla" keeps the [B, H, S, S]
    # scores (jax.nn.dot_product_attention's default path on every backend in
    # jax 0.10, what jmoe.model calls); "flash" (cuDNN / Pallas kernels) keeps
    # O(S) per head. The time fields above still assume flash (causal_skip).
    attention: str = "xla"
    sources: tuple = ()
    measured: Optional[dict] = None  # raw calibration numbers (cpu-local)

    def replace(self, **kw) -> "Hardware":
        return dataclasses.replace(self, **kw)

    def flops(self, dtype: str) -> float:
        """Peak matmul FLOP/s for `dtype` (float16 falls back to bfloat16)."""
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]
        if dtype == "float16" and "bfloat16" in self.peak_flops:
            return self.peak_flops["bfloat16"]
        return self.peak_flops["float32"]


# Assumed latencies (not in any datasheet): NCCL-class collectives.
_NVLINK_LAT = dict(intra_alpha=10e-6, intra_peer=0.5e-6)
_IB_LAT = dict(inter_alpha=20e-6, inter_peer=2e-6)


def _a100_like(name, desc, nvlink_total_gbs, sources):
    return Hardware(
        name=name, description=desc,
        # [A100]/[A800]: BF16/FP16 Tensor 624 TFLOPS with sparsity -> 312 dense;
        # TF32 312 with sparsity -> 156 dense (what XLA uses for fp32 dots on
        # Ampere unless precision=highest; fp32 non-tensor is 19.5).
        peak_flops={"bfloat16": 312 * TERA, "float16": 312 * TERA, "float32": 156 * TERA},
        mem_bw=2039 * GB,  # [A100]/[A800] 80GB SXM: HBM2e 2,039 GB/s
        mem_bytes=80 * GB,  # 80 GB HBM2e
        devices_per_node=8,  # HGX/DGX A100 baseboard: 8 GPUs on NVSwitch
        intra_bw=nvlink_total_gbs / 2 * GB,  # NVLink total / 2 directions
        inter_bw=200 * GBIT,  # [DGXA] one 200 Gb/s HDR NIC per GPU (A800: assumed same)
        **_NVLINK_LAT, **_IB_LAT, sources=sources)


PROFILES = {
    "a100": _a100_like("a100", "A100 80GB SXM4, 8 per node on NVLink/NVSwitch, 200 Gb/s HDR IB per GPU",
                       600, ("[A100] NVLink 600 GB/s", "[DGXA] 200 Gb/s HDR per GPU")),
    "a800": _a100_like("a800", "A800 80GB SXM4 (NVLink capped at 400 GB/s), 8 per node, 200 Gb/s IB per GPU",
                       400, ("[A800] NVLink 400 GB/s",
                             "assumption: 200 Gb/s HDR per GPU as in [DGXA]")),
    "a30": Hardware(
        name="a30", description="A30 24GB PCIe, 8 per node on PCIe Gen4, 200 Gb/s NIC per 2 GPUs",
        # [A30]: BF16 Tensor 330 TFLOPS with sparsity -> 165 dense; TF32 165 -> 82.5.
        peak_flops={"bfloat16": 165 * TERA, "float16": 165 * TERA, "float32": 82.5 * TERA},
        mem_bw=933 * GB,  # [A30] HBM2 933 GB/s
        mem_bytes=24 * GB,  # [A30] 24 GB HBM2
        devices_per_node=8,  # assumption: 8-GPU PCIe server
        intra_bw=32 * GB,  # [A30] PCIe Gen4 x16: 64 GB/s total -> 32 per direction
        # assumption: no reference system; one 200 Gb/s HDR NIC per two GPUs.
        inter_bw=200 * GBIT / 2,
        intra_alpha=15e-6, intra_peer=2e-6,  # assumption: PCIe P2P through switches
        **_IB_LAT,
        sources=("[A30] PCIe Gen4 64 GB/s, HBM2 933 GB/s",
                 "assumption: 200 Gb/s HDR per 2 GPUs, 8 GPUs per node")),
    "h100": Hardware(
        name="h100", description="H100 80GB SXM5, 8 per node on NVLink/NVSwitch, 400 Gb/s NDR IB per GPU",
        # [H100] SXM: BF16 Tensor 1,979 TFLOPS with sparsity -> 989.5 dense;
        # TF32 989 with sparsity -> 494.5 dense; FP8 3,958 -> 1,979 dense.
        peak_flops={"bfloat16": 989.5 * TERA, "float16": 989.5 * TERA,
                    "float32": 494.5 * TERA, "float8": 1979 * TERA},
        mem_bw=3350 * GB,  # [H100] SXM: HBM3 3.35 TB/s
        mem_bytes=80 * GB,  # [H100] SXM: 80 GB
        devices_per_node=8,  # [DGXH] 8 GPUs
        intra_bw=450 * GB,  # [H100] NVLink 900 GB/s total -> 450 per direction
        inter_bw=400 * GBIT,  # [DGXH] one 400 Gb/s ConnectX-7 per GPU = 50 GB/s
        **_NVLINK_LAT, **_IB_LAT,
        sources=("[H100] SXM: 989.5 dense BF16 TFLOPS, HBM3 3.35 TB/s, NVLink 900 GB/s",
                 "[DGXH] 400 Gb/s InfiniBand per GPU")),
    "h200": Hardware(
        name="h200", description="H200 141GB SXM, 8 per node on NVLink/NVSwitch, 400 Gb/s NDR IB per GPU",
        # [H200] SXM: same Tensor Core peaks as H100 SXM (BF16 1,979 sparse).
        peak_flops={"bfloat16": 989.5 * TERA, "float16": 989.5 * TERA,
                    "float32": 494.5 * TERA, "float8": 1979 * TERA},
        mem_bw=4800 * GB,  # [H200] HBM3e 4.8 TB/s
        mem_bytes=141 * GB,  # [H200] 141 GB
        devices_per_node=8,  # [DGXH] DGX H200: 8 GPUs
        intra_bw=450 * GB,  # [H200] NVLink 900 GB/s total -> 450 per direction
        inter_bw=400 * GBIT,  # [DGXH] 400 Gb/s ConnectX-7 per GPU
        **_NVLINK_LAT, **_IB_LAT,
        sources=("[H200] SXM: 989.5 dense BF16 TFLOPS, HBM3e 4.8 TB/s, NVLink 900 GB/s",
                 "[DGXH] 400 Gb/s InfiniBand per GPU")),
}

ALIASES = {"a100-80gb": "a100", "h100-sxm": "h100", "h200-sxm": "h200", "cpu": "cpu-local"}
NAMES = tuple(PROFILES) + ("cpu-local",)


# ------------------------------------------------------------------ cpu-local

def cpu_profile_from(measured: dict) -> Hardware:
    """The `cpu-local` profile from `calibrate_cpu`'s numbers.

    XLA:CPU runs collectives synchronously, so nothing overlaps
    (`async_collectives=False`) and the chunk pipeline buys nothing; the
    virtual devices form one "node" joined by memory copies.
    """
    ndev = measured["num_devices"]
    return Hardware(
        name="cpu-local",
        description=f"this machine as {ndev} virtual CPU devices (measured, "
                    f"{measured['mm_flops'] / 1e9:.1f} GFLOP/s and "
                    f"{measured['mem_bw'] / 1e9:.2f} GB/s per device)",
        peak_flops={"float32": measured["mm_flops"], "bfloat16": measured["mm_flops"],
                    "float16": measured["mm_flops"]},
        mem_bw=measured["mem_bw"], mem_bytes=64 * GB, devices_per_node=ndev,
        # a2a_bw counts the bytes that leave a device, as the model's links do.
        intra_bw=measured["a2a_bw"], inter_bw=measured["a2a_bw"],
        intra_alpha=measured["a2a_alpha"], intra_peer=0.0,
        inter_alpha=measured["a2a_alpha"], inter_peer=0.0,
        mm_eff=1.0, gmm_eff=1.0, attn_eff=1.0, mem_eff=1.0,
        gather_eff=measured["gather_bw"] / measured["mem_bw"],
        scatter_eff=measured.get("scatter_bw", measured["gather_bw"]) / measured["mem_bw"],
        comm_eff=1.0,
        kernel_overhead=0.0, launch_overhead=measured["launch"],
        async_collectives=False, causal_skip=False,
        sources=("measured on this machine by jmoe.planner.calibrate",),
        measured=dict(measured))


_CPU_CACHE: dict = {}


def cpu_local(num_devices: int = 8, budget_s: float = 20.0) -> Hardware:
    """Calibrates (once per process, `calibrate.measure_cpu`) and returns the
    `cpu-local` profile."""
    if num_devices not in _CPU_CACHE:
        _CPU_CACHE[num_devices] = cpu_profile_from(calibrate.measure_cpu(num_devices, budget_s))
    return _CPU_CACHE[num_devices]


def get(name: str, **overrides) -> Hardware:
    """A profile by name (`a100`, `a800`, `a30`, `h100`, `h200`, `cpu-local`)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key == "cpu-local":
        hw = cpu_local()
    elif key in PROFILES:
        hw = PROFILES[key]
    else:
        raise ValueError(f"hardware={name!r} is unknown: choose one of {NAMES}.")
    return apply_overrides(hw, overrides) if overrides else hw


def apply_overrides(hw: Hardware, overrides: dict) -> Hardware:
    """`FIELD=VALUE` overrides; bandwidths in GB/s and FLOP/s in TFLOP/s are
    accepted through the `*_gbs` / `tflops_<dtype>` spellings."""
    kw, flops = {}, dict(hw.peak_flops)
    fields = {f.name: f for f in dataclasses.fields(Hardware)}
    for key, value in overrides.items():
        if key.startswith("tflops_"):
            flops[key[len("tflops_"):]] = float(value) * TERA
        elif key.endswith("_gbs") and key[:-4] in fields:
            kw[key[:-4]] = float(value) * GB
        elif key.endswith("_gbit") and key[:-5] in fields:
            kw[key[:-5]] = float(value) * GBIT
        elif key in fields and key not in ("name", "peak_flops", "sources", "measured"):
            cur = getattr(hw, key)
            if isinstance(cur, bool):
                kw[key] = str(value).lower() in ("1", "true", "yes")
            elif isinstance(cur, int):
                kw[key] = int(value)
            elif isinstance(cur, float):
                kw[key] = float(value)
            else:
                kw[key] = value
        else:
            raise ValueError(
                f"hardware override {key}={value!r}: unknown field; use one of "
                f"{sorted(k for k in fields if k not in ('name', 'peak_flops', 'sources', 'measured'))}"
                ", tflops_<dtype>, or <bandwidth field>_gbs / _gbit.")
    kw["peak_flops"] = flops
    return hw.replace(**kw)
