"""Storage URIs without a server: parsing, config-time refusals, path pinning, error lines and their scrubbing."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from raylm.config import resolve
from raylm.data.shards import ShardDigest
from raylm.errors import ConfigError, DataError, StorageError
from raylm.storage.fs import describe, endpoint
from raylm.storage.uri import NOT_YET, StorageUri, is_uri, parse_uri, refuse_uri
from raylm.train.driver import with_absolute_paths

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "text, scheme, bucket, key",
    [
        ("s3://bucket/data/tiny", "s3", "bucket", "data/tiny"),
        ("s3://bucket/data/tiny/", "s3", "bucket", "data/tiny"),
        ("S3://my.bucket-1//a//b", "s3", "my.bucket-1", "a/b"),
        ("gs://bucket", "gs", "bucket", ""),
    ],
)
def test_parse_uri(text, scheme, bucket, key):
    uri = parse_uri(text)
    assert (uri.scheme, uri.bucket, uri.key) == (scheme, bucket, key)
    assert uri.join("manifest.json").path == "/".join(p for p in (bucket, key, "manifest.json") if p)


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "hdfs://nn/data",
            r"data\.out_dir='hdfs://nn/data' uses the scheme hdfs://, which raylm does not read or "
            r"write; use a local path, s3://bucket/prefix or gs://bucket/prefix",
        ),
        ("s3://Bad_Bucket/x", "has no valid bucket name"),
        ("s3:///x", "has no valid bucket name"),
        ("s3://bucket/a/../b", r"'\.' or '\.\.' component"),
    ],
)
def test_parse_uri_refuses_with_one_line(text, message):
    with pytest.raises(StorageError, match=message) as info:
        parse_uri(text, "data.out_dir")
    assert "\n" not in str(info.value)


def test_is_uri_leaves_local_paths_alone():
    assert is_uri("s3://b/x") and is_uri("file:///x") and not is_uri("data/tiny") and not is_uri("s3:/b/x")
    assert not is_uri("/abs/path") and not is_uri("") and not is_uri(None)


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.tokenizer=s3://bucket/tok.json", "data.tokenizer"),
        ("data.cache_dir=s3://bucket/cache", "data.cache_dir"),
    ],
)
def test_uris_that_are_not_built_yet_are_refused_at_config_time(override, key):
    with pytest.raises(
        ConfigError, match=rf"^{key}='s3://bucket/[a-z.]+': .*\(URIs work in run\.dir, data\.out_dir"
    ):
        resolve({}, [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.out_dir=hdfs://nn/data", "uses the scheme hdfs://"),
        ("data.paths=['ftp://host/corpus']", "uses the scheme ftp://"),
        ("data.sources=[{path: 'az://c/d'}]", "uses the scheme az://"),
        ("data.paths=['s3://bucket/corpus/*.txt']", "globs are not expanded on object storage"),
    ],
)
def test_bad_data_uris_are_refused_at_config_time(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve({}, [override])


def test_data_uris_are_accepted_and_stay_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rel").mkdir()
    (tmp_path / "rel" / "a.txt").write_text("text")
    cfg = resolve(
        {},
        [
            "data.out_dir=s3://bucket/data",
            "data.paths=['s3://bucket/corpus', 'gs://other/c.txt', 'rel/*.txt']",
            "data.sources=[{path: 's3://bucket/data', weight: 2}]",
            "data.cache_dir=cache",
        ],
    )
    pinned = with_absolute_paths(cfg)
    assert pinned.data.out_dir == "s3://bucket/data" and pinned.data.sources[0]["path"] == "s3://bucket/data"
    assert pinned.data.paths == ["s3://bucket/corpus", "gs://other/c.txt", str(tmp_path / "rel" / "*.txt")]
    assert pinned.data.cache_dir == str(tmp_path / "cache") and pinned.run.dir == str(tmp_path / "runs")
    assert not (tmp_path / "s3:").exists()


def test_endpoint_variable_order(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://general:9000")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:9000")
    assert endpoint("s3") == ("AWS_ENDPOINT_URL_S3", "http://s3-only:9000")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert endpoint("s3") == ("AWS_ENDPOINT_URL", "http://general:9000")


@pytest.mark.parametrize(
    "raw, expected",
    [
        (
            "AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7",
            "the storage endpoint does not answer",
        ),
        (
            "AWS Error ACCESS_DENIED during GetObject operation: Access Denied",
            "access to bucket bucket is denied",
        ),
        ("AWS Error NO_SUCH_BUCKET during CreateMultipartUpload operation", "bucket bucket does not exist"),
    ],
)
def test_storage_errors_become_one_scrubbed_line(monkeypatch, raw, expected):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-123")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://user:pw@minio.local:9000")
    line = describe(
        OSError(f"{raw}; signed with s3cr3t-value-123\nmore"), StorageUri("s3", "bucket", "x"), "read"
    )
    assert expected in line and "s3cr3t" not in line and "pw@" not in line and "\n" not in line
    if "endpoint" in expected:
        assert "minio.local:9000 from AWS_ENDPOINT_URL" in line


def test_shard_digest_pieces_of_any_length():
    tokens = np.arange(1000, dtype="<u2")
    data = tokens.tobytes()
    digest = ShardDigest("<u2")
    for start in range(0, len(data), 7):  # pieces that end inside a token
        digest.update(data[start : start + 7])
    entry = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    digest.check("x.bin", entry, vocab_size=1000)
    assert digest.top == 999
    with pytest.raises(DataError, match="token id 999 >= vocab size 999"):
        digest.check("x.bin", entry, vocab_size=999)
    with pytest.raises(DataError, match="x.bin has 2000 bytes but the manifest says 2002"):
        digest.check("x.bin", {**entry, "bytes": 2002}, vocab_size=1000)


def test_refuse_uri_names_the_key_and_the_fix():
    refuse_uri("data.tokenizer", "tok/t1.json", NOT_YET["data.tokenizer"])  # a path: nothing to refuse
    with pytest.raises(
        StorageError, match=r"^data.tokenizer='s3://b/e': a given tokenizer is read from a local"
    ):
        refuse_uri("data.tokenizer", "s3://b/e", NOT_YET["data.tokenizer"])


@pytest.mark.parametrize(
    "override",
    ["data.out_dir=s3://AKIAX:hunter2-secret@bucket/data", "run.dir=s3://AKIAX:hunter2-secret@bucket/runs"],
)
def test_credentials_in_a_uri_are_refused_and_never_echoed(override):
    with pytest.raises(ConfigError) as info:
        resolve({}, [override])
    assert "hunter2" not in str(info.value) and "AKIAX" not in str(info.value) and "***@" in str(info.value)


@pytest.mark.parametrize(
    "argv,key",
    [
        (["export", "runs/x", "ftp://bucket/exports/x"], "export OUT_DIR"),
        (["export", "file:///bucket/runs/x", "out"], "RUN_OR_CHECKPOINT"),
        (["generate", "hdfs://bucket/runs/x", "--prompt", "a"], "RUN_OR_CHECKPOINT"),
        (["eval", "az://bucket/runs/x"], "RUN_OR_CHECKPOINT"),
    ],
)
def test_verbs_refuse_uris_of_other_schemes(argv, key, tmp_path, monkeypatch, capsys):
    """Not a local folder named 'ftp:' and a silent success: one line naming the argument, exit 5."""
    from raylm.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(argv) == 5
    err = capsys.readouterr().err
    assert (
        err.startswith(f"raylm: error: {key}=") and err.count("\n") == 1 and "does not read or write" in err
    ), err
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "gs:").exists()
