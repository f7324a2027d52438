"""`raylm eval`: the loss of a run, checkpoint or export on the samples the training's evaluation reads, as one
JSON line; an export evaluates elsewhere on a copied data folder; data from another tokenizer is refused."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch
from test_data_support import prepared

from raylm.checkpoint.export import export
from raylm.checkpoint.writer import save_full_weights
from raylm.cli import main
from raylm.config import resolve
from raylm.config.derived import eval_samples, padded_vocab
from raylm.data.stream import RankStream, stream_documents
from raylm.errors import DataError
from raylm.evaluate import evaluate
from raylm.log import get_logger
from raylm.model.gpt import GPT, init_full_weights

RTOL = 1e-6


@pytest.fixture(autouse=True)
def fresh_log_handler():
    """`main` binds raylm's log handler to the stderr of its time; capsys closes that stream after each test."""
    yield
    logger = get_logger()
    for handler in [h for h in logger.handlers if getattr(h, "_raylm", False)]:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(config, weights, run folder) of a small model whose checkpoint carries the data's tokenizer."""
    tmp = tmp_path_factory.mktemp("eval")
    data = prepared(tmp)
    cfg = resolve(
        {
            "data": {"out_dir": str(data), "vocab_size": 320, "seq_len": 16},
            "model": {"n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 32, "max_seq_len": 64},
            "parallel": {"micro_batch": 2},
            "train": {"global_batch": 8, "eval_batches": 2},
            "run": {"seed": 5},
        }
    )
    gen = torch.Generator().manual_seed(2)
    weights = {
        k: v + 0.05 * torch.randn(v.shape, generator=gen)
        for k, v in init_full_weights(cfg.model, padded_vocab(320), seed=1).items()
    }
    save_full_weights(cfg, weights, tmp / "run" / "checkpoints", 6)
    return cfg, weights, tmp / "run"


def training_eval_loss(cfg, weights, dp: int) -> float:
    """What the training's evaluation computes with `dp` ranks: each rank's val stream from sample 0, the mean
    of every micro-batch's mean loss."""
    model = GPT(cfg.model, padded_vocab(cfg.data.vocab_size))
    model.load_state_dict(weights)
    per_rank = eval_samples(cfg) // (cfg.parallel.micro_batch * dp)
    losses = []
    for dp_rank in range(dp):
        stream = RankStream(
            cfg.data.out_dir,
            "val",
            cfg.data.seq_len,
            cfg.run.seed,
            dp_rank,
            dp,
            cfg.parallel.micro_batch,
            prefetch=0,
            documents=stream_documents(cfg.data),
        )
        with torch.no_grad():
            for x, y in (next(stream) for _ in range(per_rank)):
                masked = isinstance(x, tuple)  # data.document_mask: (tokens, doc_ids, positions)
                losses.append((model(x[0], y, documents=x[1:]) if masked else model(x, y)).item())
        stream.close()
    return sum(losses) / len(losses)


def test_eval_repeats_the_training_evaluation(run, capsys):
    cfg, weights, run_dir = run
    assert main(["eval", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    row = json.loads(out)
    assert row["step"] == 6 and row["split"] == "val" and row["samples"] == 16 and row["tokens"] == 16 * 16
    assert row["loss"] == pytest.approx(training_eval_loss(cfg, weights, dp=2), rel=RTOL)
    assert row["ppl"] == pytest.approx(math.exp(row["loss"]))
    train = evaluate(run_dir, split="train", batches=1)
    assert train["samples"] == 8 and train["loss"] != row["loss"]


def test_eval_samples_sets_the_validation_sample_count(run, tmp_path):
    """train.eval_samples, not eval_batches x global_batch, when set: the count a sweep keeps across batches."""
    cfg, weights, _ = run
    fixed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_samples=12))
    save_full_weights(fixed, weights, tmp_path / "run" / "checkpoints", 6)
    row = evaluate(tmp_path / "run")
    assert row["samples"] == 12 and row["loss"] == pytest.approx(
        training_eval_loss(fixed, weights, dp=2), rel=RTOL
    )


def test_eval_keeps_the_runs_document_masking(run, tmp_path):
    cfg, weights, _ = run
    gen = torch.Generator().manual_seed(3)  # weights far from the init, so attention is far from uniform
    weights = {k: v + 0.5 * torch.randn(v.shape, generator=gen) for k, v in weights.items()}
    many = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, eval_samples=128)
    )  # documents end in them
    masked = dataclasses.replace(many, data=dataclasses.replace(cfg.data, document_mask=True))
    save_full_weights(masked, weights, tmp_path / "run" / "checkpoints", 6)
    row = evaluate(tmp_path / "run")
    assert row["loss"] == pytest.approx(training_eval_loss(masked, weights, dp=2), rel=RTOL)
    assert row["loss"] != pytest.approx(training_eval_loss(many, weights, dp=2), rel=1e-4)


def test_an_export_evaluates_elsewhere(run, tmp_path):
    cfg, _, run_dir = run
    export(run_dir, tmp_path / "made-elsewhere")
    data_copy = shutil.copytree(
        cfg.data.out_dir, tmp_path / "data-copy"
    )  # the run's data.out_dir is not used
    row = evaluate(tmp_path / "made-elsewhere", data=data_copy)
    assert row["data"] == [str(data_copy)] and row["step"] is None
    assert row["loss"] == pytest.approx(evaluate(run_dir)["loss"], rel=RTOL)
    (tmp_path / "made-elsewhere" / "raylm_config.yaml").unlink()  # a bare Hugging Face folder
    bare = evaluate(tmp_path / "made-elsewhere", data=data_copy)
    assert bare["tokens"] == bare["samples"] * cfg.data.seq_len and math.isfinite(bare["loss"])


def test_data_from_another_tokenizer_is_refused(run, tmp_path, capsys):
    other = prepared(tmp_path, "data.vocab_size=300")  # the same corpus, another tokenizer
    assert main(["eval", str(run[2]), "--data", str(other)]) == DataError.exit_code
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    model_tokenizer = run[2] / "checkpoints" / "step-00000006" / "tokenizer.json"
    assert f"{other}/tokenizer.json" in err and str(model_tokenizer) in err and "sha256" in err


def test_bad_batches_and_missing_data(run, tmp_path, capsys):
    assert main(["eval", str(run[2]), "--batches", "0"]) == DataError.exit_code
    assert "--batches 0" in capsys.readouterr().err
    assert main(["eval", str(run[2]), "--data", str(tmp_path / "nowhere")]) == DataError.exit_code
    assert "no prepared data" in capsys.readouterr().err
