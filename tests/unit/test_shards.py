"""Shards and manifest: exact shard cuts, verify, and each corruption kind named with its shard."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_data_support import prepared

from raylm.data.cache import verify
from raylm.data.shards import ShardWriter, read_data_manifest
from raylm.data.tokenizer import train_tokenizer
from raylm.errors import DataError
from raylm.storage.atomic import write_json_atomic

pytestmark = pytest.mark.unit


def test_writer_cuts_exact_shards(tmp_path):
    writer = ShardWriter(tmp_path, "train", np.dtype("<u2"), shard_tokens=10, eot=0)
    for _ in range(5):
        writer.add(np.array([5, 6, 7, 0], dtype=np.uint32))
    entries = writer.close()
    assert [e["tokens"] for e in entries] == [10, 10]
    assert [e["docs"] for e in entries] == [2, 3]
    joined = np.concatenate([np.fromfile(tmp_path / e["file"], dtype="<u2") for e in entries])
    assert joined.tolist() == [5, 6, 7, 0] * 5


def test_verify_ok(tmp_path):
    out = prepared(tmp_path)
    summary = verify(out)
    assert summary["ok"] and summary["splits"]["train"]["tokens"] > 0 and summary["shards"] >= 2


def first_shard(out):
    return out / read_data_manifest(out)["shards"][0]["file"]


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "bytes but the manifest says"),
        ("edit", "sha256 .* but the manifest says"),
        ("delete", "is missing"),
    ],
)
def test_verify_names_the_bad_shard(tmp_path, damage, message):
    out = prepared(tmp_path)
    shard = first_shard(out)
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[:-2])
    elif damage == "edit":
        shard.write_bytes(data[:2] + bytes([data[2] ^ 1]) + data[3:])
    else:
        shard.unlink()
    with pytest.raises(DataError, match=message) as info:
        verify(out)
    assert shard.name in str(info.value) and "raylm prepare" in str(info.value)


def test_verify_token_beyond_vocab(tmp_path):
    out = prepared(tmp_path)
    manifest = read_data_manifest(out)
    manifest["vocab_size"] = 100  # as if the shards came from a bigger tokenizer than the one recorded
    write_json_atomic(out / "manifest.json", manifest)
    with pytest.raises(DataError, match=r"token id \d+ >= vocab size 100"):
        verify(out)


def test_manifest_from_another_tokenizer(tmp_path):
    out = prepared(tmp_path)
    train_tokenizer(["some other text"] * 10, vocab_size=300).save(str(out / "tokenizer.json"))
    with pytest.raises(DataError, match="another tokenizer"):
        verify(out)


def test_missing_or_garbled_manifest(tmp_path):
    with pytest.raises(DataError, match="run `raylm prepare`"):
        verify(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        verify(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DataError, match="not a raylm-shards/1 manifest"):
        verify(tmp_path)
