"""Real TorchTrainers on a local Ray: layouts agree with one worker, the batch ramp works with pp, eval is inert."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raylm.train.driver import train
from raylm.train.metrics import read_metrics

PARITY_RTOL = 1e-5


SAMPLE_SHAS: dict[str, list[str]] = {}  # run name -> each step's samples_sha


def losses(cfg) -> list[float]:
    summary = train(cfg)
    rows = read_metrics(Path(summary["run_dir"]))
    assert [r["step"] for r in rows] == list(range(cfg.train.max_steps))
    SAMPLE_SHAS[cfg.run.name] = [r["samples_sha"] for r in rows]
    return [r["loss"] for r in rows]


@pytest.fixture(scope="module")
def reference_losses(request):
    return {}


def single_worker(small_config, reference_losses, *overrides):
    key = tuple(overrides)
    if key not in reference_losses:
        reference_losses[key] = losses(small_config("ref-" + str(len(reference_losses)), *overrides))
    return reference_losses[key]


@pytest.mark.parametrize("layout", [("parallel.pp=2",), ("parallel.tp=2",), ("parallel.dp=2",)],
                         ids=["pp2", "tp2", "dp2"])
def test_layout_matches_single_worker(ray_cluster, small_config, reference_losses, layout):
    expected = single_worker(small_config, reference_losses)
    cfg = small_config("layout-" + layout[0].replace("=", ""), *layout)
    got = losses(cfg)
    assert got == pytest.approx(expected, rel=PARITY_RTOL)
    assert got[-1] < got[0]
    assert SAMPLE_SHAS[cfg.run.name] == SAMPLE_SHAS["ref-0"]  # the same samples in the same steps, exactly
    assert len(set(SAMPLE_SHAS["ref-0"])) == cfg.train.max_steps


def test_batch_ramp_with_pipeline_matches_single_worker(ray_cluster, small_config, reference_losses):
    ramp = ("schedule.batch.start=4", "schedule.batch.increment=4", "schedule.batch.ramp_tokens=256",
            "train.max_steps=5")
    expected = single_worker(small_config, reference_losses, *ramp)
    cfg = small_config("ramp-pp2", "parallel.pp=2", *ramp)
    got = losses(cfg)
    rows = read_metrics(Path(cfg.run.dir) / cfg.run.name)
    assert [r["batch_size"] for r in rows] == [4, 4, 8, 8, 8]
    assert rows[-1]["tokens"] == (4 + 4 + 8 + 8 + 8) * cfg.data.seq_len
    assert rows[-1]["samples"] == 32
    assert got == pytest.approx(expected, rel=PARITY_RTOL)


def test_evaluation_does_not_move_the_training_stream(ray_cluster, small_config, reference_losses):
    expected = single_worker(small_config, reference_losses)
    cfg = small_config("with-eval", "train.eval_every=1", "parallel.pp=2")
    got = losses(cfg)
    rows = read_metrics(Path(cfg.run.dir) / cfg.run.name)
    assert all("val_loss" in r and r["val_ppl"] > 1 for r in rows)
    assert all(0 < r["pipe_wait_frac"] < 1 for r in rows)  # stage 0 waits on stage 1 every step
    assert got == pytest.approx(expected, rel=PARITY_RTOL)


def test_run_folder_has_the_contract_files_and_generate_works(ray_cluster, small_config, reference_losses):
    from raylm.train.generate import generate_text

    cfg = small_config("contract", "train.eval_every=2")
    train(cfg)
    run = Path(cfg.run.dir) / cfg.run.name
    rows = read_metrics(run)
    for key in ("step", "tokens", "loss", "lr", "batch_size", "dp", "tokens_per_s", "mfu", "data_wait_frac",
                "pipe_wait_frac", "samples_sha"):
        assert key in rows[0], key
    assert {r["dp"] for r in rows} == {cfg.parallel.dp}
    assert 0 < rows[-1]["mfu"] < 1 and 0 <= rows[-1]["data_wait_frac"] <= 1
    assert (run / "config.yaml").exists() and (run / "loss.png").exists()
    assert any((run / "tensorboard").iterdir())
    text = generate_text(run, "def ", max_new_tokens=8, seed=1)
    assert text.startswith("def ") and len(text) > 4
    with pytest.raises(Exception, match="already holds a run"):
        train(small_config("contract", "train.eval_every=2", "checkpoint.resume=never"))
    json.dumps(rows)
