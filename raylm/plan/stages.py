"""The model as the planner sees it: parameters and FLOPs per pipeline layer, and each stage's share of them.

Layers are the pipeline's list [embedding, block 0 .. L-1, final norm, head] (raylm.model.facts numbers it).
Stages are cut as raylm.parallel.pipeline cuts them: DeepSpeed's balanced linear partition of each layer's
training FLOPs (parallel.partition=compute) or its parameters, or equal layer counts (uniform); the two
functions below follow DeepSpeed's `partition_balanced` and `partition_uniform`, and
tests/unit/test_plan_stages.py checks them against DeepSpeed's own.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from raylm.config.derived import ffn_hidden, kv_heads, padded_vocab
from raylm.config.schema import Config, ModelConfig
from raylm.model.facts import layer_costs, model_layers


@dataclass(frozen=True)
class ModelShape:
    """Per-layer parameter counts (whole, and one TP rank's shard) and training FLOPs per token."""

    params: tuple[int, ...]  # whole layer, in layer order; a tied head counts 0 (it is the embedding)
    shard_params: tuple[int, ...]  # one TP rank's share: matrices / tp, norms whole
    flops: tuple[int, ...]  # training FLOPs per token (fwd + bwd), raylm.model.facts.layer_costs
    tied: bool
    d_model: int
    kv_dim: int  # key/value width: n_kv_head * head size
    ffn: int
    n_head: int
    vocab: int  # padded vocab (embedding rows)
    seq_len: int

    @property
    def n_layer(self) -> int:
        return len(self.params) - 3

    @property
    def total_params(self) -> int:
        return sum(self.params)

    @property
    def largest_layer(self) -> int:
        return max(self.params)


def model_shape(cfg: Config, tp: int) -> ModelShape:
    """The shape of `cfg`'s model for one TP degree."""
    return _model_shape(cfg.model, cfg.data.vocab_size, cfg.data.seq_len, tp)


@functools.lru_cache(maxsize=64)
def _model_shape(model: ModelConfig, vocab_size: int, seq_len: int, tp: int) -> ModelShape:
    vocab = padded_vocab(vocab_size)
    layers = model_layers(model, vocab)
    count = 3 + model.n_layer
    params = [0] * count
    shard = [0] * count
    for index, shapes in layers.items():
        for name, shape in shapes.items():
            size = math.prod(shape)
            params[index] += size
            shard[index] += size if name.endswith("norm.weight") else size // tp
    return ModelShape(
        params=tuple(params),
        shard_params=tuple(shard),
        flops=tuple(layer_costs(model, vocab, seq_len)),
        tied=model.tie_embeddings,
        d_model=model.d_model,
        kv_dim=kv_heads(model) * (model.d_model // model.n_head),
        ffn=ffn_hidden(model),
        n_head=model.n_head,
        vocab=vocab,
        seq_len=seq_len,
    )


def partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """Stage boundaries of `num_parts` parts of (nearly) equal item counts, the first parts one larger."""
    if num_items <= num_parts:
        return [min(p, num_items) for p in range(num_parts + 1)]
    chunk, residual = divmod(num_items, num_parts)
    return [p * chunk + min(p, residual) for p in range(num_parts + 1)]


def partition_balanced(weights: list[int], num_parts: int) -> list[int]:
    """Boundaries that minimise the spread (heaviest minus lightest part) of contiguous parts' sums, ties to
    the later cut: DeepSpeed's linear-partition dynamic programme, which its pipeline uses."""
    n, m = len(weights), num_parts
    if n <= m:
        return partition_uniform(n, m)
    inf = math.inf
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    top = [[inf] * (m + 1) for _ in range(n + 1)]
    low = [[inf] * (m + 1) for _ in range(n + 1)]
    cost = [[inf] * (m + 1) for _ in range(n + 1)]
    cut = [[0] * (m + 1) for _ in range(n + 1)]
    top[0][0] = cost[0][0] = 0
    for i in range(1, n + 1):
        for j in range(1, min(i, m) + 1):
            for k in range(i):
                part = prefix[i] - prefix[k]
                hi, lo = max(top[k][j - 1], part), min(low[k][j - 1], part)
                if cost[i][j] >= hi - lo:
                    cost[i][j], top[i][j], low[i][j], cut[i][j] = hi - lo, hi, lo, k
    parts = [n]
    for j in range(m, 0, -1):
        parts.append(cut[parts[-1]][j])
    return parts[::-1]


def stage_bounds(shape: ModelShape, pp: int, partition: str) -> tuple[int, ...]:
    """The first layer index of each stage, and the layer count at the end (pp + 1 numbers)."""
    return _stage_bounds(shape, pp, partition)


@functools.lru_cache(maxsize=256)
def _stage_bounds(shape: ModelShape, pp: int, partition: str) -> tuple[int, ...]:
    if partition == "uniform":
        return tuple(partition_uniform(len(shape.params), pp))
    if partition == "compute":
        weights = list(shape.flops)
    else:  # parameters: DeepSpeed counts each built layer's own, a tied head as the embedding it holds
        weights = list(shape.shard_params)
        if shape.tied:
            weights[-1] = shape.shard_params[0]
    return tuple(partition_balanced(weights, pp))


@dataclass(frozen=True)
class Stage:
    """One pipeline stage of one TP rank: its layers and what they weigh."""

    index: int
    blocks: int  # transformer blocks on it
    params: int  # this rank's parameters (TP shard), a tied embedding on both end stages
    flops_per_token: int  # training FLOPs per token of its layers (whole layers; / tp per rank)
    block_flops_per_token: int  # the blocks' part of that (recomputed once more under checkpointing)
    first: bool
    last: bool


def stages(shape: ModelShape, pp: int, partition: str) -> list[Stage]:
    """Every stage of a pp-stage pipeline (pp = 1: one stage holding every layer)."""
    bounds = stage_bounds(shape, pp, partition)
    out = []
    n = shape.n_layer
    for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        params = sum(shape.shard_params[start:end])
        last = s == pp - 1
        if shape.tied and last and pp > 1:
            params += shape.shard_params[0]  # the last stage builds its own copy of the tied embedding
        blocks = sum(1 for i in range(start, end) if 1 <= i <= n)
        block_flops = sum(shape.flops[i] for i in range(start, end) if 1 <= i <= n)
        out.append(
            Stage(
                index=s,
                blocks=blocks,
                params=params,
                flops_per_token=sum(shape.flops[start:end]),
                block_flops_per_token=block_flops,
                first=s == 0,
                last=last,
            )
        )
    return out
