"""One rank's fp32 master weights and AdamW state per parameter, the same calls under ZeRO 0, 1, 2, 3 and bf16.

Without ZeRO or bf16, DeepSpeed steps our torch AdamW on the parameters themselves: the state is keyed by
parameter. ZeRO-1/2 (and bf16, whose optimizer also partitions over DP) step flat fp32 partitions, one per param
group; each parameter's `_hp_mapping` locates its slice. ZeRO-3 also partitions the working weights: a parameter
holds an empty tensor outside forward and backward, and its shape is `ds_shape`. DeepSpeed's safe_get/set_full_*
calls assemble (one DP collective) or scatter (no communication) a whole TP-shard-sized tensor in every case.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def _is_partitioned(param: nn.Parameter) -> bool:
    """True when DeepSpeed keeps this parameter's fp32 master and AdamW state in flat DP partitions."""
    return hasattr(param, "_hp_mapping") or is_zero3(param)


def is_zero3(param: nn.Parameter) -> bool:
    """True for a ZeRO-3 parameter, whose working weights are partitioned over DP too."""
    return hasattr(param, "ds_id")


def local_shape(param: nn.Parameter) -> tuple[int, ...]:
    """This rank's (TP-shard) shape of a parameter, also under ZeRO-3, where `param.shape` is empty."""
    # ds_shape is set by DeepSpeed on a ZeRO-3 parameter; torch's stubs do not know it (hence the ignore).
    return tuple(param.ds_shape if is_zero3(param) else param.shape)  # type: ignore[attr-defined]


def _zero_adam_state(param: torch.Tensor, group: dict) -> dict:
    """The state torch.optim.AdamW creates on its first step (torch 2.x), so a load can fill it before any step."""
    if group.get("capturable") or group.get("fused"):
        step = torch.zeros((), dtype=torch.float32, device=param.device)
    else:
        step = torch.tensor(
            0.0, dtype=torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        )
    return {
        "step": step,
        "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
    }


def _stepped_tensors(optimizer: torch.optim.Optimizer, ds_optimizer) -> list[tuple[torch.Tensor, dict]]:
    """(tensor, param group) for each tensor AdamW steps. ZeRO-3 puts its fp32 partitions into AdamW's groups only
    while it steps them, so between steps they are found on the ZeRO-3 optimizer."""
    if hasattr(ds_optimizer, "fp32_partitioned_groups_flat"):
        groups = ds_optimizer.sub_group_to_group_id
        return [
            (flat, optimizer.param_groups[groups[i]])
            for i, flat in enumerate(ds_optimizer.fp32_partitioned_groups_flat)
        ]
    return [(param, group) for group in optimizer.param_groups for param in group["params"]]


def ensure_adam_state(optimizer: torch.optim.Optimizer, ds_optimizer) -> None:
    """Create AdamW's (zero) state where no step has yet, and link DeepSpeed's per-parameter views to it.

    Equivalent to what the first optimizer step does; needed before state can be read or written.
    """
    for param, group in _stepped_tensors(optimizer, ds_optimizer):
        assert not group.get("amsgrad"), "build_optimizer never enables amsgrad; its extra state is not saved"
        if not optimizer.state[param]:
            optimizer.state[param] = _zero_adam_state(param, group)
    # ZeRO-1/2 and bf16 link each parameter's fragment to the flat state once, lazily. DeepSpeed 0.19.8's ZeRO does
    # it right after stepping param group 0, before group 1 has state, so group 1's parameters end up linked to
    # nothing ("exp_avg not found in optimizer state fragment"). Relinking now, with every group's state in
    # place, is always safe: the links are views of state tensors that AdamW updates in place.
    if hasattr(ds_optimizer, "_lazy_init_hp_params_optimizer_state"):
        ds_optimizer._hp_optimizer_states_linked = False
        ds_optimizer._lazy_init_hp_params_optimizer_state()


def adam_step(optimizer: torch.optim.Optimizer) -> int:
    """AdamW's step count (every parameter steps together, so any state entry tells)."""
    steps = {int(state["step"]) for state in optimizer.state.values() if "step" in state}
    assert len(steps) <= 1, f"parameters disagree on the AdamW step: {sorted(steps)}"
    return steps.pop() if steps else 0


def set_adam_step(optimizer: torch.optim.Optimizer, step: int) -> None:
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"].fill_(step)
        elif "step" in state:
            state["step"] = step


def reset_adam_moments(optimizer: torch.optim.Optimizer) -> None:
    """A fresh optimizer: zero moments and step count (loading weights that came without optimizer state)."""
    for state in optimizer.state.values():
        for key in ADAM_KEYS:
            state[key].zero_()
    set_adam_step(optimizer, 0)


def master_value(param: nn.Parameter) -> torch.Tensor:
    """The fp32 value of this rank's (TP-shard) parameter: its master copy under ZeRO/bf16 (a DP collective)."""
    master = safe_get_full_fp32_param(param)
    return (param.detach() if master is None else master).float()


def set_master_value(param: nn.Parameter, value: torch.Tensor) -> None:
    """Set the parameter and, under ZeRO/bf16, this rank's slice of its fp32 master (no communication).

    Under ZeRO-3 only the master is set: sync_zero3_weights then copies every master into the working weights."""
    value = value.to(device=param.device, dtype=torch.float32)
    if not is_zero3(param):
        with torch.no_grad():
            param.copy_(
                value
            )  # bf16 parameters round to nearest, as DeepSpeed's own master -> model copy does
    safe_set_full_fp32_param(param, value)


def sync_zero3_weights(ds_optimizer) -> None:
    """ZeRO-3: copy the fp32 master partitions into the working-weight partitions and re-gather the small
    "persistent" parameters that ZeRO-3 keeps whole, as the end of its optimizer step does (a DP collective)."""
    if not hasattr(ds_optimizer, "fp16_partitioned_groups_flat"):
        return
    for sub_group in range(len(ds_optimizer.fp16_partitioned_groups_flat)):
        ds_optimizer._reassign_or_swap_out_partitioned_parameters(sub_group)
    persistent = ds_optimizer.persistent_parameters
    if persistent:  # drop their stale whole copies (no write-back), then gather the new partitions
        persistent[0].partition(persistent)
        persistent[0].all_gather(persistent)
    ds_optimizer.invalidate_secondary_tensor()


def adam_moments(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> dict[str, torch.Tensor]:
    """exp_avg and exp_avg_sq of this rank's parameter, whole over DP (a DP collective under ZeRO/bf16)."""
    if _is_partitioned(param):
        return {key: safe_get_full_optimizer_state(param, key).float() for key in ADAM_KEYS}
    state = optimizer.state[param]
    return {key: state[key].detach().float() for key in ADAM_KEYS}


def set_adam_moments(
    optimizer: torch.optim.Optimizer, param: nn.Parameter, moments: dict[str, torch.Tensor]
) -> None:
    """Write this rank's parameter's moments (its DP partition under ZeRO/bf16; no communication)."""
    for key in ADAM_KEYS:
        value = moments[key]
        assert tuple(value.shape) == local_shape(param), (
            key,
            value.shape,
            local_shape(param),
        )  # checked before
        if _is_partitioned(param):
            safe_set_full_optimizer_state(param, value.to(device=param.device, dtype=torch.float32), key)
        else:
            state = optimizer.state[param][key]
            state.copy_(value.to(device=state.device, dtype=state.dtype))
