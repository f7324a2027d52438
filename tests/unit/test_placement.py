"""Each rank's placement file: its coordinates and Ray node, overwritten by a restarted attempt, read back by rank."""

from __future__ import annotations

import ray

from raylm.parallel.topology import Coord
from raylm.train.placement import read_placement, record_placement


class FakeContext:
    def __init__(self, node_id: str):
        self.node_id = node_id

    def get_node_id(self) -> str:
        return self.node_id


def test_ranks_record_their_node_and_a_restart_overwrites(tmp_path, monkeypatch):
    monkeypatch.setattr(ray, "get_runtime_context", lambda: FakeContext("node-a"))
    record_placement(tmp_path, 1, Coord(pp_stage=1, dp_rank=0, tp_rank=0))
    record_placement(tmp_path, 0, Coord(pp_stage=0, dp_rank=0, tp_rank=0))
    monkeypatch.setattr(ray, "get_runtime_context", lambda: FakeContext("node-b"))
    record_placement(tmp_path, 1, Coord(pp_stage=1, dp_rank=0, tp_rank=0))  # the restarted worker group
    entries = read_placement(tmp_path)
    assert [(e["rank"], e["pp_stage"], e["node_id"]) for e in entries] == [(0, 0, "node-a"), (1, 1, "node-b")]
    assert sorted(p.name for p in (tmp_path / "placement").iterdir()) == [
        "rank-00000.json",
        "rank-00001.json",
    ]
