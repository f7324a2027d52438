"""A rank's layers by full-model parameter name: TP slices in, full fp32 tensors out (the one gather path).

Every rank of a stage holds, for each of its parameters, one TP slice (and under ZeRO one DP partition of its
master and AdamW state). `gather_full` assembles the full tensor on every rank of the stage (a DP collective, then
a TP all-gather); `read_weights` and `shard_of` go the other way without any communication.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast, overload

import torch
import torch.nn as nn

from raylm.model.facts import layer_index
from raylm.model.weight_source import Shard, WeightSource
from raylm.parallel import param_state
from raylm.parallel.tensor import TPGroup, all_gather_cat


def named_params(layers: list[nn.Module]) -> dict[str, nn.Parameter]:
    """Parameters of the given layers keyed by their full-model names (values are TP shards where split)."""
    # name_prefix is a plain str attribute; nn.Module.__getattr__ is typed for submodules and tensors only.
    return {
        cast(str, layer.name_prefix) + local: param
        for layer in layers
        for local, param in layer.named_parameters()
    }


@dataclass
class StageLayers:
    """This rank's parameters by full-model name, and which pipeline stage owns each layer of the model."""

    params: dict[str, nn.Parameter]
    stage: int
    stage_of: Callable[[int], int]  # layer index -> the stage that owns (saves) that layer
    n_layer: int

    def by_layer(self, owned_only: bool) -> dict[int, dict[str, nn.Parameter]]:
        """{layer index: {full name: param}} in layer order; owned_only drops a tied copy another stage saves."""
        layers: dict[int, dict[str, nn.Parameter]] = {}
        for name, param in self.params.items():
            index = layer_index(name, self.n_layer)
            if not owned_only or self.stage_of(index) == self.stage:
                layers.setdefault(index, {})[name] = param
        return dict(sorted(layers.items()))


def tp_shard(param: nn.Parameter, tp: TPGroup) -> Shard | None:
    """Which slice of the full tensor this TP rank holds for `param` (None: the whole tensor)."""
    dim = getattr(param, "tp_split_dim", None)
    return None if dim is None or tp.size == 1 else Shard(dim=dim, index=tp.rank, count=tp.size)


def shard_of(full: torch.Tensor, param: nn.Parameter, tp: TPGroup) -> torch.Tensor:
    """The slice of a full tensor that this TP rank holds for `param`."""
    shard = tp_shard(param, tp)
    return full if shard is None else shard.of(full)


def full_shape(param: nn.Parameter, tp: TPGroup) -> tuple[int, ...]:
    """The unsharded shape of a (possibly TP-split) parameter."""
    shape = list(param_state.local_shape(param))
    dim = getattr(param, "tp_split_dim", None)
    if dim is not None:
        shape[dim] *= tp.size
    return tuple(shape)


def read_weights(params: dict[str, nn.Parameter], source: WeightSource, tp: TPGroup) -> None:
    """Read each parameter's own TP slice from `source` into it and any optimizer master copy (no comms); where
    raylm.parallel.sparsity attached a pruning mask, the pruned entries are read as 0. Nothing outside this rank's
    slices is ever materialized."""
    for name, param in params.items():
        shard = source.read(name, tp_shard(param, tp))
        assert tuple(shard.shape) == param_state.local_shape(param), (name, shard.shape)
        mask = getattr(param, "prune_mask", None)
        param_state.set_master_value(
            param, shard if mask is None else shard.masked_fill(~mask.to(shard.device), 0.0)
        )


def gather_tp(shard: torch.Tensor, param: nn.Parameter, tp: TPGroup) -> torch.Tensor:
    """The full tensor from every TP rank's shard (a TP collective for split parameters)."""
    dim = getattr(param, "tp_split_dim", None)
    return shard if dim is None else all_gather_cat(shard, tp, dim)


def owned_cpu(t: torch.Tensor) -> torch.Tensor:
    """A CPU fp32 copy with its own storage (torch.save of a view would write the whole flat buffer behind it)."""
    return t.detach().to("cpu", torch.float32, copy=True)


@overload
def gather_full(param: nn.Parameter, tp: TPGroup, optimizer: None = None) -> torch.Tensor: ...


@overload
def gather_full(param: nn.Parameter, tp: TPGroup, optimizer: Any) -> dict[str, torch.Tensor]: ...


def gather_full(param: nn.Parameter, tp: TPGroup, optimizer=None) -> torch.Tensor | dict[str, torch.Tensor]:
    """The full fp32 master of `param` on every rank of its stage, on the parameter's device (DP then TP
    collectives), or with `optimizer` its full AdamW moments {exp_avg, exp_avg_sq}. Every rank of the stage must
    call, in the same order."""
    if optimizer is None:
        return gather_tp(param_state.master_value(param), param, tp)
    moments = param_state.adam_moments(optimizer, param)
    return {key: gather_tp(value, param, tp) for key, value in moments.items()}


def tag_for_grad_norm(module: nn.Module, tp: TPGroup) -> None:
    """Mark which parameters count toward the global gradient norm, so each element counts exactly once.

    DeepSpeed counts `model_parallel` parameters on every rank of the pipe x TP group and the rest only on
    that group's rank 0; with pp > 1 that would drop later stages' replicated norms. So: TP shards count
    everywhere, replicated parameters on TP rank 0 only, and the last stage's copy of a tied weight never.
    """
    for param in module.parameters():
        replicated_copy = getattr(param, "ds_pipe_replicated", False)
        is_shard = hasattr(param, "tp_split_dim")
        # DeepSpeed reads this attribute; torch does not declare it (hence the ignore).
        counted = not replicated_copy and (is_shard or tp.rank == 0)
        param.model_parallel = counted  # type: ignore[attr-defined]
