"""Pruning masks in training: each rank holds its TP slice of a mask and masks its parameter's gradients.

A pruned start (`model.init_from` of a `raylm compress --prune` folder) has its pruned weights at 0.0 and a bool
mask per pruned matrix (True = kept). With the gradient zeroed where the mask is False before it accumulates, every
optimizer step leaves those entries exactly 0: AdamW's moments there stay 0, so its update is 0/(0 + eps) = 0, and
decoupled weight decay scales 0 to 0. This holds under any ZeRO stage, bf16 masters and gradient clipping (the
global norm counts only kept entries), because it acts on the gradient before DeepSpeed sees it. Masks are
sliced like their weights (raylm.parallel.full_tensors) and saved beside the AdamW moments of their parameter in the
checkpoint's optimizer files under MASK_KEY, so a resume, in any layout, masks the same entries.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from raylm.model.weight_source import WeightSource
from raylm.parallel.full_tensors import gather_tp, tp_shard
from raylm.parallel.param_state import local_shape
from raylm.parallel.tensor import TPGroup

MASK_KEY = "mask"


def attach_mask(param: nn.Parameter, mask: torch.Tensor) -> None:
    """Make `param` train sparse under `mask` (this rank's slice): its gradient is masked from now on."""
    assert tuple(mask.shape) == local_shape(param), (mask.shape, local_shape(param))
    first = getattr(param, "prune_mask", None) is None
    # An attribute torch does not declare (hence the ignore); the gradient hook below reads it.
    param.prune_mask = mask.to(device=param.device, dtype=torch.bool)  # type: ignore[attr-defined]
    if first:
        param.register_hook(lambda grad, p=param: grad.masked_fill(~p.prune_mask, 0))


def read_masks(params: dict[str, nn.Parameter], source: WeightSource, tp: TPGroup) -> int:
    """Attach the masks `source` has for these parameters (its TP slice of each); returns how many masks this rank
    holds. No communication. Call before reading the weights: shards.read_weights zeroes the pruned entries."""
    read_mask = getattr(source, "read_mask", None)
    if read_mask is None:
        return 0
    count = 0
    for name, param in params.items():
        mask = read_mask(name, tp_shard(param, tp))
        if mask is not None:
            attach_mask(param, mask)
            count += 1
    return count


def full_mask_entry(param: nn.Parameter, tp: TPGroup) -> dict[str, torch.Tensor]:
    """{MASK_KEY: the full mask} for a checkpoint (a TP collective for split parameters), {} without a mask.
    Every rank of the stage calls for the same parameters in the same order."""
    mask = getattr(param, "prune_mask", None)
    if mask is None:
        return {}
    return {MASK_KEY: gather_tp(mask.to(torch.uint8), param, tp).to("cpu", torch.bool, copy=True)}


def load_mask_entry(param: nn.Parameter, shards: dict[str, torch.Tensor]) -> None:
    """Attach the mask slice a checkpoint saved for `param`, if it saved one."""
    if MASK_KEY in shards:
        attach_mask(param, shards[MASK_KEY])
