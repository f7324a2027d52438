"""The finite check a checkpoint's model tensors pass before they are written: a NaN or inf is never committed."""

from __future__ import annotations

import torch


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """'NAME (N of M values are nan/inf)' for the first tensor holding a NaN or an infinity; None when all
    are finite."""
    for name, tensor in tensors.items():
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = int(finite.numel() - finite.sum())
            return f"{name} ({bad} of {tensor.numel()} values are nan/inf)"
    return None
