"""The one atomic write (temp + fsync + rename) and the one manifest reader, on a local folder."""

from __future__ import annotations

import json

import pytest

from raylm.storage.atomic import (
    atomic_open,
    atomic_path,
    copy_atomic,
    put_atomic,
    write_atomic,
    write_json_atomic,
)
from raylm.storage.manifests import ManifestProblem, load_manifest


def test_write_atomic_replaces_whole_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "config.yaml"
    target.write_text("old\n")
    write_atomic(target, "new\n")
    write_json_atomic(tmp_path / "m.json", {"a": 1})
    put_atomic(tmp_path / "p.txt", b"bytes")
    copy_atomic(target, tmp_path / "copy.yaml")
    assert target.read_text() == "new\n" and (tmp_path / "copy.yaml").read_text() == "new\n"
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1}
    assert (tmp_path / "p.txt").read_bytes() == b"bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "copy.yaml", "m.json", "p.txt"]


def test_a_failed_write_keeps_the_old_content(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_open(target) as f:
        f.write(b"half")
        raise RuntimeError("writer died")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer died")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


@pytest.mark.parametrize(
    "content, kind, detail",
    [
        (None, "missing", None),
        (b"{", "json", None),
        (b"[]", "format", "list"),
        (b'{"format": "other/1"}', "format", "other/1"),
    ],
)
def test_manifest_problems_say_which_step_failed(tmp_path, content, kind, detail):
    if content is not None:
        (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(ManifestProblem) as caught:
        load_manifest(tmp_path / "manifest.json", "raylm-test/1")
    assert caught.value.kind == kind
    if detail is not None:
        assert caught.value.detail == detail


def test_a_good_manifest_is_read(tmp_path):
    (tmp_path / "manifest.json").write_text('{"format": "raylm-test/1", "files": {}}')
    manifest = load_manifest(tmp_path / "manifest.json", "raylm-test/1")
    assert manifest == {"format": "raylm-test/1", "files": {}}
