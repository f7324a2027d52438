"""fault.drill's grammar, 'PHASE@STEP[:RANK],...': the pattern validate checks and the one parser of it.

The training, prepare and checkpoint drills all read fault.drill with parse_drills."""

from __future__ import annotations

import re

PHASES = (
    "before-files",
    "mid-files",
    "before-commit",
    "after-commit",
    "step",
    "nonfinite",
    "spike",
    "slow",
    "stop",
    "read",
    "prepare",
    "commit",
)
_DRILL_ONE = rf"({'|'.join(PHASES)})@[0-9]+(:[0-9]+)?"
DRILL = re.compile(rf"^{_DRILL_ONE}(,{_DRILL_ONE})*$")


def parse_drills(text: str, default_rank: int) -> list[tuple[str, int, int]]:
    """'PHASE@STEP[:RANK],...' -> [(phase, step, rank), ...]; a drill without :RANK names fault.drill_rank."""
    drills = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        point, _, rank = item.partition(":")
        phase, _, step = point.partition("@")
        drills.append((phase, int(step or 0), int(rank) if rank else default_rank))
    return drills
