"""The peak FLOP/s that MFU and the planner divide by: a data-centre GPU table, an override, or a CPU matmul."""

from __future__ import annotations

import time

import torch

# Dense (not the 2x structured-sparsity) tensor-core peaks per GPU in TFLOP/s, from NVIDIA's datasheets, SXM
# parts unless named: bf16, and TF32, which is what an fp32 run's matmuls can reach at best. Ordered so a more
# specific name ("H100 PCIe") is matched before a shorter one ("H100").
DENSE_PEAK_TFLOPS = (
    ("H100 PCIe", {"bf16": 756.0, "fp32": 378.0}),
    ("H100", {"bf16": 989.0, "fp32": 494.5}),
    ("H200", {"bf16": 989.0, "fp32": 494.5}),
    ("B200", {"bf16": 2250.0, "fp32": 1100.0}),
    ("A100", {"bf16": 312.0, "fp32": 156.0}),
    ("L40S", {"bf16": 362.0, "fp32": 183.0}),
    ("L4", {"bf16": 121.0, "fp32": 60.0}),
)


def gpu_peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of one GPU named `device_name` (torch.cuda.get_device_name) for `precision`
    (bf16 | fp32), or None when the GPU is not in the table."""
    for key, peaks in DENSE_PEAK_TFLOPS:
        if key in device_name:
            return peaks[precision] * 1e12
    return None


def measure_matmul_peak(
    dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.5, windows: int = 5
) -> float:
    """FLOP/s of a square matmul on this process's CPU threads: the CPU 'peak' that MFU is measured against.

    The best of `windows` equal slices of `seconds`: a peak, so a slice slowed by another process's burst
    (Ray starting its workers, say) does not lower it and flatter the MFU."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)  # warm up kernels and caches
    best = 0.0
    for _ in range(windows):
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / windows:
            torch.matmul(a, b)
            runs += 1
        best = max(best, 2 * size**3 * runs / (time.perf_counter() - start))
    return best


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation (PaLM appendix B): achieved model FLOP/s over the hardware's peak; None when
    the peak is unknown (an unlisted GPU without train.peak_tflops), never a guess."""
    if not peak_flops:
        return None
    return tokens_per_s * flops_per_token / peak_flops
