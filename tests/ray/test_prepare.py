"""prepare through Ray Data on a local Ray: same bytes as the in-process path, no-op rerun, errors, stdlib slice."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest

from raylm.config import resolve
from raylm.data.cache import verify
from raylm.data.prepare import prepare
from raylm.data.shards import read_data_manifest
from raylm.data.stream import RankStream
from raylm.data.tokenizer import load_tokenizer
from raylm.errors import DataError

pytestmark = pytest.mark.ray


def write_corpus(folder: Path, docs: int = 30) -> Path:
    rng = np.random.default_rng(0)
    words = np.array(
        ["ray", "data", "shard", "token", "window", "stream", "rank", "batch", "seed", "epoch", "naïve", "☃"]
    )
    folder.mkdir(parents=True)
    for i in range(docs):
        (folder / f"d{i:02d}.txt").write_text(" ".join(rng.choice(words, 400)) + "\n", encoding="utf-8")
    return folder


def config(corpus, out_dir, *overrides):
    return resolve(
        {},
        [
            f"data.paths=['{corpus}']",
            f"data.out_dir={out_dir}",
            "data.vocab_size=300",
            "data.seq_len=16",
            "data.shard_tokens=1500",
            "data.val_fraction=0.1",
            *overrides,
        ],
    )


def shard_hashes(out_dir):
    manifest = read_data_manifest(out_dir)
    return manifest["tokenizer_sha256"], [(e["split"], e["sha256"]) for e in manifest["shards"]]


def test_ray_prepare_matches_local_and_is_idempotent(ray_cluster, tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    on_ray = prepare(config(corpus, tmp_path / "ray"))
    prepare(config(corpus, tmp_path / "local"), use_ray=False)
    assert not on_ray["skipped"] and on_ray["docs"] == 30
    assert shard_hashes(tmp_path / "ray") == shard_hashes(tmp_path / "local")
    assert prepare(config(corpus, tmp_path / "ray"))["skipped"]
    assert verify(tmp_path / "ray")["ok"]


def test_bad_file_is_one_line_not_a_task_traceback(ray_cluster, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", docs=5)
    (corpus / "bad.txt").write_bytes("caf\xe9".encode("latin-1") * 10)
    with pytest.raises(DataError, match=r"bad.txt is not valid UTF-8 at byte 3") as info:
        prepare(config(corpus, tmp_path / "out", "data.decode_errors=strict"))
    assert "\n" not in str(info.value)
    summary = prepare(config(corpus, tmp_path / "out"))
    assert summary["replaced_bytes"] == 10


def test_stdlib_slice_round_trip(ray_cluster, tmp_path):
    json_pkg = Path(sysconfig.get_paths()["stdlib"]) / "json"
    cfg = config(json_pkg, tmp_path / "out", "data.vocab_size=512", "data.val_fraction=0")
    prepare(cfg)
    tokenizer, manifest = load_tokenizer(cfg.data.out_dir), read_data_manifest(cfg.data.out_dir)
    tokens = np.concatenate(
        [np.fromfile(Path(cfg.data.out_dir) / e["file"], dtype=e["dtype"]) for e in manifest["shards"]]
    )
    docs = [tokenizer.decode(d.tolist()) for d in np.split(tokens, np.flatnonzero(tokens == 0) + 1)[:-1]]
    originals = [p.read_text(encoding="utf-8") for p in sorted(json_pkg.glob("*.py")) if p.stat().st_size]
    assert [d[: -len("<|endoftext|>")] if d.endswith("<|endoftext|>") else d for d in docs] == originals
    stream = RankStream(cfg.data.out_dir, "train", 16, 0, 0, 1, 4)
    inputs, labels = next(stream)
    stream.close()
    assert inputs.shape == (4, 16)
