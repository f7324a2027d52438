"""Resuming with another seed, data, tokenizer or model shape is refused (exit 2) unless allowed; layouts may move."""

from __future__ import annotations

import hashlib
import json

import pytest

from raylm.checkpoint.writer import save_full_weights
from raylm.config import resolve
from raylm.config.derived import padded_vocab
from raylm.errors import ConfigError
from raylm.model.gpt import init_full_weights
from raylm.train.run_folder import checkpoint_root, prepare_run_dir

SMALL = [
    "model.n_layer=1",
    "model.d_model=32",
    "model.n_head=2",
    "data.vocab_size=300",
    "data.seq_len=16",
    "model.max_seq_len=16",
    "data.paths=[]",
]


def prepared_stub(folder, tokenizer_text: str) -> None:
    """A data folder's tokenizer.json and the manifest fields the drift check reads."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(tokenizer_text)
    sha = hashlib.sha256(tokenizer_text.encode()).hexdigest()
    (folder / "manifest.json").write_text(
        json.dumps({"format": "raylm-shards/1", "shards": [], "tokenizer_sha256": sha})
    )


@pytest.fixture
def trained(tmp_path):
    """A run folder holding one committed checkpoint, and a function building configs for it."""
    prepared_stub(tmp_path / "data", '{"tokenizer": "A"}')

    def config(*overrides: str):
        return resolve(
            {},
            [
                *SMALL,
                f"run.dir={tmp_path / 'runs'}",
                "run.name=r",
                f"data.out_dir={tmp_path / 'data'}",
                *overrides,
            ],
        )

    cfg = config()
    run = prepare_run_dir(cfg, overwrite=False)
    weights = init_full_weights(cfg.model, padded_vocab(cfg.data.vocab_size), cfg.run.seed)
    save_full_weights(cfg, weights, checkpoint_root(run), step=4)
    return config


@pytest.mark.parametrize(
    "override,key",
    [
        ("run.seed=7", "run.seed"),
        ("data.seq_len=8", "data.seq_len"),
        ("model.n_layer=2", "model.n_layer"),
        ("data.vocab_size=512", "data.vocab_size"),
    ],
)
def test_drifted_keys_are_refused_naming_the_key(trained, override, key):
    with pytest.raises(
        ConfigError,
        match=f"^{key}=.* differs from .* in checkpoint .*step-00000004: resuming would "
        f"change .*--allow-config-change",
    ):
        prepare_run_dir(trained(override), overwrite=False)
    prepare_run_dir(trained(override), overwrite=False, allow_config_change=True)


def test_other_sources_are_refused(trained, tmp_path):
    prepared_stub(tmp_path / "other", '{"tokenizer": "A"}')
    with pytest.raises(ConfigError, match="^data.sources=.* differs from"):
        prepare_run_dir(trained(f"data.out_dir={tmp_path / 'other'}"), overwrite=False)


def test_a_retrained_tokenizer_is_refused(trained, tmp_path):
    prepared_stub(tmp_path / "data", '{"tokenizer": "B"}')
    with pytest.raises(ConfigError, match="was prepared with another tokenizer .* than checkpoint"):
        prepare_run_dir(trained(), overwrite=False)


def test_layout_and_schedule_changes_resume_freely(trained):
    prepare_run_dir(
        trained(
            "parallel.pp=1",
            "parallel.dp=2",
            "train.global_batch=32",
            "optim.lr=1e-3",
            "parallel.micro_batch=2",
        ),
        overwrite=False,
    )


def test_a_damaged_newest_checkpoint_is_compared_past(trained, tmp_path):
    """resume=auto skips a checkpoint that fails its manifest; so does the drift check (the older one decides)."""
    cfg = trained()
    run = tmp_path / "runs" / "r"
    newer = save_full_weights(
        trained("run.seed=9"),
        init_full_weights(cfg.model, padded_vocab(300), 9),
        checkpoint_root(run),
        step=8,
    )
    (newer / "config.yaml").write_text("run: {seed: 7}\n")  # damaged: its sha256 no longer matches
    prepare_run_dir(cfg, overwrite=False)
    with pytest.raises(ConfigError, match="^run.seed=9 differs from 1234"):
        prepare_run_dir(trained("run.seed=9"), overwrite=False)
