"""A real TorchTrainer on a local Ray: the run folder holds the contract files and generate reads it. Layout
parity, the batch ramp and evaluation run without Ray: tests/distributed/test_run_parity.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raylm.train.driver import train
from raylm.train.metrics import read_metrics
from raylm.train.startup import PHASES, read_startups


def test_run_folder_has_the_contract_files_and_generate_works(ray_cluster, small_config):
    from raylm.train.generate import generate_text

    cfg = small_config("contract", "train.eval_every=2")
    train(cfg)
    run = Path(cfg.run.dir) / cfg.run.name
    rows = read_metrics(run)
    for key in (
        "step",
        "tokens",
        "loss",
        "lr",
        "batch_size",
        "dp",
        "tokens_per_s",
        "mfu",
        "data_wait_frac",
        "pipe_wait_frac",
        "samples_sha",
    ):
        assert key in rows[0], key
    assert {r["dp"] for r in rows} == {cfg.parallel.dp}
    assert 0 < rows[-1]["mfu"] < 1 and 0 <= rows[-1]["data_wait_frac"] <= 1
    assert (run / "config.yaml").exists() and (run / "loss.png").exists()
    assert any((run / "tensorboard").iterdir())
    (startup,) = read_startups(
        run
    )  # the phases of the start from train() on, each a span (raylm.train.startup)
    assert list(startup["phases"]) == list(PHASES)[1:] and min(startup["phases"].values()) >= 0
    text = generate_text(run, "def ", max_new_tokens=8, seed=1)
    assert text.startswith("def ") and len(text) > 4
    with pytest.raises(Exception, match="already holds a run"):
        train(small_config("contract", "train.eval_every=2", "checkpoint.resume=never"))
    json.dumps(rows)
