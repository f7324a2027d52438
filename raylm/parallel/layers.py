"""Pipeline layers built from the model's own classes, with Megatron tensor parallelism applied from outside.

Each layer maps (B, T) token ids or (B, T, C) activations to the next stage's input and knows the full-model
name of its parameters (`name_prefix` + local name), which is how full weights are scattered and gathered.
Under sequence parallelism the activations between layers are each TP rank's sequence shard (B, T / tp, C), so
a pipeline stage sends and receives 1/tp of the activation on every TP rank.
Under data.document_mask the input is the tuple (tokens, doc_ids, positions) and the activations travel as
(x, doc_ids, positions) up to the final norm: DeepSpeed's pipeline sends integer tensors along and no gradient
back for them, so every stage builds its blocks' document masks itself.
Under context parallelism (raylm.parallel.context, pp = 1) every layer takes the whole window's tokens, labels
and document boundaries, and the activations are this CP rank's slice of the positions (B, T / cp, C).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from raylm.config.schema import ModelConfig
from raylm.model.gpt import Block, RMSNorm, document_attention, meta_modules
from raylm.model.rope import model_rope_tables
from raylm.parallel.context import NO_CP, CPGroup, apply_context_parallel
from raylm.parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    TPGroup,
    VocabParallelEmbedding,
    copy_to_tp_region,
    enter_tp_region,
    gather_sequence,
    valid_targets,
    vocab_parallel_cross_entropy,
)

# Which of a Block's linears are split by output rows (column) or input columns (row). Column then row keeps
# one all-reduce per sub-layer in each direction: heads and the SwiGLU width are what get split.
TP_PLAN = {
    "attention.wq": ColumnParallelLinear,
    "attention.wk": ColumnParallelLinear,
    "attention.wv": ColumnParallelLinear,
    "attention.wo": RowParallelLinear,
    "feed_forward.w1": ColumnParallelLinear,
    "feed_forward.w3": ColumnParallelLinear,
    "feed_forward.w2": RowParallelLinear,
}


# The norms before each TP region: under sequence parallelism they run on sequence shards and gather.
SEQUENCE_PARALLEL_NORMS = ("attention_norm", "ffn_norm")


def apply_tensor_parallel(module: nn.Module, plan: dict, tp: TPGroup) -> None:
    """Swap each planned nn.Linear of `module` for its TP version of the same full shape; under sequence
    parallelism also each norm of SEQUENCE_PARALLEL_NORMS for a SequenceParallelNorm."""
    for path, parallel_cls in plan.items():
        parent_path, _, attr = path.rpartition(".")
        parent = module.get_submodule(parent_path)
        dense = getattr(parent, attr)
        setattr(parent, attr, parallel_cls(dense.in_features, dense.out_features, tp))
    if tp.sequence_parallel:
        for path in SEQUENCE_PARALLEL_NORMS:
            norm = module.get_submodule(path)
            assert isinstance(norm, RMSNorm), (path, norm)
            module.set_submodule(path, SequenceParallelNorm(norm.weight.numel(), norm.eps, tp))


class SequenceParallelNorm(RMSNorm):
    """An RMSNorm between TP regions. Without sequence parallelism it is the plain, replicated norm. With it, it
    normalizes this rank's sequence shard (B, T / tp, C) and gathers the whole sequence (B, T, C) for the
    column-parallel layers after it (one all-gather per region, whose backward reduce-scatters). Its gain then
    sees only this shard's tokens, so the gain's gradient is all-reduced over TP (copy_to_tp_region) to be the
    whole sequence's, as every TP rank's replicated copy must be."""

    def __init__(self, dim: int, eps: float, tp: TPGroup):
        super().__init__(dim, eps)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.tp.sequence_parallel:
            return super().forward(x)  # (B, T, C)
        y = self.normalize(x) * copy_to_tp_region(self.weight, self.tp)  # (B, T / tp, C)
        return gather_sequence(y, self.tp)  # (B, T, C)


class EmbeddingPipe(VocabParallelEmbedding):
    """Token ids (B, T) -> embeddings (B, T, C), vocab split over TP; under CP of this rank's slice only."""

    name_prefix = "tok_embeddings."

    def __init__(self, cfg: ModelConfig, vocab_size: int, tp: TPGroup, cp: CPGroup = NO_CP):
        super().__init__(vocab_size, cfg.d_model, tp)
        self.cp = cp

    def forward(self, inputs):  # tokens (B, T), or (tokens, doc_ids, positions)
        if isinstance(inputs, tuple):
            tokens, *documents = inputs
            x = super().forward(self.cp.local(tokens))  # (B, T / cp, C)
            return (x, *documents)  # the whole window's doc_ids and positions passed along
        return super().forward(self.cp.local(inputs))  # (B, T / cp, C)


class BlockPipe(Block):
    """One transformer block with its linears TP-split; holds its own RoPE tables so it maps x -> x."""

    rope_cos: torch.Tensor  # buffers (register_buffer), declared for the type checker
    rope_sin: torch.Tensor

    def __init__(self, cfg: ModelConfig, layer_idx: int, tp: TPGroup, cp: CPGroup = NO_CP):
        with meta_modules():  # the dense linears are replaced at once: never allocate them
            super().__init__(cfg)
        apply_tensor_parallel(self, TP_PLAN, tp)
        apply_context_parallel(self, cp)
        self.to_empty(device="cpu")  # norms leave meta; every weight is loaded from the full state next
        self.name_prefix = f"layers.{layer_idx}."
        self.sequence_shards = (
            tp.size if tp.sequence_parallel else 1
        )  # x holds T / cp / sequence_shards positions
        self.cp = cp
        cos, sin = model_rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    # A pipeline stage maps x -> x (its RoPE tables are its own), so it narrows Block.forward on purpose.
    def forward(self, x):  # type: ignore[override]  # (B, T, C) ((B, T / tp, C) under SP), or (x, doc_ids, positions)
        if isinstance(x, tuple):  # data.document_mask (not with sequence parallelism: raylm.config.validate)
            x, doc_ids, positions = x  # doc_ids, positions (B, T): the whole window's, also under CP
            mask, cos, sin = document_attention(doc_ids, positions, self.rope_cos, self.rope_sin)
            cos, sin = self.cp.local(cos), self.cp.local(sin)  # (B, T / cp, hd/2): this slice's positions
            return super().forward(x, cos, sin, mask=mask), doc_ids, positions
        T = x.size(1) * self.sequence_shards  # the TP region's (gathered) sequence: this CP rank's slice
        rows = slice(self.cp.start(T), self.cp.start(T) + T)
        return super().forward(x, self.rope_cos[rows], self.rope_sin[rows])


class FinalNormPipe(SequenceParallelNorm):
    """The final RMSNorm (replicated over TP; under sequence parallelism it gathers the sequence for the head)."""

    name_prefix = "norm."

    def __init__(self, cfg: ModelConfig, tp: TPGroup):
        super().__init__(cfg.d_model, cfg.norm_eps, tp)

    def forward(self, x):  # (B, T, C), or (x, doc_ids, positions): the documents end here
        return super().forward(x[0] if isinstance(x, tuple) else x)  # (B, T, C)


class HeadPipe(ColumnParallelLinear):
    """Untied LM head: (B, T, C) -> this rank's logits (B, T, vocab / tp); the full logits never exist."""

    name_prefix = "output."

    def __init__(self, cfg: ModelConfig, vocab_size: int, tp: TPGroup):
        super().__init__(cfg.d_model, vocab_size, tp)


def tied_head_forward(embedding: EmbeddingPipe, x: torch.Tensor) -> torch.Tensor:
    """Tied LM head on the last stage: logits (B, T, vocab / tp) from the embedding's own vocab shard."""
    return F.linear(enter_tp_region(x, embedding.tp), embedding.weight)


class VocabParallelLoss:
    """The pipeline's loss_fn: mean cross-entropy from vocab-split logits, ignoring label -100. Under CP the
    logits are this rank's slice and the labels the whole window's: the loss is the slice's share of the
    window's mean (its tokens' sum over the window's target count), so the CP ranks' losses add up to it."""

    def __init__(self, tp: TPGroup, cp: CPGroup = NO_CP):
        self.tp, self.cp = tp, cp
        self.__name__ = "vocab_parallel_cross_entropy"  # DeepSpeed prints the loss function's name
        self.on_loss: Callable[[torch.Tensor], torch.Tensor] | None = None  # sees (and may replace) each loss

    def __call__(self, logits_shard: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n_valid = valid_targets(labels) if self.cp.size > 1 else None  # the whole window's targets
        loss = vocab_parallel_cross_entropy(logits_shard, self.cp.local(labels), self.tp, n_valid=n_valid)
        return self.on_loss(loss) if self.on_loss is not None else loss


def compile_blocks(module: nn.Module) -> None:
    """torch.compile every transformer block of `module` in place (train.compile): the norms, RoPE and SwiGLU
    elementwise work fuses, while the TP collectives stay where they are (compiled code calls them in order)."""
    for block in module.modules():
        if isinstance(block, BlockPipe):
            block.compile()
