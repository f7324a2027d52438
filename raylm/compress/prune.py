"""Magnitude pruning masks for weight matrices: unstructured (per layer or one global threshold) or 2:4.

A mask is a bool tensor shaped like its weight, True where the weight is kept. Unstructured keeps the largest
|w|: `layer` scope prunes `sparsity` of each matrix, `global` one threshold over all of them (ties broken by
position, so exactly round(sparsity * total) entries go). 2:4 keeps the 2 largest of every 4 consecutive input
columns in each row, the pattern sparse tensor cores run (sparsity 0.5 exactly).
"""

from __future__ import annotations

import torch

from raylm.errors import RaylmError

PATTERNS = ("unstructured", "2:4")
SCOPES = ("layer", "global")


class CompressError(RaylmError):
    """A compress option or input that cannot be used (the message names it and the fix)."""

    exit_code = 2


def keep_largest(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """A flat bool mask keeping the `keep` largest scores (stable: equal scores keep the earlier position)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    order = torch.sort(scores.flatten(), descending=True, stable=True).indices
    mask[order[:keep]] = True
    return mask


def unstructured_masks(
    weights: dict[str, torch.Tensor], sparsity: float, scope: str
) -> dict[str, torch.Tensor]:
    """Masks pruning `sparsity` of each weight (scope layer) or of all weights together (scope global)."""
    if scope == "layer":
        return {
            name: keep_largest(w.abs(), w.numel() - round(sparsity * w.numel())).view(w.shape)
            for name, w in weights.items()
        }
    flat = torch.cat([w.abs().flatten() for w in weights.values()])
    mask = keep_largest(flat, flat.numel() - round(sparsity * flat.numel()))
    masks, start = {}, 0
    for name, w in weights.items():
        masks[name] = mask[start : start + w.numel()].view(w.shape)
        start += w.numel()
    return masks


def two_four_mask(name: str, weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive input columns of each row."""
    rows, cols = weight.shape
    if cols % 4:
        raise CompressError(
            f"--pattern 2:4 needs every pruned layer's input width to be a multiple of 4, but "
            f"{name} has {cols} input columns; use --pattern unstructured"
        )
    groups = weight.abs().reshape(rows, cols // 4, 4)
    top = groups.topk(2, dim=-1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True).reshape(rows, cols)


def prune_masks(
    weights: dict[str, torch.Tensor], sparsity: float, pattern: str, scope: str
) -> dict[str, torch.Tensor]:
    """Masks for `weights` (name -> (out, in) matrix) under the checked options."""
    if pattern == "2:4":
        return {name: two_four_mask(name, w) for name, w in weights.items()}
    return unstructured_masks(weights, sparsity, scope)


def check_prune_options(sparsity: float, pattern: str, scope: str) -> None:
    """CompressError naming a bad --prune / --pattern / --scope value and the values that work."""
    if pattern not in PATTERNS:
        raise CompressError(
            f"--pattern {pattern!r} is not a pruning pattern; use one of {', '.join(PATTERNS)}"
        )
    if scope not in SCOPES:
        raise CompressError(f"--scope {scope!r} is not a pruning scope; use one of {', '.join(SCOPES)}")
    if not 0 <= sparsity < 1:
        raise CompressError(
            f"--prune {sparsity} is outside [0, 1); pass the fraction of weights to remove, e.g. --prune 0.5"
        )
    if pattern == "2:4" and sparsity != 0.5:
        raise CompressError(
            f"--pattern 2:4 removes exactly half the weights, but --prune is {sparsity}; pass "
            f"--prune 0.5 or --pattern unstructured"
        )
