"""The (pp, dp, cp, tp) layout on the ranks: rank coordinates, process groups and data-reading ranks.

The degrees' arithmetic and checks are raylm.config.layout.Layout's; Topology adds where each rank sits.

Rank order matches DeepSpeed's PipeModelDataParallelTopology (axes pipe, data, model with model fastest), with
the context-parallel axis between data and model (Megatron's order: tp fastest, then cp, then dp):

    rank = ((pp_stage * dp + dp_rank) * cp + cp_rank) * tp + tp_rank

so TP peers are neighbouring ranks (same node, fast links), CP peers the next closest, and the groups built
here hold the same ranks as the ones DeepSpeed's PipelineParallelGrid builds for itself (cp > 1 only with
pp = 1, where DeepSpeed's data axis is raylm's dp x cp: raylm.parallel.context).
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
    cp_rank: int = 0


@dataclass(frozen=True)
class Topology(Layout):
    """A Layout's rank coordinates and groups: pure arithmetic, no process group is touched here."""

    @classmethod
    def from_config(cls, parallel: ParallelConfig, world_size: int | None = None) -> Topology:
        """The layout of `parallel`, checked against the number of ranks actually started."""
        topo = cls(
            parallel.pp,
            parallel.tp,
            parallel.dp,
            sequence_parallel=parallel.sequence_parallel,
            cp=parallel.cp,
        )
        topo.check_started(world_size)
        return topo

    def coords(self, rank: int) -> Coord:
        """(pp_stage, dp_rank, tp_rank, cp_rank) of a global rank."""
        assert 0 <= rank < self.world_size, (rank, self)
        pp_stage, rest = divmod(rank, self.dp * self.cp * self.tp)
        dp_rank, rest = divmod(rest, self.cp * self.tp)
        cp_rank, tp_rank = divmod(rest, self.tp)
        return Coord(pp_stage, dp_rank, tp_rank, cp_rank)

    def rank_of(self, pp_stage: int, dp_rank: int, tp_rank: int, cp_rank: int = 0) -> int:
        """Global rank at the given coordinates."""
        return ((pp_stage * self.dp + dp_rank) * self.cp + cp_rank) * self.tp + tp_rank

    def tp_ranks(self, rank: int) -> list[int]:
        """Ranks that share `rank`'s stage, DP replica and sequence slice: they split each layer's matrices."""
        c = self.coords(rank)
        return [self.rank_of(c.pp_stage, c.dp_rank, t, c.cp_rank) for t in range(self.tp)]

    def cp_ranks(self, rank: int) -> list[int]:
        """Ranks of `rank`'s DP replica and TP shard, one per slice of the sequence: Ulysses' all-to-all group."""
        c = self.coords(rank)
        return [self.rank_of(c.pp_stage, c.dp_rank, c.tp_rank, s) for s in range(self.cp)]

    def dp_ranks(self, rank: int) -> list[int]:
        """Ranks holding the same shard of the same stage and sequence slice: replicas of one another."""
        c = self.coords(rank)
        return [self.rank_of(c.pp_stage, d, c.tp_rank, c.cp_rank) for d in range(self.dp)]

    def dp_cp_ranks(self, rank: int) -> list[int]:
        """Ranks holding the same shard of the same stage, in any replica or sequence slice: they sum their
        gradients (ZeRO partitions over them); the dp ranks when cp = 1."""
        c = self.coords(rank)
        return [self.rank_of(c.pp_stage, d, c.tp_rank, s) for d in range(self.dp) for s in range(self.cp)]

    def pp_ranks(self, rank: int) -> list[int]:
        """Ranks of `rank`'s pipeline, stage 0 first: activations flow along this list."""
        c = self.coords(rank)
        return [self.rank_of(s, c.dp_rank, c.tp_rank, c.cp_rank) for s in range(self.pp)]

    def is_first_stage(self, rank: int) -> bool:
        return self.coords(rank).pp_stage == 0

    def is_last_stage(self, rank: int) -> bool:
        return self.coords(rank).pp_stage == self.pp - 1

    def reads_data(self, rank: int) -> bool:
        """True for ranks that need batches: every TP rank of the first stage (inputs) and last stage (labels)."""
        return self.is_first_stage(rank) or self.is_last_stage(rank)

    def all_groups(self, axis: str) -> list[list[int]]:
        """Every group along one axis ('tp', 'cp', 'dp' or 'pp'), in a fixed order all ranks agree on."""
        members = {"tp": self.tp_ranks, "cp": self.cp_ranks, "dp": self.dp_ranks, "pp": self.pp_ranks}[axis]
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
    cp: object


def build_groups(topo: Topology) -> ProcessGroups:
    """Create every TP, CP, DP and PP group (all ranks must call this, in the same order) and keep this rank's."""
    rank = dist.get_rank()
    mine = {}
    for axis in ("tp", "cp", "dp", "pp"):
        for ranks in topo.all_groups(axis):
            group = dist.new_group(ranks=ranks)  # collective: every rank creates every group
            if rank in ranks:
                mine[axis] = group
    return ProcessGroups(**mine)
