"""The driver's one console line per worker-group failure: which ranks died or did not arrive, on which node, and
what comes next ("rank 1 on node 3e61f5 died (SIGKILL); restarting from step 10, failure 1 of 6").

Ray Train's failure policy calls it (raylm.train.failure_policy) with the failures Ray collected per rank; the
nodes come from the run's placement records (raylm.train.placement) or its hang reports (raylm.train.hangs).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from raylm.checkpoint.commit import list_committed, step_of
from raylm.storage.file_names import HANGS_DIR
from raylm.train.placement import PLACEMENT_DIR, read_placement, short_node

NODE_LINE = re.compile(r"^node of rank (\d+): (\S+)$", re.M)


@dataclass
class HangReports:
    """One worker group's hang reports: the folder, the ranks that wrote one, every rank's node, the reason."""

    folder: Path
    ranks: list[int]
    nodes: dict[int, str]
    reason: str
    blocked_in: str

    @property
    def missing(self) -> list[int]:
        """The ranks that wrote no report: stopped, or gone (the ones that did not arrive)."""
        return [rank for rank in sorted(self.nodes) if rank not in self.ranks]


@dataclass
class FaultLines:
    """Lines for one run's failures, each hang folder reported once (the policy lives as long as the run)."""

    run_dir: Path
    reported: set[str] = field(default_factory=set)
    since: float = field(default_factory=time.time)  # hang folders of earlier runs of the folder are not news

    def line(self, failures: Mapping[int, BaseException], failure: int, max_failures: int) -> str:
        """What happened, then what comes next: a restart from the newest committed checkpoint, or the end."""
        what = self._what(failures)
        if failure > max_failures:
            return f"{what}; no restarts left (failure {failure}, fault.max_failures={max_failures})"
        step = self._resume_step()
        start = f"from step {step}" if step else "from the start"
        return f"{what}; restarting {start}, failure {failure} of {max_failures}"

    def _what(self, failures: Mapping[int, BaseException]) -> str:
        hangs = self._new_hang_reports()
        if hangs is not None and hangs.missing:
            missing = [f"{r} on node {short_node(hangs.nodes[r])}" for r in hangs.missing]
            return (
                f"{_ranks(missing)} did not arrive ({hangs.reason}; {_ranks(hangs.ranks)} waited in "
                f"{hangs.blocked_in}; their stacks: {hangs.folder})"
            )
        died = sorted(rank for rank, error in failures.items() if _is_process_death(error))
        if died:
            return "; ".join(
                f"rank {r} on node {self._node(r)} died ({_death_cause(failures[r])})" for r in died
            )
        if hangs is not None:
            return f"every rank wrote a hang report ({hangs.reason}): {hangs.folder}"
        rank = min(failures, default=None)
        if rank is None:
            return "the worker group failed"
        return f"rank {rank} on node {self._node(rank)} failed: {_last_line(failures[rank])}"

    def _node(self, rank: int) -> str:
        if not (self.run_dir / PLACEMENT_DIR).is_dir():
            return "?"
        nodes = {entry["rank"]: entry["node_id"] for entry in read_placement(self.run_dir)}
        return short_node(nodes[rank]) if rank in nodes else "?"

    def _resume_step(self) -> int:
        committed = (
            list_committed(self.run_dir / "checkpoints") if (self.run_dir / "checkpoints").is_dir() else []
        )
        return (step_of(committed[0]) or 0) if committed else 0

    def _new_hang_reports(self) -> HangReports | None:
        folders = sorted((self.run_dir / HANGS_DIR).glob("*")) if (self.run_dir / HANGS_DIR).is_dir() else []
        fresh = [f for f in folders if f.name not in self.reported and f.stat().st_mtime >= self.since]
        if not fresh:
            return None
        self.reported.update(folder.name for folder in fresh)
        return read_hang_reports(fresh[-1])


def _ranks(ranks: list) -> str:
    """`rank 1`, or `ranks 0, 2, 3`."""
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


def read_hang_reports(folder: Path) -> HangReports:
    """The reports in one hang folder (raylm.train.hangs writes them)."""
    ranks, nodes, reason, blocked = [], {}, "", ""
    for path in sorted(folder.glob("rank-*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        ranks.append(int(path.stem.split("-")[1]))
        nodes.update({int(rank): node for rank, node in NODE_LINE.findall(text)})
        reason = reason or _field(text, "reason")
        blocked = blocked or _field(text, "blocked in")
    return HangReports(folder, ranks, nodes, reason, re.sub(r" for [\d.]+ s$", "", blocked))


def _field(text: str, name: str) -> str:
    match = re.search(rf"^{name}: (.*)$", text, re.M)
    return match.group(1).strip() if match else ""


def _causes(error: BaseException) -> list[BaseException]:
    """The error and what it wraps: Ray Train wraps a dead worker's error in a health-check failure
    (`health_check_failure`), Ray's task errors carry `cause`."""
    chain: list[BaseException] = []
    seen: BaseException | None = error
    while seen is not None and len(chain) < 16:  # the bound only guards against a cycle
        chain.append(seen)
        seen = getattr(seen, "health_check_failure", None) or seen.__cause__ or getattr(seen, "cause", None)
    return chain


def _is_process_death(error: BaseException) -> bool:
    """A worker whose process ended (killed, crashed, its node lost), as Ray reports it."""
    from ray.exceptions import RayActorError

    return any(isinstance(cause, RayActorError) for cause in _causes(error))


def _death_cause(error: BaseException) -> str:
    """Why Ray says the worker's process ended; Ray does not know which signal ended it."""
    text = str(error)
    if "OUT_OF_MEMORY" in text or "running low on memory" in text:  # Ray's exit type, its memory monitor
        return "out of memory"
    if "node it was running on is dead" in text or "node_death_info" in text or "node has died" in text:
        return "its node was lost"
    return "its process was killed or crashed"


def _last_line(error: BaseException) -> str:
    """The innermost error's last line."""
    innermost = _causes(error)[-1]
    lines = [line.strip() for line in str(innermost).splitlines() if line.strip()]
    return lines[-1] if lines else type(innermost).__name__
