"""A non-finite loss on one rank is seen by every rank before the optimizer step, and the skipped step leaves no
trace: the run then matches one that never saw the batch, bit for bit, under ZeRO 0 and 1, bf16, dp and pp."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # spawned ranks import the helpers by module name

from dist_harness import run_world  # noqa: E402
from dist_step_guard import poisoned_step_leaves_no_trace  # noqa: E402

from raylm.parallel.step_guard import LOSS  # noqa: E402

LAYOUTS = [
    (1, 1, 2, ()),
    (1, 1, 2, ("parallel.zero_stage=1",)),
    (2, 1, 1, ("parallel.zero_stage=1",)),
    (1, 1, 2, ("train.precision=bf16",)),
]


@pytest.fixture(scope="module")
def results():
    return run_world(2, poisoned_step_leaves_no_trace, LAYOUTS)


@pytest.mark.parametrize(
    "index", range(len(LAYOUTS)), ids=["dp2-zero0", "dp2-zero1", "pp2-zero1", "dp2-bf16"]
)
def test_poisoned_step_is_skipped_on_every_rank(results, index):
    per_rank = [rank_out[index] for rank_out in results]
    assert per_rank[-1]["poisoned"]["computes_loss"]
    for runs in per_rank:
        poisoned, clean = runs["poisoned"], runs["clean"]
        flags = poisoned["flags"]
        assert flags[0] is None and flags[2] is None and clean["flags"] == [None, None]
        assert flags[1][-1] & LOSS and not flags[1][0] & LOSS  # only the poisoned rank saw the loss itself
        assert math.isnan(poisoned["losses"][1])
        assert [poisoned["losses"][0], poisoned["losses"][2]] == clean["losses"]  # bitwise
        assert poisoned["adam_step"] == clean["adam_step"] == 2
        assert poisoned["skipped_steps"] == clean["skipped_steps"] + 1
        for name, tensor in clean["weights"].items():
            assert torch.equal(poisoned["weights"][name], tensor), name
