"""GPU tier: bf16 layouts on several GPUs (nccl) train like one GPU: pp=2, tp=2, and pp=2 x tp=2 on 4 GPUs.

bf16 is not bit-parity across layouts (other reduction orders round differently); losses agree to bf16's
rounding of the loss, as on CPU (tests/distributed/test_parity.py, test_bf16_trains_near_fp32_reference).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "distributed"))  # spawned ranks import the helpers by name

from dist_harness import run_world  # noqa: E402
from dist_parity import run_jobs  # noqa: E402

BF16 = ("train.precision=bf16", "parallel.zero_stage=1")
LAYOUTS = [(2, (2, 1, 1, BF16)), (2, (1, 2, 1, BF16)), (4, (2, 2, 1, BF16))]
LOSS_RTOL = 2e-3


def gpu_losses(world: int, layout: tuple) -> list[float]:
    """Per-step losses of rank 0 for one layout trained on `world` GPUs."""
    per_rank = run_world(world, run_jobs, [("train", [layout])], backend="nccl")
    return per_rank[0][0][0]["losses"]


@pytest.fixture(scope="module")
def one_gpu() -> list[float]:
    return gpu_losses(1, (1, 1, 1, BF16))


@pytest.mark.parametrize("world,layout", LAYOUTS, ids=["pp2", "tp2", "pp2-tp2"])
def test_bf16_layout_matches_one_gpu(one_gpu, world, layout):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    assert gpu_losses(world, layout) == pytest.approx(one_gpu, rel=LOSS_RTOL)
