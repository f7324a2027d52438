"""Rank-side checks of the TP layers against dense PyTorch: each returns relative errors for the parent to assert."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from raylm.parallel.context import NO_CP, CPGroup
from raylm.parallel.layers import SequenceParallelNorm
from raylm.parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    TPGroup,
    VocabParallelEmbedding,
    gather_from_tp_region,
    vocab_parallel_cross_entropy,
)

NO_TP = TPGroup(None, 0, 1)


def _world_tp(sequence_parallel: bool = False) -> TPGroup:
    return TPGroup(dist.group.WORLD, dist.get_rank(), dist.get_world_size(), sequence_parallel)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest entry."""
    return ((a - b).abs().max() / b.abs().max()).item()


def _dense(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def check_linears() -> dict[str, float]:
    """Column then row parallel (an MLP) vs dense: output, input grad and each rank's weight-grad shard."""
    tp = _world_tp()
    w_up, w_down, x = _dense(1, 12, 8), _dense(2, 8, 12), _dense(3, 2, 5, 8).requires_grad_()
    up, down = ColumnParallelLinear(8, 12, tp), RowParallelLinear(12, 8, tp)
    with torch.no_grad():
        up.weight.copy_(w_up.chunk(tp.size, 0)[tp.rank])
        down.weight.copy_(w_down.chunk(tp.size, 1)[tp.rank])
    x_tp = x.detach().clone().requires_grad_()
    y_tp = down(F.gelu(up(x_tp)))
    (y_tp * torch.arange(8.0)).sum().backward()
    w_up_ref, w_down_ref = w_up.clone().requires_grad_(), w_down.clone().requires_grad_()
    y = F.linear(F.gelu(F.linear(x, w_up_ref)), w_down_ref)
    (y * torch.arange(8.0)).sum().backward()
    return {
        "out": _max_err(y_tp, y),
        "x_grad": _max_err(x_tp.grad, x.grad),
        "up_grad": _max_err(up.weight.grad, w_up_ref.grad.chunk(tp.size, 0)[tp.rank]),
        "down_grad": _max_err(down.weight.grad, w_down_ref.grad.chunk(tp.size, 1)[tp.rank]),
    }


def check_embedding_and_gather() -> dict[str, float]:
    """Vocab-parallel embedding vs F.embedding (output and weight-grad shard); gather vs the full tensor."""
    tp = _world_tp()
    table, idx = _dense(4, 16, 6), torch.randint(0, 16, (3, 7), generator=torch.Generator().manual_seed(5))
    emb = VocabParallelEmbedding(16, 6, tp)
    with torch.no_grad():
        emb.weight.copy_(table.chunk(tp.size, 0)[tp.rank])
    out = emb(idx)
    (out * out).sum().backward()
    ref_table = table.clone().requires_grad_()
    ref = F.embedding(idx, ref_table)
    (ref * ref).sum().backward()
    full = _dense(6, 3, 4 * tp.size)
    piece = full.chunk(tp.size, -1)[tp.rank].clone().requires_grad_()
    gathered = gather_from_tp_region(piece, tp)
    (gathered * full).sum().backward()
    return {
        "emb_out": _max_err(out, ref),
        "emb_grad": _max_err(emb.weight.grad, ref_table.grad.chunk(tp.size, 0)[tp.rank]),
        "gather_out": _max_err(gathered, full),
        "gather_grad": _max_err(piece.grad, full.chunk(tp.size, -1)[tp.rank]),
    }


def check_cross_entropy() -> dict[str, float]:
    """Vocab-parallel CE vs F.cross_entropy with ignore_index=-100: loss and each rank's logit-grad shard."""
    tp = _world_tp()
    logits = _dense(7, 4, 5, 32) * 3
    target = torch.randint(0, 32, (4, 5), generator=torch.Generator().manual_seed(8))
    target[0, :3] = -100
    ref_logits = logits.clone().requires_grad_()
    ref = F.cross_entropy(ref_logits.flatten(0, 1), target.flatten(), ignore_index=-100)
    ref.backward()
    shard = logits.chunk(tp.size, -1)[tp.rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, target, tp)
    loss.backward()
    return {
        "ce_loss": abs(loss.item() - ref.item()) / ref.item(),
        "ce_grad": _max_err(shard.grad, ref_logits.grad.chunk(tp.size, -1)[tp.rank]),
    }


def check_sequence_parallel() -> dict[str, float]:
    """x + row(gelu(column(norm(x)))) on sequence shards vs dense: this rank's output and input-grad shards, the
    weight-grad shards, and the norm gain's whole gradient (it sees only this rank's tokens until all-reduced)."""
    tp = _world_tp(sequence_parallel=True)
    gain, w_up, w_down, x = _dense(9, 8), _dense(10, 12, 8), _dense(11, 8, 12), _dense(12, 2, 4 * tp.size, 8)
    coeff = _dense(13, *x.shape)
    norm, up, down = (
        SequenceParallelNorm(8, 1e-5, tp),
        ColumnParallelLinear(8, 12, tp),
        RowParallelLinear(12, 8, tp),
    )
    with torch.no_grad():
        norm.weight.copy_(gain)
        up.weight.copy_(w_up.chunk(tp.size, 0)[tp.rank])
        down.weight.copy_(w_down.chunk(tp.size, 1)[tp.rank])
    mine = lambda t: t.chunk(tp.size, 1)[tp.rank]  # noqa: E731 (this rank's sequence shard)
    x_sp = mine(x).clone().requires_grad_()
    y_sp = x_sp + down(F.gelu(up(norm(x_sp))))  # (B, T / tp, C)
    (y_sp * mine(coeff)).sum().backward()
    refs = [t.clone().requires_grad_() for t in (x, gain, w_up, w_down)]
    x_ref, gain_ref, up_ref, down_ref = refs
    normed = x_ref * torch.rsqrt(x_ref.pow(2).mean(-1, keepdim=True) + 1e-5) * gain_ref
    y = x_ref + F.linear(F.gelu(F.linear(normed, up_ref)), down_ref)
    (y * coeff).sum().backward()
    return {
        "sp_out": _max_err(y_sp, mine(y)),
        "sp_x_grad": _max_err(x_sp.grad, mine(x_ref.grad)),
        "sp_norm_grad": _max_err(norm.weight.grad, gain_ref.grad),
        "sp_up_grad": _max_err(up.weight.grad, up_ref.grad.chunk(tp.size, 0)[tp.rank]),
        "sp_down_grad": _max_err(down.weight.grad, down_ref.grad.chunk(tp.size, 1)[tp.rank]),
    }


def block_saved_bytes(micro_batch: int, seq_len: int) -> dict[str, int]:
    """Bytes autograd saves for one TP-split block's backward on this rank, with and without sequence
    parallelism, and for a tp = 1 block under context parallelism over the world (raylm plan's activation model
    is checked against these)."""
    from raylm.config.schema import ModelConfig
    from raylm.parallel.layers import BlockPipe
    from tests.unit.test_plan_memory import saved_activation_bytes

    cfg = ModelConfig(n_layer=1, n_head=4, n_kv_head=2, d_model=64, max_seq_len=seq_len)
    world, out = dist.get_world_size(), {}
    context = CPGroup(dist.group.WORLD, dist.get_rank(), world)  # the world as one CP group, tp = 1
    for key, tp, cp in (("tp", _world_tp(), NO_CP), ("sp", _world_tp(True), NO_CP), ("cp", NO_TP, context)):
        block = BlockPipe(cfg, 0, tp, cp)
        with torch.no_grad():
            for param in block.parameters():
                param.normal_(0.0, 0.1)
        shards = world if key != "tp" else 1
        x = torch.randn(micro_batch, seq_len // shards, cfg.d_model, requires_grad=True)
        out[key] = saved_activation_bytes(block, x)
    return out


def run_tp_checks() -> dict[str, float]:
    return {
        **check_linears(),
        **check_embedding_and_gather(),
        **check_cross_entropy(),
        **check_sequence_parallel(),
    }
