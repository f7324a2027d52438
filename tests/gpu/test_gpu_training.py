"""GPU tier: a short bf16 run of the tiny config on one GPU through the public driver (skipped without CUDA)."""

from __future__ import annotations

from pathlib import Path

from raylm.config import resolve
from raylm.config.loader import read_yaml
from raylm.data.prepare import prepare
from raylm.train.driver import train
from raylm.train.metrics import read_metrics
from tests.conftest import TINY_CONFIG


def test_bf16_training_on_one_gpu(tmp_path, small_corpus_dir):
    cfg = resolve(
        read_yaml(TINY_CONFIG),
        [
            f"data.paths=['{small_corpus_dir}']",
            f"data.out_dir={tmp_path / 'data'}",
            f"run.dir={tmp_path / 'runs'}",
            "run.name=gpu",
            "parallel.pp=1",
            "parallel.use_gpu=true",
            "train.precision=bf16",
            "train.max_steps=30",
            "train.eval_every=0",
            "checkpoint.every_steps=0",
        ],
    )
    prepare(cfg)
    train(cfg, overwrite=True)
    rows = read_metrics(Path(cfg.run.dir) / cfg.run.name)
    assert len(rows) == 30 and rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["peak_mem_gb"] > 0 and 0 < rows[-1]["mfu"] < 1
