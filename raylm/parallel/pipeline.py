"""The GPT as a DeepSpeed PipelineModule over (pp, tp, dp), and full weights scattered into / gathered from it.

Layer order: [embedding, block 0 .. block L-1, final norm, head]. With tied embeddings the first and last
entries are TiedLayerSpecs of one key, so DeepSpeed all-reduces the shared weight's gradient between the first
and last stages; with pp = 1 both uses hit one module and autograd adds them.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
import torch.nn as nn
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

from raylm.config.schema import Config, ModelConfig
from raylm.model.gpt import param_shapes
from raylm.model.weights import Shard, WeightSource
from raylm.parallel.layers import (BlockPipe, EmbeddingPipe, FinalNormPipe, HeadPipe, VocabParallelLoss,
                                   tied_head_forward)
from raylm.parallel.tensor import TPGroup
from raylm.parallel.topology import Topology

TIED_KEY = "embed"


def layer_specs(cfg: Config, vocab_size: int, tp: TPGroup) -> list[LayerSpec]:
    """The ordered pipeline layers; DeepSpeed builds only the ones on this rank's stage."""
    m = cfg.model
    if m.tie_embeddings:
        first = TiedLayerSpec(TIED_KEY, EmbeddingPipe, m, vocab_size, tp)
        last = TiedLayerSpec(TIED_KEY, EmbeddingPipe, m, vocab_size, tp, forward_fn=tied_head_forward)
    else:
        first = LayerSpec(EmbeddingPipe, m, vocab_size, tp)
        last = LayerSpec(HeadPipe, m, vocab_size, tp)
    blocks = [LayerSpec(BlockPipe, m, i, tp) for i in range(m.n_layer)]
    return [first, *blocks, LayerSpec(FinalNormPipe, m), last]


def layer_costs(cfg: ModelConfig, vocab_size: int, seq_len: int) -> list[int]:
    """Training FLOPs per token of each entry of layer_specs: what `parallel.partition=compute` balances.

    A block costs 6 x its weights plus its attention scores; the head 6·V·d; the embedding (a lookup) and the
    final norm nothing. Parameter counts would weigh the embedding like the head and leave the last stage
    the slowest, and the slowest stage sets the pipeline's pace."""
    shapes = param_shapes(cfg, vocab_size)
    block_weights = sum(math.prod(shape) for name, shape in shapes.items() if name.startswith("layers.0."))
    block = 6 * block_weights + 12 * cfg.d_model * seq_len
    return [0, *[block] * cfg.n_layer, 0, 6 * vocab_size * cfg.d_model]


class ComputeBalancedPipeline(PipelineModule):
    """A PipelineModule whose stages balance given per-layer costs instead of parameter counts.

    DeepSpeed balances the list `_count_layer_params` returns (partition_method="parameters"); this class
    returns the costs instead."""

    def __init__(self, *, costs: list[int], **kwargs):
        object.__setattr__(self, "_layer_costs", list(costs))  # read by the base __init__, before Module's
        super().__init__(partition_method="parameters", **kwargs)

    def _count_layer_params(self) -> list[int]:
        return self._layer_costs


def build_pipeline_module(cfg: Config, vocab_size: int, topo: Topology, tp: TPGroup) -> PipelineModule:
    """A PipelineModule over DeepSpeed's topology with the same axis order as `topo`, split into stages by
    `parallel.partition` (compute, parameters or uniform)."""
    ds_topo = PipeModelDataParallelTopology(num_pp=topo.pp, num_mp=topo.tp, num_dp=topo.dp)
    if cfg.parallel.partition == "compute":
        pipeline_class = functools.partial(ComputeBalancedPipeline,
                                           costs=layer_costs(cfg.model, vocab_size, cfg.data.seq_len))
    else:
        pipeline_class = functools.partial(PipelineModule, partition_method=cfg.parallel.partition)
    return pipeline_class(
        layers=layer_specs(cfg, vocab_size, tp),
        topology=ds_topo,
        loss_fn=VocabParallelLoss(tp),
        # interval 1 = recompute each block; only blocks qualify, since reentrant checkpointing of the
        # embedding (whose input is integer ids) would drop its gradient
        activation_checkpoint_interval=1 if cfg.parallel.activation_checkpointing else 0,
        checkpointable_layers=[BlockPipe.__name__],
    )


def local_layers(pipe: PipelineModule) -> list[nn.Module]:
    """This stage's layer modules, each once (a tied module used twice with pp = 1 appears once)."""
    parts, stage = pipe.partitions(), pipe.stage_id
    layers: list[nn.Module] = []
    for idx in range(parts[stage], parts[stage + 1]):
        # tied layers live in pipe.tied_modules; the others are registered under their layer index
        module = pipe.tied_modules[TIED_KEY] if str(idx) not in pipe._modules else pipe.get_submodule(str(idx))
        if all(module is not seen for seen in layers):
            layers.append(module)
    return layers


def local_params(pipe: PipelineModule) -> dict[str, nn.Parameter]:
    """This rank's parameters keyed by their full-model names (values are TP shards where split)."""
    params = {}
    for module in local_layers(pipe):
        for local_name, param in module.named_parameters():
            params[module.name_prefix + local_name] = param
    return params


def shard_of(full: torch.Tensor, param: nn.Parameter, tp: TPGroup) -> torch.Tensor:
    """The slice of a full tensor that this TP rank holds for `param`."""
    dim = getattr(param, "tp_split_dim", None)
    return full if dim is None else full.chunk(tp.size, dim=dim)[tp.rank]


def tp_shard(param: nn.Parameter, tp: TPGroup) -> Shard | None:
    """Which slice of the full tensor this TP rank holds for `param` (None: the whole tensor)."""
    dim = getattr(param, "tp_split_dim", None)
    return None if dim is None or tp.size == 1 else Shard(dim=dim, index=tp.rank, count=tp.size)


def load_weights(pipe: PipelineModule, source: WeightSource, tp: TPGroup) -> None:
    """Read this rank's parameters, only its own TP slices, from `source` into the module and any optimizer
    master copy (no comms). Nothing outside this stage's shard is ever materialized."""
    with torch.no_grad():
        for name, param in local_params(pipe).items():
            shard = source.read(name, tp_shard(param, tp)).to(device=param.device, dtype=torch.float32)
            assert shard.shape == param.shape, (name, shard.shape, param.shape)
            param.copy_(shard)
            safe_set_full_fp32_param(param, shard)  # ZeRO / bf16 master copies; no-op before initialize


def _fp32_value(param: nn.Parameter) -> torch.Tensor:
    """The fp32 master value of a parameter (a DP collective under ZeRO or bf16), else the parameter itself."""
    master = safe_get_full_fp32_param(param)
    return (param.detach() if master is None else master).float()


def gather_tp(shard: torch.Tensor, param: nn.Parameter, tp: TPGroup) -> torch.Tensor:
    """The full tensor from every TP rank's shard (a TP collective for split parameters)."""
    dim = getattr(param, "tp_split_dim", None)
    if dim is None or tp.size == 1:
        return shard
    parts = [torch.empty_like(shard) for _ in range(tp.size)]
    dist.all_gather(parts, shard.contiguous(), group=tp.group)
    return torch.cat(parts, dim=dim)


def owner_layer(name: str, n_layer: int) -> int:
    """Index in the layer list of the layer that owns a full-model parameter name (tied: the embedding)."""
    if name.startswith("layers."):
        return 1 + int(name.split(".")[1])
    return {"tok_embeddings": 0, "norm": n_layer + 1, "output": n_layer + 2}[name.split(".")[0]]


def gather_full_weights(pipe: PipelineModule, cfg: Config, vocab_size: int, topo: Topology,
                        tp: TPGroup) -> dict[str, torch.Tensor]:
    """Full fp32 CPU tensors on every rank; every rank must call (TP gathers, then a broadcast per tensor)."""
    params = local_params(pipe)
    my_stage = pipe.stage_id
    device = next(iter(params.values())).device
    full = {}
    for name, shape in param_shapes(cfg.model, vocab_size).items():
        owner_stage = pipe.stage_owner(owner_layer(name, cfg.model.n_layer))
        if owner_stage == my_stage:
            value = gather_tp(_fp32_value(params[name]), params[name], tp)
        else:
            value = torch.empty(shape, dtype=torch.float32, device=device)
        dist.broadcast(value, src=topo.rank_of(owner_stage, 0, 0))
        full[name] = value.cpu()
    return full


def tag_for_grad_norm(pipe: PipelineModule, tp: TPGroup) -> None:
    """Mark which parameters count toward the global gradient norm, so each element counts exactly once.

    DeepSpeed counts `model_parallel` parameters on every rank of the pipe x TP group and the rest only on
    that group's rank 0; with pp > 1 that would drop later stages' replicated norms. So: TP shards count
    everywhere, replicated parameters on TP rank 0 only, and the last stage's copy of a tied weight never.
    """
    for param in pipe.parameters():
        replicated_copy = getattr(param, "ds_pipe_replicated", False)
        is_shard = hasattr(param, "tp_split_dim")
        param.model_parallel = not replicated_copy and (is_shard or tp.rank == 0)
