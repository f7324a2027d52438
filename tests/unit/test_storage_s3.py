"""Data on object storage against a real S3-speaking server on 127.0.0.1 (moto), reached through pyarrow as S3 is.

prepare (in-process) -> the prefix holds shards, tokenizer and manifest -> the cache fetches and verifies -> the
stream yields the same samples as a local prepared folder; corrupted objects, a missing bucket, a silent endpoint
and a full cache each fail with one line and leave nothing half-written. (prepare through Ray Data: tests/ray.)
"""

from __future__ import annotations

import errno
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_data_support import small_config, write_corpus

from raylm.data.cache import cache_folder, fetch_shard, open_cached, verify
from raylm.data.prepare import prepare
from raylm.data.shards import read_data_manifest
from raylm.data.stream import RankStream
from raylm.errors import DataError, StorageError
from raylm.storage.objects import object_sizes
from raylm.storage.uri import parse_uri
from tests.s3_server import BUCKET, DUMMY_KEYS, create_bucket, free_port, put_object, s3_server, use_endpoint

pytestmark = pytest.mark.unit
PREFIX = f"s3://{BUCKET}/data/tiny"


@pytest.fixture(scope="module")
def endpoint():
    with s3_server() as url:
        create_bucket(url)
        yield url


@pytest.fixture
def s3(endpoint, monkeypatch):
    use_endpoint(monkeypatch, endpoint)
    return endpoint


@pytest.fixture
def on_s3(s3, tmp_path, monkeypatch):
    """A corpus prepared both into a local folder and into an S3 prefix (a fresh prefix per test)."""
    monkeypatch.chdir(tmp_path)  # where the old bug wrote a local folder named 's3:'
    corpus = write_corpus(tmp_path)
    prefix = f"{PREFIX}/{tmp_path.name}"
    local = small_config(tmp_path / "local", corpus)
    remote = small_config(
        tmp_path / "remote", corpus, f"data.out_dir={prefix}", f"data.cache_dir={tmp_path / 'prep-cache'}"
    )
    prepare(local, use_ray=False)
    summary = prepare(remote, use_ray=False)
    return local, remote, prefix, summary


def _batches(source, cache_dir, count=12):
    stream = RankStream(
        source, "train", 16, seed=7, dp_rank=1, dp_size=2, micro_batch=4, prefetch=0, cache_dir=str(cache_dir)
    )
    try:
        return [next(stream) for _ in range(count)]
    finally:
        stream.close()


def test_prepare_to_s3_then_stream_matches_local(on_s3, tmp_path, caplog):
    local, remote, prefix, summary = on_s3
    assert (
        summary["out_dir"] == prefix and not summary["skipped"] and summary["uploaded"] == summary["shards"]
    )
    manifest = read_data_manifest(local.data.out_dir)
    objects = object_sizes(parse_uri(prefix))
    assert {e["file"]: e["bytes"] for e in manifest["shards"]}.items() <= objects.items()
    assert {"manifest.json", "tokenizer.json"} <= set(objects)
    assert read_data_manifest(prefix) == manifest  # the same bytes whichever way they were written
    assert prepare(remote, use_ray=False)["skipped"]  # unchanged input: a no-op, nothing uploaded
    assert not (tmp_path / "s3:").exists()

    cache = tmp_path / "node-cache"  # a fresh node: every shard is fetched
    for (x_local, y_local), (x_s3, y_s3) in zip(
        _batches(local.data.out_dir, cache), _batches(prefix, cache), strict=False
    ):
        assert np.array_equal(x_local, x_s3) and np.array_equal(y_local, y_s3)
    folder = cache_folder(parse_uri(prefix), str(cache))
    fetched = {p.name for p in folder.glob("*.bin")}
    assert fetched and fetched <= {e["file"] for e in manifest["shards"]}
    assert not list(folder.glob(".*.part"))
    assert verify(prefix)["ok"] and verify(prefix)["shards"] == len(manifest["shards"])
    written = json.dumps(read_data_manifest(prefix)) + caplog.text
    assert not any(value in written for value in DUMMY_KEYS.values() if len(value) > 9)


def test_interrupted_upload_leaves_the_previous_prefix_valid(on_s3, tmp_path, monkeypatch):
    _, remote, prefix, _ = on_s3
    before = read_data_manifest(prefix)
    (tmp_path / "corpus" / "doc003.txt").write_text("other words " * 200)
    import raylm.data.publish as publish

    real = publish.upload_file

    def crash_at_manifest(local, target):
        if target.key.endswith("manifest.json"):
            raise KeyboardInterrupt
        real(local, target)

    monkeypatch.setattr(publish, "upload_file", crash_at_manifest)
    with pytest.raises(KeyboardInterrupt):
        prepare(remote, use_ray=False)
    assert (
        read_data_manifest(prefix) == before and verify(prefix)["ok"]
    )  # new shards uploaded, old manifest in charge
    monkeypatch.setattr(publish, "upload_file", real)
    assert (
        prepare(remote, use_ray=False)["uploaded"] == 0
    )  # the shards are there: only tokenizer and manifest
    names = {e["file"] for e in read_data_manifest(prefix)["shards"]}
    assert (
        read_data_manifest(prefix) != before
        and {n for n in object_sizes(parse_uri(prefix)) if n.endswith(".bin")} == names
    )


def test_corrupted_object_is_detected_and_never_cached(on_s3, s3, tmp_path):
    _, _, prefix, _ = on_s3
    manifest = read_data_manifest(prefix)
    entry = manifest["shards"][0]
    key = parse_uri(prefix).join(entry["file"]).key
    put_object(s3, key, b"\x01" * entry["bytes"])  # same size, other bytes
    folder, _ = open_cached(prefix, str(tmp_path / "cache"))
    with pytest.raises(DataError, match=rf"{entry['file']} has sha256 .* but the manifest says"):
        fetch_shard(prefix, folder, entry, manifest["vocab_size"])
    assert not (folder / entry["file"]).exists() and not list(folder.glob(".*.part"))
    with pytest.raises(DataError, match="sha256"):
        verify(prefix)


def test_full_cache_is_named_and_holds_no_partial_shard(on_s3, tmp_path, monkeypatch):
    _, _, prefix, _ = on_s3
    manifest = read_data_manifest(prefix)
    entry = manifest["shards"][0]
    folder, _ = open_cached(prefix, str(tmp_path / "cache"))

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    import raylm.data.cache as cache

    real_fsync = cache.os.fsync
    monkeypatch.setattr(cache.os, "fsync", disk_full)
    with pytest.raises(DataError, match=r"data\.cache_dir .* \(No space left on device\); free space there"):
        fetch_shard(prefix, folder, entry, manifest["vocab_size"])
    assert not (folder / entry["file"]).exists() and not list(folder.glob(".*.part"))
    monkeypatch.setattr(cache.os, "fsync", real_fsync)
    monkeypatch.setattr("raylm.data.cache.shutil.disk_usage", lambda path: type("U", (), {"free": 10})())
    with pytest.raises(DataError, match=r"data\.cache_dir .* has 10 bytes free"):
        fetch_shard(prefix, folder, entry, manifest["vocab_size"])


def test_two_fetches_on_one_node_download_once(on_s3, tmp_path, monkeypatch):
    _, _, prefix, _ = on_s3
    manifest = read_data_manifest(prefix)
    entry = manifest["shards"][0]
    folder, _ = open_cached(prefix, str(tmp_path / "cache"))
    calls = []
    import raylm.data.cache as cache

    real = cache._download
    monkeypatch.setattr(cache, "_download", lambda *a: (calls.append(1), time.sleep(0.3), real(*a)))
    threads = [
        threading.Thread(target=fetch_shard, args=(prefix, folder, entry, manifest["vocab_size"]))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and (folder / entry["file"]).stat().st_size == entry["bytes"]


def test_missing_bucket_is_named(s3, tmp_path):
    cfg = small_config(
        tmp_path, write_corpus(tmp_path, docs=4), "data.out_dir=s3://raylm-no-such-bucket/data"
    )
    with pytest.raises(
        StorageError,
        match="bucket raylm-no-such-bucket of s3://raylm-no-such-bucket/data does "
        "not exist .*from AWS_ENDPOINT_URL",
    ):
        prepare(cfg, use_ray=False)
    with pytest.raises(DataError, match="no prepared data in s3://raylm-test/nothing-here"):
        read_data_manifest("s3://raylm-test/nothing-here")


@pytest.mark.parametrize("silent", [False, True], ids=["refused", "silent"])
def test_endpoint_down_fails_fast_naming_the_variable(monkeypatch, silent):
    listener = socket.socket()
    listener.bind(("127.0.0.1", free_port() if not silent else 0))
    port = listener.getsockname()[1]
    if silent:
        listener.listen(8)  # accepts connections and never answers
        monkeypatch.setattr("raylm.storage.fs.PROBE_TIMEOUT_S", 3.0)
    else:
        listener.close()  # nothing listens: connections are refused
    use_endpoint(monkeypatch, f"http://127.0.0.1:{port}")
    started = time.monotonic()
    try:
        with pytest.raises(StorageError, match=rf"endpoint .*127\.0\.0\.1:{port} from AWS_ENDPOINT_URL"):
            read_data_manifest(f"s3://raylm-down-{port}/data")
    finally:
        listener.close()
    assert time.monotonic() - started < 15


def test_corpus_on_s3_gives_the_same_shards(s3, tmp_path):
    corpus = write_corpus(tmp_path, docs=12)
    for path in sorted(corpus.iterdir()):
        put_object(s3, f"corpus/{tmp_path.name}/{path.name}", path.read_bytes())
    local = small_config(tmp_path / "a", corpus)
    remote = small_config(tmp_path / "b", corpus, f"data.paths=['s3://{BUCKET}/corpus/{tmp_path.name}']")
    prepare(local, use_ray=False)
    prepare(remote, use_ray=False)
    shas = [[e["sha256"] for e in read_data_manifest(c.data.out_dir)["shards"]] for c in (local, remote)]
    assert shas[0] == shas[1]


def test_a_checkpoint_of_a_run_on_s3_data_carries_its_tokenizer(on_s3, tmp_path):
    """Checkpoints copy the run's tokenizer.json; for a prefix it comes from the node's verified cache."""
    from raylm.checkpoint.writer import tokenizer_source
    from raylm.config import with_overrides

    local, remote, _, _ = on_s3
    fresh = with_overrides(remote, {"data.cache_dir": str(tmp_path / "other-node")})
    copied = tokenizer_source(fresh)
    assert (
        copied is not None
        and copied.read_bytes() == (Path(local.data.out_dir) / "tokenizer.json").read_bytes()
    )
