"""Byte-level BPE tokenizer for prepare and generate: train one with Hugging Face `tokenizers` or load a tokenizer.json.

Normalization: none. Text is split with the GPT-2 byte-level pre-tokenizer and every byte has a token, so
decode(encode(text)) == text for any Unicode text, including characters never seen in training. Each document
ends with the end-of-document token EOT (id 0), appended by prepare rather than found in the text: special-token
strings inside a document are encoded as ordinary text.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from raylm.errors import DataError
from raylm.storage.file_names import MANIFEST_FILE, TOKENIZER_FILE

EOT = "<|endoftext|>"
SPECIAL_TOKENS = (
    EOT,
    "<|pad|>",
    "<|bos|>",
)  # ids 0, 1, 2; only EOT is written to shards, the rest are reserved
EOT_ID = 0
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte plus the special tokens
TOKENIZER_OBJECT = re.compile(r"^tokenizer-[0-9a-f]{16}\.json$")


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_VOCAB:
        raise DataError(
            f"data.vocab_size={vocab_size} is too small for the byte alphabet (256) plus "
            f"{len(SPECIAL_TOKENS)} special tokens; set data.vocab_size >= {MIN_VOCAB}"
        )


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with at most `vocab_size` tokens (fewer when the texts run out of merges)."""
    check_vocab_size(vocab_size)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _configured(tokenizer)


def _configured(tokenizer: Tokenizer) -> Tokenizer:
    # A literal "<|endoftext|>" in a document must not become a document boundary.
    tokenizer.encode_special_tokens = True
    return tokenizer


def load_tokenizer_file(path: str | Path, max_vocab: int | None = None) -> Tokenizer:
    """Load a tokenizer.json; it must have EOT at id 0 and, when max_vocab is given, at most max_vocab tokens."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(
            f"tokenizer file {path} does not exist; fix data.tokenizer (or leave it empty to train one) "
            f"or run `raylm prepare CONFIG`"
        )
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises plain Exception with a multi-line message
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"{path} is not a Hugging Face tokenizer.json ({reason}); point data.tokenizer at one "
            f"(for example the tokenizer.json that `raylm prepare` wrote)"
        ) from None
    if tokenizer.token_to_id(EOT) != EOT_ID:
        raise DataError(
            f"{path} has no {EOT} token at id {EOT_ID}, raylm's end-of-document token; "
            f"use a tokenizer.json written by `raylm prepare`"
        )
    vocab = tokenizer.get_vocab_size()
    if max_vocab is not None and vocab > max_vocab:
        raise DataError(
            f"{path} has {vocab} tokens but data.vocab_size={max_vocab} leaves room for only "
            f"{max_vocab}; set data.vocab_size={vocab}"
        )
    return _configured(tokenizer)


def tokenizer_object(sha256: str) -> str:
    """A prepared folder's copy of its tokenizer under a name of its own sha256: prepare moves it in before the
    manifest, so the tokenizer a manifest names is in place the moment the manifest is (tokenizer.json follows)."""
    return f"tokenizer-{sha256[:16]}.json"


def tokenizer_path(folder: str | Path, sha256: str) -> Path:
    """The tokenizer file of a prepared folder whose manifest names `sha256`: its sha256-named copy when there is
    one (a prepare killed between the manifest and tokenizer.json leaves the plain name stale), else tokenizer.json."""
    named = Path(folder) / tokenizer_object(sha256)
    return named if sha256 and named.is_file() else Path(folder) / TOKENIZER_FILE


def load_tokenizer(out_dir: str | Path) -> Tokenizer:
    """The tokenizer that prepare saved beside the shards in out_dir (the one its manifest names)."""
    folder = Path(out_dir).expanduser()
    try:
        sha256 = json.loads((folder / MANIFEST_FILE).read_text()).get("tokenizer_sha256", "")
    except (OSError, ValueError, AttributeError):
        sha256 = ""
    return load_tokenizer_file(tokenizer_path(folder, sha256))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def encode_documents(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype) -> list[np.ndarray]:
    """Each text's token ids then EOT, in `dtype` (the fast batch call skips offsets, which shards do not keep)."""
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    out = []
    for encoding in encodings:
        token_ids = encoding.ids  # a fresh Python list on every access
        ids = np.empty(len(token_ids) + 1, dtype=dtype)
        ids[:-1] = token_ids
        ids[-1] = EOT_ID
        out.append(ids)
    return out
