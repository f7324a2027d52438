"""Where each rank runs: every rank writes its node to <run>/placement/rank-NNNNN.json when its worker starts."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from raylm.storage.atomic import write_atomic

PLACEMENT_DIR = "placement"


def record_placement(run_dir: Path, rank: int, coords) -> Path:
    """Write this rank's (pp_stage, dp_rank, cp_rank, tp_rank) and Ray node id; a restarted worker group overwrites the
    files, so they always describe the newest attempt (README.md "Where results land")."""
    import ray

    entry = {
        "rank": rank,
        "pp_stage": coords.pp_stage,
        "dp_rank": coords.dp_rank,
        "cp_rank": coords.cp_rank,
        "tp_rank": coords.tp_rank,
        "node_id": ray.get_runtime_context().get_node_id(),
        "pid": os.getpid(),
    }
    folder = Path(run_dir) / PLACEMENT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rank-{rank:05d}.json"
    write_atomic(path, json.dumps(entry) + "\n")
    return path


def short_node(node: str) -> str:
    """A node as the console names it: a Ray node id's first 6 hex digits (as `ray status` tells nodes apart),
    a host name as it is."""
    return node[:6] if re.fullmatch(r"[0-9a-f]{32,}", node) else node


def read_placement(run_dir: Path) -> list[dict]:
    """Every rank's entry, ordered by rank."""
    folder = Path(run_dir) / PLACEMENT_DIR
    entries = [json.loads(p.read_text(encoding="utf-8")) for p in folder.glob("rank-*.json")]
    return sorted(entries, key=lambda e: e["rank"])
