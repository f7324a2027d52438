"""`raylm prepare` SIGKILLed half-way through tokenizing and after each rename of its commit (a real kill of a real
process, in-process tokenizing): the folder verifies every time, with the tokenizer its manifest names, and a rerun
completes to the same bytes as an uninterrupted prepare, leaving no staging folder. Also: a dead RAY_ADDRESS fails
fast, and prepare refuses a folder that a training reads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from raylm.config import resolve
from raylm.data.cache import verify
from raylm.data.prepare import STAGING_PREFIX, prepare
from raylm.data.readers_lock import reading, writing
from raylm.data.shards import read_data_manifest
from raylm.data.tokenizer import file_sha256, load_tokenizer
from raylm.errors import DataError
from tests.conftest import REPO_ROOT

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
    "naïve",
    "☃",
    "kill",
    "commit",
    "rename",
]


def write_corpus(folder: Path, seed: int, docs: int = 20) -> Path:
    """About 100 KB of text in `docs` files."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(docs):
        (folder / f"d{i:02d}.txt").write_text(" ".join(rng.choice(WORDS, 600)) + "\n", encoding="utf-8")
    return folder


def overrides(corpus: Path, out_dir: Path, *more: str) -> list[str]:
    return [
        f"data.paths=['{corpus}']",
        f"data.out_dir={out_dir}",
        "data.vocab_size=300",
        "data.seq_len=16",
        "data.shard_tokens=6000",
        "data.val_fraction=0.1",
        *more,
    ]


def killed_prepare(corpus: Path, out_dir: Path, drill: str) -> int:
    """prepare in its own process with fault.drill set; its exit status (-9: the drill killed it). Units of work
    of 16 KB (the grouping never changes the bytes), so that half-way falls between units."""
    code = (
        "import sys; from raylm.config import resolve; import raylm.data.prepare as p; "
        "p.UNIT_BYTES_RANGE = (16 << 10, 64 << 20); p.prepare(resolve({}, sys.argv[1:]), use_ray=False)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code, *overrides(corpus, out_dir, f"fault.drill={drill}")],
        env=env,
        capture_output=True,
        timeout=120,
    ).returncode


def assert_consistent(out_dir: Path) -> dict:
    """The folder verifies (shards and the manifest's tokenizer) and loads that very tokenizer."""
    assert verify(out_dir)["ok"]
    manifest = read_data_manifest(out_dir)
    named = out_dir / f"tokenizer-{manifest['tokenizer_sha256'][:16]}.json"
    source = named if named.exists() else out_dir / "tokenizer.json"
    assert file_sha256(source) == manifest["tokenizer_sha256"]
    assert load_tokenizer(out_dir).get_vocab() == Tokenizer.from_file(str(source)).get_vocab()
    return manifest


def test_prepare_killed_anywhere_leaves_a_folder_that_verifies(tmp_path):
    old_corpus, new_corpus = write_corpus(tmp_path / "old", seed=0), write_corpus(tmp_path / "new", seed=1)
    before = tmp_path / "before"
    prepare(resolve({}, overrides(old_corpus, before)), use_ray=False)
    reference = tmp_path / "reference"
    prepare(resolve({}, overrides(new_corpus, reference)), use_ray=False)
    expected = read_data_manifest(reference)
    old = read_data_manifest(before)
    assert old["tokenizer_sha256"] != expected["tokenizer_sha256"]  # the commit replaces the tokenizer too
    shards = len(expected["shards"])
    assert shards >= 3
    # before the commit, then after each rename: every shard, tokenizer-<sha>.json, manifest.json, tokenizer.json
    drills = ["prepare@50", *(f"commit@{k}" for k in range(shards + 4))]
    for drill in drills:
        folder = tmp_path / drill.replace("@", "-")
        shutil.copytree(before, folder)
        assert killed_prepare(new_corpus, folder, drill) == -9, drill
        manifest = assert_consistent(folder)
        assert manifest["input_sha256"] in (old["input_sha256"], expected["input_sha256"]), drill
        summary = prepare(resolve({}, overrides(new_corpus, folder)), use_ray=False)  # the rerun
        assert not summary["skipped"] or drill == f"commit@{shards + 3}", drill
        assert_consistent(folder)
        assert read_data_manifest(folder)["shards"] == expected["shards"], drill
        assert not list(folder.glob(STAGING_PREFIX + "*")), drill
        assert sorted(p.name for p in folder.glob("tokenizer-*.json")) == [
            f"tokenizer-{expected['tokenizer_sha256'][:16]}.json"
        ]  # old copies go with the old shards


def test_prepare_refuses_a_folder_a_training_reads(tmp_path):
    corpus, out_dir = write_corpus(tmp_path / "corpus", seed=0, docs=6), tmp_path / "out"
    prepare(resolve({}, overrides(corpus, out_dir)), use_ray=False)
    shards = sorted(p.name for p in out_dir.glob("*.bin"))
    (corpus / "d00.txt").write_text(
        "changed text, so prepare would replace every shard\n" * 50, encoding="utf-8"
    )
    with reading([out_dir]):  # what `raylm train` holds for its whole run
        with pytest.raises(DataError, match=f"{out_dir} is in use: a running `raylm train` reads it"):
            prepare(resolve({}, overrides(corpus, out_dir)), use_ray=False)
        assert sorted(p.name for p in out_dir.glob("*.bin")) == shards  # nothing deleted or replaced
    assert not prepare(resolve({}, overrides(corpus, out_dir)), use_ray=False)[
        "skipped"
    ]  # after the run: proceeds
    # what prepare holds while it writes: a training that starts now is refused
    rewriting = f"`raylm prepare` is rewriting {out_dir}"
    with writing(out_dir), pytest.raises(DataError, match=rewriting), reading([out_dir]):
        pass


def test_prepare_with_a_dead_ray_address_fails_fast(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", seed=0, docs=2)
    config = tmp_path / "c.yaml"
    config.write_text(
        "data:\n  paths: ['{}']\n  out_dir: {}\n  vocab_size: 300\n  seq_len: 16\n".format(
            corpus, tmp_path / "out"
        )
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "RAY_ADDRESS": "127.0.0.1:9"}  # nothing listens there
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "raylm.cli", "prepare", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.monotonic() - started < 15
    assert done.returncode != 0 and "no Ray cluster answers at RAY_ADDRESS=127.0.0.1:9" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()
