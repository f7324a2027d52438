"""Which rank holds the others back: each rank's work per step (its step's wall time minus the time it was blocked
on its peers), gathered every train.report_every steps in one small all_gather; the slowest rank against the median
goes into the metrics row, and a rank slower than fault.straggler_factor x the median for fault.straggler_steps
steps in a row is named once on the console, with its node.

Ranks run in lock step, so their step times are all the slowest one's; the time each spends outside its waits
differs (raylm.parallel.comm_wait). A step's "work" here runs from the end of the previous step to the end of this
one, so it covers what a rank does between steps too (reading data, a slow disk, a stalled thread).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from raylm.config.schema import FaultConfig
from raylm.log import get_logger
from raylm.train.placement import short_node


class StragglerWatch:
    """`observe(step, row)` after every step on every rank, together; rank 0 fills the row and names stragglers."""

    def __init__(self, fault: FaultConfig, report_every: int, engine, rank: int, nodes: list[str]):
        self.factor, self.steps_needed = fault.straggler_factor, fault.straggler_steps
        self.report_every, self.engine, self.rank, self.nodes = report_every, engine, rank, nodes
        self.work_s: list[float] = []
        self.last_end = time.perf_counter()
        self.streak = (-1, 0)  # (rank, steps in a row above factor x median)
        self.named: set[int] = set()

    def restart_clock(self) -> None:
        """Start timing from now (the loop's start: set-up and resume are not a step's work)."""
        self.engine.take_comm_wait_s()
        self.last_end = time.perf_counter()

    def observe(self, step: int, row: dict) -> None:
        """Note this rank's work for the step just ended; every report_every steps gather every rank's."""
        now = time.perf_counter()
        self.work_s.append(max(0.0, now - self.last_end - self.engine.take_comm_wait_s()))
        self.last_end = now
        if step % self.report_every:
            return
        table = self._gather()  # (world, steps): seconds of work per rank and step
        self.work_s = []
        if self.rank == 0:
            row.update(slowest_of(table))
            named = self._judge(table, first_step=step - table.shape[1])
            if named:
                row["straggler"] = named

    def _gather(self) -> torch.Tensor:
        mine = torch.tensor(self.work_s, dtype=torch.float64, device=self.engine.device)
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, mine)
        return torch.stack(parts).cpu()

    def _judge(self, table: torch.Tensor, first_step: int) -> dict | None:
        """Follow each step's slowest rank; name one that straggled for straggler_steps steps in a row (once)."""
        named = None
        for column in range(table.shape[1]):
            times = table[:, column].tolist()
            median = statistics.median(times)
            slowest = max(range(len(times)), key=times.__getitem__)
            if median > 0 and times[slowest] > self.factor * median:
                run = self.streak[1] + 1 if self.streak[0] == slowest else 1
                self.streak = (slowest, run)
            else:
                self.streak = (-1, 0)
            if self.streak[1] >= self.steps_needed and slowest not in self.named:
                self.named.add(slowest)
                named = self._name(slowest, times[slowest], median, first_step + column + 1)
        return named

    def _name(self, rank: int, work_s: float, median_s: float, step: int) -> dict:
        """Log the straggler (step: steps done, as the progress line counts them); its `straggler` row entry."""
        node = short_node(self.nodes[rank])
        get_logger().warning(
            "rank %d on node %s is a straggler: %.3f s of work per step against a median of %.3f s (%.1fx) "
            "for %d steps up to step %d; every rank waits for it at each collective: check that node's load "
            "and hardware, or replace it",
            rank,
            node,
            work_s,
            median_s,
            work_s / median_s,
            self.streak[1],
            step,
        )
        return {"rank": rank, "node": node, "work_s": work_s, "median_s": median_s, "steps": self.streak[1]}


def slowest_of(table: torch.Tensor) -> dict[str, float | int]:
    """The metrics row's view of a (ranks, steps) table of work seconds: the rank with the most work per step on
    average, its mean and the median rank's mean."""
    means = table.mean(dim=1).tolist()
    slowest = max(range(len(means)), key=means.__getitem__)
    return {
        "slowest_rank": slowest,
        "slowest_rank_s": means[slowest],
        "median_rank_s": statistics.median(means),
    }
