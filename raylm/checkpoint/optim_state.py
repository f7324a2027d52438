"""One rank's AdamW state per parameter, the same way for plain AdamW, ZeRO-1 partitions and bf16 fp32 masters.

Without ZeRO or bf16, DeepSpeed steps our torch AdamW on the parameters themselves: the state is keyed by
parameter. With ZeRO-1 (or bf16, whose optimizer also partitions over DP) AdamW steps flat fp32 partitions, one
per param group; each parameter's `_hp_mapping` locates its slice, and DeepSpeed's safe_get/set_full_* calls
assemble or scatter a whole (TP-shard-sized) tensor with one all-reduce over the DP group.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_set_full_fp32_param,
                             safe_set_full_optimizer_state)

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def _is_partitioned(param: nn.Parameter) -> bool:
    """True when DeepSpeed keeps this parameter's fp32 master and AdamW state in flat DP partitions."""
    return hasattr(param, "_hp_mapping")


def _zero_adam_state(param: torch.Tensor, group: dict) -> dict:
    """The state torch.optim.AdamW creates on its first step (torch 2.x), so a load can fill it before any step."""
    if group.get("capturable") or group.get("fused"):
        step = torch.zeros((), dtype=torch.float32, device=param.device)
    else:
        step = torch.tensor(0.0, dtype=torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32)
    return {"step": step, "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format)}


def ensure_adam_state(engine) -> None:
    """Create AdamW's (zero) state where no step has yet, and link DeepSpeed's per-parameter views to it.

    Equivalent to what the first optimizer step does; needed before state can be read or written.
    """
    optimizer = engine.optimizer
    for group in optimizer.param_groups:
        assert not group.get("amsgrad"), "build_optimizer never enables amsgrad; its extra state is not saved"
        for param in group["params"]:
            if not optimizer.state[param]:
                optimizer.state[param] = _zero_adam_state(param, group)
    # ZeRO and bf16 link each parameter's fragment to the flat state once, lazily. DeepSpeed 0.19.8's ZeRO does
    # it right after stepping param group 0, before group 1 has state, so group 1's parameters end up linked to
    # nothing ("exp_avg not found in optimizer state fragment"). Relinking now, with every group's state in
    # place, is always safe: the links are views of state tensors that AdamW updates in place.
    ds_optimizer = engine.ds.optimizer
    if hasattr(ds_optimizer, "_lazy_init_hp_params_optimizer_state"):
        ds_optimizer._hp_optimizer_states_linked = False
        ds_optimizer._lazy_init_hp_params_optimizer_state()


def adam_step(engine) -> int:
    """AdamW's step count (every parameter steps together, so any state entry tells)."""
    steps = {int(state["step"]) for state in engine.optimizer.state.values() if "step" in state}
    assert len(steps) <= 1, f"parameters disagree on the AdamW step: {sorted(steps)}"
    return steps.pop() if steps else 0


def set_adam_step(engine, step: int) -> None:
    for state in engine.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"].fill_(step)
        elif "step" in state:
            state["step"] = step


def reset_adam_moments(engine) -> None:
    """A fresh optimizer: zero moments and step count (loading weights that came without optimizer state)."""
    for state in engine.optimizer.state.values():
        for key in ADAM_KEYS:
            state[key].zero_()
    set_adam_step(engine, 0)


def master_value(param: nn.Parameter) -> torch.Tensor:
    """The fp32 value of this rank's (TP-shard) parameter: its master copy under ZeRO/bf16 (a DP collective)."""
    master = safe_get_full_fp32_param(param)
    return (param.detach() if master is None else master).float()


def set_master_value(param: nn.Parameter, value: torch.Tensor) -> None:
    """Set the parameter and, under ZeRO/bf16, this rank's slice of its fp32 master (no communication)."""
    value = value.to(device=param.device, dtype=torch.float32)
    with torch.no_grad():
        param.copy_(value)  # bf16 parameters round to nearest, as DeepSpeed's own master -> model copy does
    safe_set_full_fp32_param(param, value)


def adam_moments(engine, param: nn.Parameter) -> dict[str, torch.Tensor]:
    """exp_avg and exp_avg_sq of this rank's parameter, whole over DP (a DP collective under ZeRO/bf16)."""
    if _is_partitioned(param):
        return {key: safe_get_full_optimizer_state(param, key).float() for key in ADAM_KEYS}
    state = engine.optimizer.state[param]
    return {key: state[key].detach().float() for key in ADAM_KEYS}


def set_adam_moments(engine, param: nn.Parameter, moments: dict[str, torch.Tensor]) -> None:
    """Write this rank's parameter's moments (its DP partition under ZeRO/bf16; no communication)."""
    for key in ADAM_KEYS:
        value = moments[key]
        assert value.shape == param.shape, (key, value.shape, param.shape)  # shapes are checked before loading
        if _is_partitioned(param):
            safe_set_full_optimizer_state(param, value.to(device=param.device, dtype=torch.float32), key)
        else:
            state = engine.optimizer.state[param][key]
            state.copy_(value.to(device=state.device, dtype=state.dtype))
