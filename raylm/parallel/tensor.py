"""Megatron-style tensor parallelism: TP-region autograd functions, column/row/vocab-parallel layers and a
vocab-parallel cross-entropy in which no rank ever holds the full logits.

Every layer here takes a `TPGroup` (the process group plus this rank's index in it). A group of size 1 skips
all communication, so the same layers serve tp = 1.

With sequence parallelism (Korthikanti et al. 2022, `TPGroup.sequence_parallel`) the activations between TP
regions are split along the sequence (dim 1): (B, T / tp, C) on each rank. A TP region is entered by an
all-gather along the sequence (done once, by the norm before it: raylm.parallel.layers.SequenceParallelNorm) and
left by a reduce-scatter along the sequence instead of an all-reduce; the bytes moved are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class TPGroup:
    """A tensor-parallel group as the layers see it."""

    group: object
    rank: int
    size: int
    sequence_parallel: bool = False  # activations outside TP regions are (B, T / size, C) sequence shards


def _all_reduce(x: torch.Tensor, tp: TPGroup, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if tp.size > 1:
        dist.all_reduce(x, op=op, group=tp.group)
    return x


class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce backward (the input feeds every rank's shard, so its grads add up)."""

    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.contiguous(), ctx.tp), None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward (sum the ranks' partial outputs); identity backward."""

    @staticmethod
    def forward(ctx, x, tp):
        return _all_reduce(x.contiguous(), tp)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def all_gather_cat(x: torch.Tensor, tp: TPGroup, dim: int) -> torch.Tensor:
    """Every rank's `x` concatenated along `dim`, in rank order (x itself when tp = 1)."""
    if tp.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp.size)]
    dist.all_gather(parts, x.contiguous(), group=tp.group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, tp: TPGroup, dim: int) -> torch.Tensor:
    """This rank's slice along `dim` of the sum over ranks of `x` (list-based: gloo has no tensor variant)."""
    if tp.size == 1:
        return x
    parts = [part.contiguous() for part in x.chunk(tp.size, dim=dim)]
    out = torch.empty_like(parts[tp.rank])
    dist.reduce_scatter(out, parts, group=tp.group)
    return out


class _GatherFromTP(torch.autograd.Function):
    """Concatenate the ranks' last-dim slices forward; keep this rank's slice of the gradient backward."""

    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return all_gather_cat(x, tp, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        tp = ctx.tp
        return grad.chunk(tp.size, dim=-1)[tp.rank].contiguous(), None


class _GatherSequence(torch.autograd.Function):
    """Sequence shards (B, T / tp, C) -> the whole sequence (B, T, C) forward; reduce-scatter backward (every
    rank's TP shard of the layers after it contributes to each position's gradient)."""

    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return all_gather_cat(x, tp, dim=1)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.tp, dim=1), None


class _ReduceScatterSequence(torch.autograd.Function):
    """Partial sums (B, T, C) -> this rank's sequence shard of their sum (B, T / tp, C); all-gather backward."""

    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return _reduce_scatter(x, tp, dim=1)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_cat(grad, ctx.tp, dim=1), None


def copy_to_tp_region(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return _CopyToTP.apply(x, tp)


def reduce_from_tp_region(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return _ReduceFromTP.apply(x, tp)


def gather_from_tp_region(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return _GatherFromTP.apply(x, tp)


def gather_sequence(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return _GatherSequence.apply(x, tp)


def enter_tp_region(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """The input of a column-parallel layer. Replicated activations pass through a copy whose gradient is
    all-reduced; under sequence parallelism the norm before it has already gathered the sequence, and that
    gather's backward sums the ranks' gradients."""
    return x if tp.sequence_parallel else copy_to_tp_region(x, tp)


def leave_tp_region(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """Sum the ranks' partial outputs of a row-parallel layer: all-reduced (B, T, C), or under sequence
    parallelism reduce-scattered to this rank's sequence shard (B, T / tp, C)."""
    if tp.sequence_parallel:
        return _ReduceScatterSequence.apply(x, tp)
    return reduce_from_tp_region(x, tp)


def _split_param(shape: tuple[int, ...], tp: TPGroup, dim: int) -> nn.Parameter:
    """An uninitialised parameter holding 1/tp of `shape` along `dim`, tagged as a TP shard for DeepSpeed."""
    assert shape[dim] % tp.size == 0, (shape, dim, tp.size)  # Layout.check_model says it with the fix
    local = list(shape)
    local[dim] //= tp.size
    param = nn.Parameter(torch.empty(local))
    # An attribute torch does not declare (hence the ignore), read by the full-state gather/scatter.
    param.tp_split_dim = dim  # type: ignore[attr-defined]
    return param


class ColumnParallelLinear(nn.Module):
    """y_shard = x W_shard^T: each rank owns out_features / tp output rows; the output stays split."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.weight = _split_param((out_features, in_features), tp, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(enter_tp_region(x, self.tp), self.weight)  # (B, T, out / tp)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_shard W_shard^T: each rank owns in_features / tp input columns."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.weight = _split_param((out_features, in_features), tp, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return leave_tp_region(F.linear(x, self.weight), self.tp)  # (B, T, out), or (B, T / tp, out) under SP


class VocabParallelEmbedding(nn.Module):
    """Each rank owns a contiguous block of vocab / tp rows; lookups outside it contribute zeros."""

    def __init__(self, vocab_size: int, dim: int, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.weight = _split_param((vocab_size, dim), tp, dim=0)
        self.vocab_start = tp.rank * self.weight.size(0)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        local = idx - self.vocab_start
        outside = (local < 0) | (local >= self.weight.size(0))
        x = F.embedding(local.masked_fill(outside, 0), self.weight)  # (B, T, C)
        x = x.masked_fill(outside.unsqueeze(-1), 0.0)
        return leave_tp_region(x, self.tp)  # (B, T, C), or (B, T / tp, C) under SP


class _VocabParallelCE(torch.autograd.Function):
    """Per-token cross-entropy from vocab-split logits: three all-reduces of (N,) vectors, never (N, vocab)."""

    @staticmethod
    def forward(ctx, logits, target, vocab_start, tp, ignore_index):
        # logits (N, V/tp) in any float dtype; softmax statistics in fp32
        ctx.in_dtype = logits.dtype
        logits = logits.float()
        local_vocab = logits.size(-1)
        row_max = _all_reduce(logits.max(dim=-1).values, tp, dist.ReduceOp.MAX)  # (N,)
        shifted = logits - row_max.unsqueeze(-1)  # (N, V/tp)
        local_target = target - vocab_start
        hit = (local_target >= 0) & (local_target < local_vocab)  # target row lives on this rank
        local_target = local_target.clamp(0, local_vocab - 1)
        target_logit = shifted.gather(1, local_target.unsqueeze(1)).squeeze(1) * hit  # (N,)
        exp = shifted.exp_()  # reuse the buffer: it becomes the softmax below
        stats = _all_reduce(torch.stack((exp.sum(dim=-1), target_logit)), tp)  # (2, N)
        sum_exp, target_logit = stats[0], stats[1]
        valid = target != ignore_index
        loss = (sum_exp.log() - target_logit) * valid  # (N,)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, hit, valid)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, hit, valid = ctx.saved_tensors
        # d loss_i / d logit_ij = softmax_ij - [j is target_i]
        grad = softmax.clone()
        rows = torch.arange(grad.size(0), device=grad.device)
        grad[rows, local_target] -= hit.to(grad.dtype)
        grad.mul_((grad_loss * valid).unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None, None


def vocab_parallel_cross_entropy(
    logits_shard: torch.Tensor,
    target: torch.Tensor,
    tp: TPGroup,
    ignore_index: int = -100,
    n_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy over targets != ignore_index, from logits split over the vocab (..., V/tp).

    Equals F.cross_entropy(full_logits, target, ignore_index=ignore_index) on every TP rank; a batch with no
    valid target gives 0 (not NaN) so one empty micro-batch cannot poison a step. `n_valid` divides the sum
    instead of target's own count (a sequence slice's share of the whole window's mean).
    """
    vocab_start = tp.rank * logits_shard.size(-1)
    flat_logits = logits_shard.reshape(-1, logits_shard.size(-1))  # (N, V/tp)
    flat_target = target.reshape(-1)  # (N,)
    per_token = _VocabParallelCE.apply(flat_logits, flat_target, vocab_start, tp, ignore_index)
    if n_valid is None:
        n_valid = valid_targets(flat_target, ignore_index)
    return per_token.sum() / n_valid


def valid_targets(target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """How many targets count toward the mean (at least 1, so an empty batch divides 0 by 1)."""
    return (target != ignore_index).sum().clamp(min=1)
