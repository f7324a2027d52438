"""The (pp, tp, dp) layout on the ranks: rank coordinates, process groups and data-reading ranks.

The degrees' arithmetic and checks are raylm.config.layout.Layout's; Topology adds where each rank sits.

Rank order matches DeepSpeed's PipeModelDataParallelTopology (axes pipe, data, model with model fastest):

    rank = pp_stage * (dp * tp) + dp_rank * tp + tp_rank

so TP peers are neighbouring ranks (same node, fast links) and the groups built here hold the same ranks as
the ones DeepSpeed's PipelineParallelGrid builds for itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch.distributed as dist

from raylm.config.layout import Layout
from raylm.config.schema import ParallelConfig


class Coord(NamedTuple):
    """Where one rank sits in the layout."""

    pp_stage: int
    dp_rank: int
    tp_rank: int


@dataclass(frozen=True)
class Topology(Layout):
    """A Layout's rank coordinates and groups: pure arithmetic, no process group is touched here."""

    @classmethod
    def from_config(cls, parallel: ParallelConfig, world_size: int | None = None) -> Topology:
        """The layout of `parallel`, checked against the number of ranks actually started."""
        topo = cls(parallel.pp, parallel.tp, parallel.dp, sequence_parallel=parallel.sequence_parallel)
        topo.check_started(world_size)
        return topo

    def coords(self, rank: int) -> Coord:
        """(pp_stage, dp_rank, tp_rank) of a global rank."""
        assert 0 <= rank < self.world_size, (rank, self)
        pp_stage, rest = divmod(rank, self.dp * self.tp)
        dp_rank, tp_rank = divmod(rest, self.tp)
        return Coord(pp_stage, dp_rank, tp_rank)

    def rank_of(self, pp_stage: int, dp_rank: int, tp_rank: int) -> int:
        """Global rank at the given coordinates."""
        return (pp_stage * self.dp + dp_rank) * self.tp + tp_rank

    def tp_ranks(self, rank: int) -> list[int]:
        """Ranks that share `rank`'s stage and DP replica: they split each layer's matrices."""
        c = self.coords(rank)
        return [self.rank_of(c.pp_stage, c.dp_rank, t) for t in range(self.tp)]

    def dp_ranks(self, rank: int) -> list[int]:
        """Ranks holding the same shard of the same stage: they average gradients (ZeRO partitions over them)."""
        c = self.coords(rank)
        return [self.rank_of(c.pp_stage, d, c.tp_rank) for d in range(self.dp)]

    def pp_ranks(self, rank: int) -> list[int]:
        """Ranks of `rank`'s pipeline, stage 0 first: activations flow along this list."""
        c = self.coords(rank)
        return [self.rank_of(s, c.dp_rank, c.tp_rank) for s in range(self.pp)]

    def is_first_stage(self, rank: int) -> bool:
        return self.coords(rank).pp_stage == 0

    def is_last_stage(self, rank: int) -> bool:
        return self.coords(rank).pp_stage == self.pp - 1

    def reads_data(self, rank: int) -> bool:
        """True for ranks that need batches: every TP rank of the first stage (inputs) and last stage (labels)."""
        return self.is_first_stage(rank) or self.is_last_stage(rank)

    def all_groups(self, axis: str) -> list[list[int]]:
        """Every group along one axis ('tp', 'dp' or 'pp'), in a fixed order all ranks agree on."""
        members = {"tp": self.tp_ranks, "dp": self.dp_ranks, "pp": self.pp_ranks}[axis]
        groups = []
        for rank in range(self.world_size):
            group = members(rank)
            if group not in groups:
                groups.append(group)
        return groups


@dataclass
class ProcessGroups:
    """This rank's torch.distributed groups along each axis."""

    tp: object
    dp: object
    pp: object


def build_groups(topo: Topology) -> ProcessGroups:
    """Create every TP, DP and PP group (all ranks must call this, in the same order) and keep this rank's."""
    rank = dist.get_rank()
    mine = {}
    for axis in ("tp", "dp", "pp"):
        for ranks in topo.all_groups(axis):
            group = dist.new_group(ranks=ranks)  # collective: every rank creates every group
            if rank in ranks:
                mine[axis] = group
    return ProcessGroups(**mine)
