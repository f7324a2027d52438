"""Context parallelism (DeepSpeed-Ulysses, Jacobs et al. 2023): each window's positions split over the cp ranks.

Every CP rank of a DP replica reads the same window (the stream is per DP rank, as for TP peers) and keeps its
own contiguous slice of T / cp positions: the embedding takes the slice of the tokens, each block's RoPE takes the
slice's rows, and the loss the slice's labels. Everything outside attention is per token, so it runs on the
slice unchanged. Attention needs every position: an all-to-all over the CP group turns q, k and v from
(B, T / cp, H, hd) into (B, T, H / cp, hd), each rank attends over the whole sequence for its heads (plainly
causal, or with the document mask built from the whole window's boundaries), and a second all-to-all turns the
output back into the slice (B, T / cp, H, hd). DeepSpeed's `DistributedAttention` does both exchanges; its
contiguous head split keeps each KV head with its query heads when cp divides the KV heads per TP rank
(Layout.check_context_parallel).

Gradients: every CP rank holds the whole model, and its weights' gradients are only its slice's part, so they are
summed over CP (and averaged over DP). DeepSpeed's engine does exactly that when its mpu has a sequence axis: it
reduces over the sequence-data-parallel group (dp x cp) and divides by dp alone (engine.py
`_reduce_non_expert_gradients`, ZeRO's `dp_world_size / sequence_parallel_size`). So each rank's loss is its
slice's share of the window's mean: the sum of its tokens' losses over the whole window's target count, and the
CP ranks' losses add up to the one-process loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from deepspeed.runtime.pipe.topology import PipelineParallelGrid, PipeModelDataParallelTopology
from deepspeed.sequence.layer import DistributedAttention

from raylm.model.gpt import attention_core
from raylm.parallel.topology import ProcessGroups, Topology

SEQUENCE_DIM = 1  # tokens (B, T), activations (B, T, C), q/k/v (B, T, H, hd)
HEAD_DIM = 2  # of q/k/v: what Ulysses scatters


@dataclass(frozen=True)
class CPGroup:
    """A context-parallel group as the layers see it; size 1 is no context parallelism (nothing is sliced)."""

    group: object
    rank: int
    size: int

    def local(self, x: torch.Tensor, dim: int = SEQUENCE_DIM) -> torch.Tensor:
        """This rank's contiguous slice of `x` along `dim` (x itself when size = 1)."""
        if self.size == 1:
            return x
        return x.chunk(self.size, dim=dim)[self.rank]

    def start(self, local_len: int) -> int:
        """The window position of this rank's first token when each rank holds `local_len` positions."""
        return self.rank * local_len


NO_CP = CPGroup(group=None, rank=0, size=1)


class UlyssesAttention(nn.Module):
    """The attention core over sequence slices: (B, T / cp, H, hd) q, k, v -> (B, T / cp, Hq, hd), attending over
    the whole sequence for H / cp heads in between (raylm.model.gpt.attention_core on each rank)."""

    def __init__(self, cp: CPGroup):
        super().__init__()
        self.exchange = DistributedAttention(
            attention_core, cp.group, scatter_idx=HEAD_DIM, gather_idx=SEQUENCE_DIM
        )

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        # batch_dim_idx 0: (B, T, H, hd); no rotary embedding (RoPE ran on the slice); `mask`, if any, is the
        # whole window's (B, 1, T, T) and reaches attention_core as is
        return self.exchange(q, k, v, 0, None, mask)  # (B, T / cp, Hq, hd)


def apply_context_parallel(block: nn.Module, cp: CPGroup) -> None:
    """Swap a Block's attention core for Ulysses over `cp` (nothing when cp = 1)."""
    if cp.size > 1:
        block.get_submodule("attention").core = UlyssesAttention(cp)


class ContextParallelGrid(PipelineParallelGrid):
    """DeepSpeed's mpu for pp = 1 with a sequence axis: its data axis is raylm's dp x cp (so its model groups are
    the TP groups), and it answers DeepSpeed's sequence-parallel questions. DeepSpeed's "data parallel" group
    is raylm's dp alone (the batch arithmetic: train_batch_size = micro_batch x accumulation x dp), its
    "sequence data parallel" group dp x cp: gradients are summed over it and divided by dp, and ZeRO partitions
    over it."""

    def __init__(self, topo: Topology, groups: ProcessGroups):
        rank = dist.get_rank()
        self.coord = topo.coords(rank)
        self.topo, self.groups, self.rank = topo, groups, rank
        assert topo.pp == 1, "Layout.check_context_parallel refuses cp with pp > 1"
        super().__init__(
            topology=PipeModelDataParallelTopology(num_pp=1, num_mp=topo.tp, num_dp=topo.dp * topo.cp)
        )

    def get_data_parallel_rank(self) -> int:
        return self.coord.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.topo.dp

    def get_data_parallel_group(self):
        return self.groups.dp

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.topo.dp_ranks(self.rank)

    def get_sequence_parallel_rank(self) -> int:
        return self.coord.cp_rank

    def get_sequence_parallel_world_size(self) -> int:
        return self.topo.cp

    def get_sequence_parallel_group(self):
        return self.groups.cp

    def get_sequence_data_parallel_rank(self) -> int:
        return self.data_parallel_id  # the grid's own data axis: dp x cp

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.data_parallel_size

    def get_sequence_data_parallel_group(self):
        return self.dp_proc_group


def gradient_group(mpu) -> object:
    """The group gradients are reduced and ZeRO partitions are kept over: dp x cp under context parallelism,
    else the DP group."""
    if isinstance(mpu, ContextParallelGrid):
        return mpu.get_sequence_data_parallel_group()
    return mpu.get_data_parallel_group()
