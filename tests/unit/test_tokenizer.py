"""Tokenizer: exact round trip on real files, end-of-document token, vocab checks."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from raylm.data.tokenizer import EOT, MIN_VOCAB, load_tokenizer_file, train_tokenizer
from raylm.errors import DataError

pytestmark = pytest.mark.unit

STDLIB = Path(sysconfig.get_paths()["stdlib"])
REAL_FILES = ["json/decoder.py", "email/message.py", "textwrap.py", "unicodedata.py", "encodings/cp1252.py"]


def real_texts() -> list[str]:
    return [(STDLIB / name).read_text(encoding="utf-8") for name in REAL_FILES if (STDLIB / name).is_file()]


def test_round_trip_on_real_files():
    texts = real_texts()
    tokenizer = train_tokenizer(texts[:2], vocab_size=512)
    extra = "naïve café ☃ 😀 \t\r\n  trailing spaces   \x0b"  # unseen characters fall back to bytes
    for text in texts + [extra]:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text
    assert tokenizer.get_vocab_size() <= 512
    assert tokenizer.token_to_id(EOT) == 0


def test_vocab_too_small_for_bytes():
    with pytest.raises(DataError, match="data.vocab_size=200 is too small.*>= 259"):
        train_tokenizer(["hello"], vocab_size=200)
    assert MIN_VOCAB == 259


def test_load_checks_eot_and_vocab(tmp_path):
    tokenizer = train_tokenizer(real_texts()[:1], vocab_size=400)
    path = tmp_path / "tok.json"
    tokenizer.save(str(path))
    assert load_tokenizer_file(path, max_vocab=400).get_vocab_size() == tokenizer.get_vocab_size()
    with pytest.raises(DataError, match="set data.vocab_size=400"):
        load_tokenizer_file(path, max_vocab=300)
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not a Hugging Face tokenizer.json"):
        load_tokenizer_file(tmp_path / "bad.json")
