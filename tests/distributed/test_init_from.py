"""model.init_from under another layout: a run started from an export of a one-process model begins with
exactly its weights, and its step-0 loss on a batch equals that model's loss on it (pp=2 tied, tp=2 untied)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # spawned ranks import the helpers by module name

from dist_harness import run_world  # noqa: E402
from dist_hf import start_from_export  # noqa: E402
from dist_parity import global_batches, reference_eval, tiny_cfg  # noqa: E402

from raylm.checkpoint.export import export  # noqa: E402
from raylm.checkpoint.writer import save_full_weights  # noqa: E402
from raylm.config.derived import padded_vocab  # noqa: E402
from raylm.model.gpt import init_full_weights  # noqa: E402

RTOL = 1e-5  # asked for (fp32)
UNTIED = "model.tie_embeddings=false"
LAYOUTS = [
    (2, 1, 1, ()),
    (1, 2, 1, (UNTIED,)),
]  # pipeline stages; tensor-parallel heads, vocab and FFN slices


def exported_model(folder: Path, *overrides: str) -> dict:
    """Weights of a one-process model (trained-looking: perturbed norms too), saved as a checkpoint and exported."""
    cfg = tiny_cfg(1, 1, 1, *overrides)
    gen = torch.Generator().manual_seed(11)
    weights = {
        k: v + 0.05 * torch.randn(v.shape, generator=gen)
        for k, v in init_full_weights(cfg.model, padded_vocab(cfg.data.vocab_size), seed=3).items()
    }
    save_full_weights(cfg, weights, folder / "run" / "checkpoints", 9)
    export(folder / "run", folder / "hf")
    return weights


def test_runs_start_from_an_export_under_another_layout(tmp_path):
    jobs, expected = [], []
    for i, (pp, tp, dp, overrides) in enumerate(LAYOUTS):
        weights = exported_model(tmp_path / str(i), *overrides)
        jobs.append((str(tmp_path / str(i) / "hf"), (pp, tp, dp, overrides)))
        cfg = tiny_cfg(pp, tp, dp, *overrides)
        expected.append((weights, reference_eval(cfg, weights, global_batches(cfg, steps=1)[0])))
    per_rank = run_world(2, start_from_export, jobs)
    for job, (weights, want_loss) in enumerate(expected):
        for rank, out in enumerate(per_rank):
            assert out[job]["loss"] == pytest.approx(want_loss, rel=RTOL), (LAYOUTS[job], rank)
        start = per_rank[0][job]["start"]
        assert start.keys() == weights.keys()
        assert all(torch.equal(start[k], weights[k]) for k in weights), LAYOUTS[job]
