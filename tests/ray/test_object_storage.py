"""`raylm prepare` through Ray Data straight into an S3 prefix (moto on 127.0.0.1, reached as real S3 is), then the
same samples from the prefix as from the local prepared folder of the same corpus."""

from __future__ import annotations

import numpy as np
import pytest

from raylm.config import resolve
from raylm.config.loader import read_yaml
from raylm.data.cache import verify
from raylm.data.prepare import prepare
from raylm.data.shards import read_data_manifest
from raylm.data.stream import RankStream
from raylm.storage.objects import object_sizes
from raylm.storage.uri import parse_uri
from tests.conftest import SMALL_MODEL, TINY_CONFIG
from tests.s3_server import BUCKET, create_bucket, s3_server, use_endpoint


@pytest.fixture(scope="module")
def endpoint():
    with s3_server() as url:
        create_bucket(url)
        yield url


def _samples(source, cache_dir, count=8):
    stream = RankStream(
        source, "train", 32, seed=3, dp_rank=0, dp_size=2, micro_batch=2, prefetch=0, cache_dir=str(cache_dir)
    )
    try:
        return [next(stream)[0] for _ in range(count)]
    finally:
        stream.close()


def test_prepare_on_ray_into_s3_streams_like_local(
    ray_cluster, prepared, small_corpus, endpoint, monkeypatch, tmp_path
):
    use_endpoint(monkeypatch, endpoint)
    prefix = f"s3://{BUCKET}/ray/{tmp_path.name}"
    cfg = resolve(
        read_yaml(TINY_CONFIG),
        SMALL_MODEL
        + [
            f"data.paths=['{small_corpus}']",
            f"data.out_dir={prefix}",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
    )
    summary = prepare(cfg)
    assert summary["out_dir"] == prefix and summary["uploaded"] == summary["shards"]
    local = read_data_manifest(prepared)
    assert [e["sha256"] for e in read_data_manifest(prefix)["shards"]] == [
        e["sha256"] for e in local["shards"]
    ]
    assert {"manifest.json", "tokenizer.json"} <= set(object_sizes(parse_uri(prefix)))
    assert verify(prefix)["ok"]
    fresh_node = tmp_path / "node-cache"
    for ours, theirs in zip(_samples(prefix, fresh_node), _samples(prepared, fresh_node), strict=False):
        assert np.array_equal(ours, theirs)
