"""Symmetric weight-only quantization of one weight matrix: torchao rounds it, raylm.model.quantized stores it.

int8: one scale per output row (per-channel). int4: one scale per `group_size` consecutive input columns of a row.
torchao's `IntxWeightOnlyConfig` (symmetric, zero point 0) does the rounding, on CPU, with this torch; its
`Int4WeightOnlyConfig` is not used because its packed layouts need CUDA kernels (on CPU it stops with
"Requires mslk >= 1.0.0"). The result is the integers and scales; raylm.model.quantized packs them into
compressed-tensors' format (docs/compression.md), which needs no torchao to read:

    q:      int8 (out, in), in [-128, 127] for int8, [-8, 7] for int4
    scales: fp32 (out, in / group_size), group_size = in for int8
    weight = q * scales repeated over each group's columns
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from raylm.errors import RaylmError

BITS = {"int8": 8, "int4": 4}


@dataclass(frozen=True)
class Quantized:
    """One matrix as integers and scales."""

    q: torch.Tensor
    scales: torch.Tensor


def _torchao():
    """torchao's quantize_ and configs; its import logs that CUDA-only kernels did not load, which is expected."""
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        from torchao.quantization import IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerAxis, PerGroup
    except ImportError:
        raise RaylmError("--quantize needs torchao: pip install 'raylm[compress]'") from None
    finally:
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)
    return quantize_, IntxWeightOnlyConfig, PerAxis, PerGroup


def quantize(weight: torch.Tensor, method: str, group_size: int) -> Quantized:
    """`weight` (out, in) as int8 per output row, or int4 per group of `group_size` input columns."""
    quantize_, config_class, per_axis, per_group = _torchao()
    rows, cols = weight.shape
    linear = torch.nn.Linear(cols, rows, bias=False)
    linear.weight = torch.nn.Parameter(weight.detach().float().clone(), requires_grad=False)
    granularity = per_axis(0) if method == "int8" else per_group(group_size)
    # torch.int4 exists at run time (torch >= 2.3) but not in torch's stubs (hence the ignore).
    dtype = torch.int8 if method == "int8" else torch.int4  # type: ignore[attr-defined]
    quantize_(torch.nn.Sequential(linear), config_class(weight_dtype=dtype, granularity=granularity))
    q: Any = linear.weight  # torchao swapped in its quantized tensor subclass (qdata, scale, zero_point)
    assert not q.zero_point.any(), "symmetric quantization has zero points of 0"
    return Quantized(q.qdata.to(torch.int8).contiguous(), q.scale.float().reshape(rows, -1).contiguous())
