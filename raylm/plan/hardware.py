"""What the planner knows of a machine: peak FLOP/s, memory, memory and link bandwidths, per GPU or CPU rank.

GPU figures are the vendors' datasheet numbers for SXM parts (peaks from raylm.plan.peaks, the table MFU uses);
the achievable shares below them (`matmul_eff`, `link_eff`) are stated assumptions, not measurements. On CPU
the same fields come from raylm.plan.calibrate, measured on this machine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from raylm.errors import ConfigError
from raylm.plan.peaks import gpu_peak_flops

GB = 1e9


@dataclass(frozen=True)
class Hardware:
    """One kind of rank (a GPU, or a CPU process) and the links between ranks."""

    name: str
    peak_flops: dict[str, float]  # dense FLOP/s per rank by train.precision (bf16, fp32)
    mem_bytes: float  # memory one rank may use (a GPU's HBM; on CPU the node's RAM / ranks)
    mem_bw: float  # bytes/s of one rank's memory: what the optimizer step, a memory-bound pass, runs at
    intra_bw: float  # bytes/s one rank sends to a peer on its node (NVLink; on CPU: gloo over loopback)
    inter_bw: float  # bytes/s one rank sends to a peer on another node (its share of the node's NICs)
    p2p_bw: float  # bytes/s of a point-to-point send between neighbouring pipeline stages on one node
    latency_s: float  # fixed cost of one collective or send
    framework_bytes: (
        float  # what a rank holds before the model: CUDA context and NCCL, or torch+DeepSpeed RSS
    )
    matmul_eff: float  # share of the peak the model's matmuls reach (norms, RoPE, softmax included)
    link_eff: float  # share of a link's bandwidth a ring collective reaches
    matmul_knee: int  # a matmul side of this many elements reaches half of matmul_eff (small ones starve)
    block_overhead_s: float  # fixed cost of one block's forward and backward (op launches, hooks)
    cores_per_node: int = 0  # CPU only: ranks on a node share these cores
    # CPU only: what a collective between two compute segments waits beyond its transfer when every core computes
    # (the peers' skew and wake-up); TP pays it at each of its all-reduces
    sync_wait_s: float = 0.0

    def peak(self, precision: str) -> float:
        return self.peak_flops[precision]

    def with_mem_gb(self, gb: float) -> Hardware:
        """The same hardware with `--gpu-mem GB` per rank."""
        return dataclasses.replace(self, mem_bytes=gb * GB)


def _gpu(name: str, mem_gb: float, hbm_tb_s: float, nvlink_gb_s: float, nic_gb_s: float) -> Hardware:
    peaks = {p: gpu_peak_flops(name.upper(), p) or 0.0 for p in ("bf16", "fp32")}
    return Hardware(
        name=name,
        peak_flops=peaks,
        mem_bytes=mem_gb * GB,
        mem_bw=hbm_tb_s * 1e12,
        intra_bw=nvlink_gb_s * GB,
        inter_bw=nic_gb_s * GB,
        p2p_bw=nvlink_gb_s * GB,
        latency_s=20e-6,
        framework_bytes=2.0 * GB,  # CUDA context, cuBLAS workspaces, NCCL buffers, allocator slack
        matmul_eff=0.6,
        link_eff=0.8,
        matmul_knee=128,
        block_overhead_s=300e-6,  # ~100 eager kernels of a forward and backward at a few microseconds each
    )


# NVLink: bytes/s per direction per GPU (H100/H200 NVLink 4: 450 GB/s; A100 NVLink 3: 300 GB/s). Network: one
# 400 Gb/s NIC per GPU on H100/H200 nodes (50 GB/s), 200 Gb/s on A100 nodes (25 GB/s), as in DGX systems.
GPUS = {
    "h100": _gpu("h100", 80, 3.35, 450, 50),
    "h200": _gpu("h200", 141, 4.8, 450, 50),
    "a100": _gpu("a100", 80, 2.0, 300, 25),
}
KINDS = (*GPUS, "cpu")


def gpu_hardware(kind: str, mem_gb: float = 0.0) -> Hardware:
    """A GPU of the table by its --gpu name; `mem_gb` (> 0) replaces its memory."""
    if kind not in GPUS:
        raise ConfigError(f"--gpu {kind!r} is not one of {', '.join(KINDS)}; e.g. --gpu h100")
    hw = GPUS[kind]
    return hw.with_mem_gb(mem_gb) if mem_gb > 0 else hw


def gpu_kind_of(accelerator: str) -> str | None:
    """The table's name for a Ray accelerator type or device name ('H100', 'NVIDIA H100 80GB HBM3'), or None."""
    upper = accelerator.upper()
    if "PCIE" in upper:  # a PCIe part has other peaks and links than the SXM figures above
        return None
    return next((kind for kind in GPUS if kind.upper() in upper), None)
