"""The GPT's pipeline layer list, as a DeepSpeed PipelineModule over (pp, tp, dp) or, for pp = 1, as one module.

Layer order: [embedding, block 0 .. block L-1, final norm, head] (raylm.model.facts.layer_index numbers it).
With tied embeddings the first and last entries are TiedLayerSpecs of one key, so DeepSpeed all-reduces the shared
weight's gradient between the first and last stages; with pp = 1 both uses hit one module and autograd adds them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import cast

import torch
import torch.nn as nn
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.activation_checkpointing.checkpointing import checkpoint
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from deepspeed.runtime.zero import register_external_parameter

from raylm.config.schema import ModelConfig
from raylm.model.facts import layer_costs
from raylm.parallel.context import NO_CP, CPGroup
from raylm.parallel.layers import (
    BlockPipe,
    EmbeddingPipe,
    FinalNormPipe,
    HeadPipe,
    VocabParallelLoss,
    tied_head_forward,
)
from raylm.parallel.tensor import TPGroup
from raylm.parallel.topology import Topology

TIED_KEY = "embed"


def layer_specs(cfg: ModelConfig, vocab_size: int, tp: TPGroup, cp: CPGroup = NO_CP) -> list[LayerSpec]:
    """The ordered pipeline layers; DeepSpeed builds only the ones on this rank's stage."""
    if cfg.tie_embeddings:
        first = TiedLayerSpec(TIED_KEY, EmbeddingPipe, cfg, vocab_size, tp, cp)
        last = TiedLayerSpec(TIED_KEY, EmbeddingPipe, cfg, vocab_size, tp, cp, forward_fn=tied_head_forward)
    else:
        first = LayerSpec(EmbeddingPipe, cfg, vocab_size, tp, cp)
        last = LayerSpec(HeadPipe, cfg, vocab_size, tp)
    blocks = [LayerSpec(BlockPipe, cfg, i, tp, cp) for i in range(cfg.n_layer)]
    return [first, *blocks, LayerSpec(FinalNormPipe, cfg, tp), last]


class ComputeBalancedPipeline(PipelineModule):
    """A PipelineModule whose stages balance given per-layer costs instead of parameter counts.

    DeepSpeed balances the list `_count_layer_params` returns (partition_method="parameters"); this class
    returns the costs instead."""

    def __init__(self, *, costs: list[int], **kwargs):
        object.__setattr__(self, "_layer_costs", list(costs))  # read by the base __init__, before Module's
        super().__init__(partition_method="parameters", **kwargs)

    def _count_layer_params(self) -> list[int]:
        return self._layer_costs


def ds_topology(topo: Topology) -> PipeModelDataParallelTopology:
    """DeepSpeed's topology with the same axis order as `topo`."""
    return PipeModelDataParallelTopology(num_pp=topo.pp, num_mp=topo.tp, num_dp=topo.dp)


def build_pipeline_module(
    cfg: ModelConfig,
    vocab_size: int,
    seq_len: int,
    partition: str,
    recompute: bool,
    topo: Topology,
    tp: TPGroup,
) -> PipelineModule:
    """A PipelineModule over DeepSpeed's topology, split into stages by `partition` (compute, parameters or
    uniform); `recompute` checkpoints each block's activations."""
    if partition == "compute":
        pipeline_class = functools.partial(
            ComputeBalancedPipeline, costs=layer_costs(cfg, vocab_size, seq_len)
        )
    else:
        pipeline_class = functools.partial(PipelineModule, partition_method=partition)
    # no_grad: building it broadcasts the tied embedding between the first and last stage in place; under grad
    # mode that records c10d::broadcast_ (which has no autograd kernel) on the parameter, and autograd warns of
    # "silently incorrect behavior" at every backward. A copy-in at construction has nothing to differentiate.
    with torch.no_grad():
        return pipeline_class(
            layers=layer_specs(cfg, vocab_size, tp),
            topology=ds_topology(topo),
            loss_fn=VocabParallelLoss(tp),
            # interval 1 = recompute each block; only blocks qualify, since reentrant checkpointing of the
            # embedding (whose input is integer ids) would drop its gradient
            activation_checkpoint_interval=1 if recompute else 0,
            checkpointable_layers=[BlockPipe.__name__],
        )


def stage_layers(pipe: PipelineModule) -> list[nn.Module]:
    """This stage's layer modules, each once, in layer order."""
    parts, stage = pipe.partitions(), pipe.stage_id
    layers: list[nn.Module] = []
    for idx in range(parts[stage], parts[stage + 1]):
        # tied layers live in pipe.tied_modules; the others are registered under their layer index
        try:
            module = pipe.get_submodule(str(idx))
        except AttributeError:
            module = pipe.tied_modules[TIED_KEY]
        if all(module is not seen for seen in layers):
            layers.append(module)
    return layers


class TiedHead(nn.Module):
    """The tied LM head when pp = 1: the embedding's own weight, which stays registered once (as layer 0's)."""

    embedding: EmbeddingPipe  # set with object.__setattr__ below, declared for the type checker

    def __init__(self, embedding: EmbeddingPipe):
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # not a submodule: its weight must not appear twice
        register_external_parameter(
            self, embedding.weight
        )  # ZeRO-3 gathers it around this forward; else a no-op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tied_head_forward(self.embedding, x)  # (B, T, vocab / tp)


def _as_tuple(x) -> tuple:
    """checkpoint's arguments: a tuple's items, or the one tensor."""
    return x if isinstance(x, tuple) else (x,)


def _unpacked(layer: nn.Module) -> Callable:
    """layer as checkpoint calls it, with its tuple input spread into arguments (as PipelineModule does)."""
    return lambda *args: layer(args if len(args) > 1 else args[0])


class SingleStage(nn.Module):
    """The whole layer list as one module (pp = 1), for DeepSpeed's plain engine: any ZeRO stage, no pipeline."""

    def __init__(
        self,
        cfg: ModelConfig,
        vocab_size: int,
        tp: TPGroup,
        recompute: bool,
        on_built: Callable[[nn.Module], None] | None = None,
        cp: CPGroup = NO_CP,
    ):
        """`on_built(layer)` runs on each layer right after it is built, before the next (ZeRO-3 partitions it);
        `cp` splits each window's positions (raylm.parallel.context)."""
        super().__init__()
        built: dict[str, nn.Module] = {}
        layers = []
        for spec in layer_specs(cfg, vocab_size, tp, cp):
            tied_key = getattr(spec, "key", None)
            if tied_key in built:
                layers.append(TiedHead(cast(EmbeddingPipe, built[tied_key])))  # only the embedding is tied
                continue
            layers.append(spec.build(log=False))
            if on_built is not None:
                on_built(layers[-1])
            if tied_key is not None:
                built[tied_key] = layers[-1]
        self.layers = nn.ModuleList(layers)
        self.loss_fn = VocabParallelLoss(tp, cp)
        self.recompute = recompute

    def forward(self, inputs, labels: torch.Tensor) -> torch.Tensor:
        x = inputs  # (B, T) token ids, then (B, T, C) activations, then (B, T, vocab / tp) logits
        # with document masks x is a tuple (x, doc_ids, positions) up to the final norm (raylm.parallel.layers)
        for layer in self.layers:
            if self.recompute and isinstance(layer, BlockPipe):
                x = checkpoint(_unpacked(layer), *_as_tuple(x))
            else:
                x = layer(x)
        return self.loss_fn(x, labels)

    def stage_layers(self) -> list[nn.Module]:
        """Every layer holding parameters, each once, in layer order (the tied head is the embedding)."""
        return [layer for layer in self.layers if not isinstance(layer, TiedHead)]
