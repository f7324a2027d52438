"""prepare in-process (the Ray path is tests/ray/test_prepare.py): split, no-op rerun, rebuilds, bad input."""

from __future__ import annotations

import os

import pytest
from test_data_support import small_config, write_corpus

from raylm.data.cache import verify
from raylm.data.prepare import prepare
from raylm.data.shards import read_data_manifest
from raylm.errors import DataError

pytestmark = pytest.mark.unit


def test_prepare_then_noop_then_rebuild(tmp_path):
    corpus = write_corpus(tmp_path)
    cfg = small_config(tmp_path, corpus)
    first = prepare(cfg, use_ray=False)
    manifest = read_data_manifest(cfg.data.out_dir)
    assert not first["skipped"] and first["docs"] == 40 and first["tokens"] == manifest["tokens"]
    splits = {e["split"] for e in manifest["shards"]}
    assert splits == {"train", "val"}
    assert prepare(cfg, use_ray=False)["skipped"]
    (corpus / "doc000.txt").write_text("changed text " * 50)
    again = prepare(cfg, use_ray=False)
    assert not again["skipped"]
    names = {e["file"] for e in read_data_manifest(cfg.data.out_dir)["shards"]}
    on_disk = {p for p in os.listdir(cfg.data.out_dir) if p.endswith(".bin")}
    assert names == on_disk  # stale shards of the first run are gone
    assert not prepare(small_config(tmp_path, corpus, "data.vocab_size=300"), use_ray=False)["skipped"]


def test_interrupted_prepare_leaves_old_folder_valid(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path)
    cfg = small_config(tmp_path, corpus)
    prepare(cfg, use_ray=False)
    before = read_data_manifest(cfg.data.out_dir)
    (corpus / "doc001.txt").write_text("new text " * 80)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("raylm.data.prepare._commit", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, use_ray=False)
    assert read_data_manifest(cfg.data.out_dir) == before and verify(cfg.data.out_dir)["ok"]


def test_existing_tokenizer_is_used(tmp_path):
    corpus = write_corpus(tmp_path)
    prepare(small_config(tmp_path, corpus), use_ray=False)
    tok = tmp_path / "tok.json"
    tok.write_bytes((tmp_path / "out" / "tokenizer.json").read_bytes())
    cfg = small_config(tmp_path / "b", corpus, f"data.tokenizer={tok}")
    prepare(cfg, use_ray=False)
    assert (
        read_data_manifest(tmp_path / "out")["tokenizer_sha256"]
        == read_data_manifest(cfg.data.out_dir)["tokenizer_sha256"]
    )
    with pytest.raises(DataError, match="set data.vocab_size="):
        prepare(
            small_config(tmp_path / "c", corpus, f"data.tokenizer={tok}", "data.vocab_size=260"),
            use_ray=False,
        )


def test_bad_corpora(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    with pytest.raises(DataError, match="holds no text"):
        prepare(small_config(tmp_path, empty), use_ray=False)
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "a.txt").write_text("hi")
    with pytest.raises(DataError, match="fewer than one window of data.seq_len \\+ 1 = 17"):
        prepare(small_config(tmp_path, tiny, "data.val_fraction=0"), use_ray=False)
    binary = write_corpus(tmp_path / "bin")
    (binary / "zz.txt").write_bytes(b"\x7fELF\x00\x00\x00")
    with pytest.raises(DataError, match="zz.txt looks binary"):
        prepare(small_config(tmp_path / "bin", binary), use_ray=False)


def test_a_shard_damaged_in_place_is_detected_and_rebuilt(tmp_path, caplog):
    """Same size, other bytes: prepare compares sha256, not sizes, so it rebuilds instead of 'nothing to do'."""
    cfg = small_config(tmp_path, write_corpus(tmp_path))
    prepare(cfg, use_ray=False)
    entry = read_data_manifest(cfg.data.out_dir)["shards"][0]
    shard = os.path.join(cfg.data.out_dir, entry["file"])
    with open(shard, "rb") as f:
        blob = bytearray(f.read())
    blob[0] ^= 0x01
    with open(shard, "wb") as f:
        f.write(bytes(blob))
    with pytest.raises(DataError):
        verify(cfg.data.out_dir)
    again = prepare(cfg, use_ray=False)
    assert not again["skipped"] and verify(cfg.data.out_dir)["ok"]
    assert entry["file"] in caplog.text and "rebuilding" in caplog.text
