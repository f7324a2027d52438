"""Helpers shared by the data tests: a small seeded corpus and a prepared folder built without Ray."""

from __future__ import annotations

import random
from pathlib import Path

from raylm.config import resolve

WORDS = [
    "ray",
    "data",
    "shard",
    "token",
    "window",
    "stream",
    "rank",
    "batch",
    "seed",
    "epoch",
    "model",
    "train",
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "for",
    "λ",
    "naïve",
    "café",
    "über",
    "☃",
    "😀",
]


def write_corpus(folder: Path, docs: int = 40, words_per_doc: int = 300, seed: int = 0) -> Path:
    """`docs` text files of seeded pseudo-text (with some non-ASCII) under folder/corpus."""
    rng = random.Random(seed)
    corpus = folder / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for i in range(docs):
        lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(words_per_doc // 12)]
        (corpus / f"doc{i:03d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return corpus


def small_config(folder: Path, corpus: Path, *overrides: str):
    """A config that prepares `corpus` into folder/out with a small vocab and short windows."""
    return resolve(
        {},
        [
            f"data.paths=['{corpus}']",
            f"data.out_dir={folder / 'out'}",
            "data.vocab_size=320",
            "data.seq_len=16",
            "model.max_seq_len=64",
            "data.val_fraction=0.1",
            "data.shard_tokens=2000",
            *overrides,
        ],
    )


def prepared(folder: Path, *overrides: str, docs: int = 40) -> Path:
    """Write a corpus and prepare it in-process; returns the shard folder."""
    from raylm.data.prepare import prepare

    cfg = small_config(folder, write_corpus(folder, docs=docs), *overrides)
    prepare(cfg, use_ray=False)
    return Path(cfg.data.out_dir)
