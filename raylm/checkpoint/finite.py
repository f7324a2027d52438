"""The finite check a checkpoint's model tensors pass before they are written: a NaN or inf is never committed."""

from __future__ import annotations

import torch


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite, from the smallest and largest (a NaN makes both NaN, an infinity is one of
    them): one pass without a mask tensor the size of the input, a fraction of isfinite(t).all()'s time."""
    if tensor.numel() == 0:
        return True
    return bool(torch.isfinite(torch.stack(torch.aminmax(tensor))).all())


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """'NAME (N of M values are nan/inf)' for the first tensor holding a NaN or an infinity; None when all
    are finite."""
    for name, tensor in tensors.items():
        if _all_finite(tensor):
            continue
        bad = int(tensor.numel() - torch.isfinite(tensor).sum())
        return f"{name} ({bad} of {tensor.numel()} values are nan/inf)"
    return None
