"""Corpus readers: files, folders, globs, JSON Lines, Parquet; decode policy; bad input is one DataError."""

from __future__ import annotations

import json

import pytest

from raylm.data.corpus import ReadPolicy, default_paths, list_files, read_documents
from raylm.errors import DataError

pytestmark = pytest.mark.unit


def docs_of(paths, **policy):
    return [d for f in list_files(paths) for d in read_documents(f, ReadPolicy(**policy))]


def test_folder_glob_and_file(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "sub" / "skip.bin").write_bytes(b"\x00\x01")  # unknown suffix: skipped in folder walks
    assert [d[:2] for d in docs_of([str(tmp_path)])] == [("a.txt", "alpha"), ("sub/b.md", "beta")]
    assert [d[1] for d in docs_of([str(tmp_path / "**" / "*.md")])] == ["beta"]
    assert len(list_files([str(tmp_path / "a.txt"), str(tmp_path)])) == 2  # deduplicated


def test_default_corpus_is_stdlib():
    files = list_files([])
    assert len(files) > 500 and all(f.path.endswith(".py") for f in files)
    assert not any("site-packages" in f.path for f in files)
    assert default_paths()[0].endswith("*.py")


def test_bad_inputs_are_one_line(tmp_path):
    with pytest.raises(DataError, match="matches no file or folder"):
        list_files([str(tmp_path / "nothing*.txt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no readable files"):
        list_files([str(tmp_path / "empty")])
    (tmp_path / "bin.txt").write_bytes(b"abc\x00\x00def")
    with pytest.raises(DataError, match=r"bin.txt looks binary.*remove it") as info:
        docs_of([str(tmp_path / "bin.txt")])
    assert "\n" not in str(info.value)


def test_decode_policy(tmp_path):
    (tmp_path / "latin.txt").write_bytes("caf\xe9 ok".encode("latin-1"))
    [(doc_id, text, replaced)] = docs_of([str(tmp_path / "latin.txt")])
    assert text == "caf\ufffd ok" and replaced == 1
    with pytest.raises(DataError, match="not valid UTF-8 at byte 3.*decode_errors=replace"):
        docs_of([str(tmp_path / "latin.txt")], decode_errors="strict")


def test_large_file_in_pieces(tmp_path):
    (tmp_path / "big.txt").write_text("".join(f"line {i}\n" for i in range(1000)))
    docs = docs_of([str(tmp_path / "big.txt")], max_doc_bytes=1000)
    assert len(docs) > 5 and "".join(d[1] for d in docs) == (tmp_path / "big.txt").read_text()
    assert docs[1][0] == "big.txt#1" and all(d[1].endswith("\n") for d in docs)


def test_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "r.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"r.jsonl:3 has no string field 'text'.*data.text_field"):
        docs_of([str(tmp_path / "r.jsonl")])
    (tmp_path / "s.jsonl").write_text(json.dumps({"body": "x"}) + "\n" + json.dumps({"body": "y"}) + "\n")
    assert [d[:2] for d in docs_of([str(tmp_path / "s.jsonl")], text_field="body")] == [
        ("s.jsonl:1", "x"),
        ("s.jsonl:2", "y"),
    ]
    pq.write_table(pa.table({"content": ["p0", None, "p2"]}), tmp_path / "t.parquet")
    assert [d[1] for d in docs_of([str(tmp_path / "t.parquet")], text_field="content")] == ["p0", "p2"]
    with pytest.raises(DataError, match="no column 'text'"):
        docs_of([str(tmp_path / "t.parquet")])
