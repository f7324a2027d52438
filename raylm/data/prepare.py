"""`raylm prepare`: corpus -> tokenizer -> shards + manifest.json, through Ray Data (or in-process, same bytes).

1. List the files. When manifest.json records the same inputs (paths, sizes, mtimes, data settings, tokenizer)
   and every shard is in place, stop: a rerun on unchanged input is a no-op.
2. Train the byte-level BPE on a sample of at most TOKENIZER_SAMPLE_BYTES (files in stable-hash order), or load
   data.tokenizer.
3. Group the files into units; each unit is one Ray Data `map_batches` task that reads its documents and
   tokenizes them with encode_batch_fast, FLUSH_TEXT_BYTES at a time. Blocks come back in order and the driver appends
   them to one shard writer per split, so the shards are the same bytes whichever path or task order ran.
4. A document is in the validation split when a stable hash of its id is below data.val_fraction; the first
   document of the file with the lowest hash is always there too, so a small corpus still has a validation split.
Everything is written to a staging folder inside out_dir; `_commit` moves the new shards and the tokenizer (under
its sha256 name, tokenizer-<sha>.json) in, then manifest.json (the commit point), then tokenizer.json, so a prepare
killed at any point leaves a folder that verifies: the manifest names shards and a tokenizer that are in place
(readers take the tokenizer by the manifest's sha256 name, raylm.data.shards.tokenizer_path). The folder's readers
lock (raylm.data.readers_lock) keeps a second prepare out, and keeps prepare from replacing the shards of a folder
that a running `raylm train` reads. fault.drill=prepare@50 or commit@K SIGKILLs prepare at half the text or after
the K-th rename of the commit, to rehearse that.
On a multi-node Ray the corpus must be on storage every node sees (tasks read it); the driver writes the shards.
An s3:// or gs:// data.out_dir is prepared into a local folder first and then uploaded (raylm.data.publish).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from raylm.config import Config, with_overrides
from raylm.config.drills import parse_drills
from raylm.data.cache import cache_folder
from raylm.data.corpus import CorpusFile, ReadPolicy, list_files, read_documents, refuse_binary_files
from raylm.data.publish import remote_current, upload_prepared
from raylm.data.ray_datasets import (
    ERROR_COLUMN,
    errors_as_rows,
    ordered,
    probe_ray_address,
    raise_if_error,
    ray_session,
)
from raylm.data.readers_lock import writing
from raylm.data.shards import (
    FORMAT,
    SHARD_NAME,
    SPLITS,
    ShardWriter,
    check_shard,
    check_tokenizer,
    read_data_manifest,
    split_summary,
    token_dtype,
)
from raylm.data.tokenizer import (
    EOT_ID,
    TOKENIZER_OBJECT,
    encode_documents,
    file_sha256,
    load_tokenizer_file,
    tokenizer_object,
    train_tokenizer,
)
from raylm.errors import DataError
from raylm.fsync import fsync_path
from raylm.log import get_logger
from raylm.storage.atomic import put_atomic, write_json_atomic
from raylm.storage.file_names import MANIFEST_FILE, TOKENIZER_FILE
from raylm.storage.fs import filesystem
from raylm.storage.uri import is_uri, parse_uri

PREPARE_VERSION = 1  # part of the input fingerprint: bump when prepare writes other bytes for the same input
TOKENIZER_SAMPLE_BYTES = (
    16 << 20
)  # BPE training reads at most this much text: memory stays flat as corpora grow
FLUSH_TEXT_BYTES = 4 << 20  # text per encode_batch call inside a task: bounds a task's memory
UNITS_PER_CPU = 4  # enough tasks to keep every CPU busy to the end, few enough to amortize task start-up
UNIT_BYTES_RANGE = (256 << 10, 64 << 20)
STAGING_PREFIX = ".staging-"


@dataclass(frozen=True)
class EncodeSpec:
    """What a task needs besides its files (picklable, the same for every task)."""

    tokenizer_json: str
    policy: ReadPolicy
    val_fraction: float
    dtype: str
    anchor_path: str  # the file whose first document always goes to val


@dataclass
class Totals:
    files: int = 0
    docs: int = 0
    text_bytes: int = 0
    replaced_bytes: int = 0
    entries: list = field(default_factory=list)


def prepare(cfg: Config, use_ray: bool = True) -> dict:
    """Tokenize data.paths into data.out_dir; returns a summary (`skipped` when the folder was already current)."""
    if is_uri(cfg.data.out_dir):
        return _prepare_to_uri(cfg, use_ray)
    started, data = time.monotonic(), cfg.data
    out_dir = Path(data.out_dir).expanduser()
    files, given, input_sha = prepare_inputs(data)
    current = _up_to_date(out_dir, input_sha)
    if current is not None:
        get_logger().info(
            "prepare: %s is up to date with its %d input files; nothing to do", out_dir, len(files)
        )
        if (
            current.get("seq_len") != data.seq_len
        ):  # only peek's default window length; the shards do not change
            current = {**current, "seq_len": data.seq_len}
            write_json_atomic(out_dir / MANIFEST_FILE, current)
        _tidy(out_dir, current)
        return _summary(current, out_dir, skipped=True, seconds=time.monotonic() - started)
    if use_ray:
        probe_ray_address()  # a dead RAY_ADDRESS fails in seconds, before any tokenizing
    out_dir.mkdir(parents=True, exist_ok=True)
    with writing(out_dir):
        manifest, timings = _build(
            files, data, given, input_sha, out_dir, use_ray, PrepareDrill(cfg.fault.drill)
        )
    _warn_small_val(manifest, data)
    summary = _summary(manifest, out_dir, skipped=False, seconds=time.monotonic() - started)
    get_logger().info(
        "prepare: %d docs -> %d tokens in %d shards at %s",
        summary["docs"],
        summary["tokens"],
        summary["shards"],
        out_dir,
    )
    return {**summary, **timings}


def _prepare_to_uri(cfg: Config, use_ray: bool = True) -> dict:
    """Tokenize data.paths into the data.out_dir prefix; the summary names the URI (`skipped`: current)."""
    started = time.monotonic()
    uri = parse_uri(cfg.data.out_dir, "data.out_dir")
    filesystem(uri)
    _, _, input_sha = prepare_inputs(cfg.data)
    current = remote_current(uri, input_sha)
    if current is not None:
        get_logger().info("prepare: %s is up to date with its input files; nothing to do", uri)
        if current.get("seq_len") != cfg.data.seq_len:  # only peek's default window length
            current = {**current, "seq_len": cfg.data.seq_len}
            put_atomic(uri.join(MANIFEST_FILE), json.dumps(current, indent=1) + "\n")
        summary = _summary(current, str(uri), skipped=True, seconds=time.monotonic() - started)
        return {**summary, "uploaded": 0}
    mirror = cache_folder(uri, cfg.data.cache_dir)
    summary = prepare(with_overrides(cfg, {"data.out_dir": str(mirror)}), use_ray)
    uploaded = upload_prepared(mirror, uri)
    return {
        **summary,
        "out_dir": str(uri),
        "skipped": False,
        "uploaded": uploaded,
        "seconds": time.monotonic() - started,
    }


def _build(
    files: list[CorpusFile],
    data,
    given: Path | None,
    input_sha: str,
    out_dir: Path,
    use_ray: bool,
    drill: PrepareDrill,
) -> tuple[dict, dict]:
    """Tokenizer, shards and manifest into a staging folder, then commit; (manifest, timings)."""
    refuse_binary_files(files)  # cheap checks first: bad input fails before any Ray worker starts
    staging = _fresh_staging(out_dir, input_sha[:8])
    try:
        tokenizer_started = time.monotonic()
        tokenizer_json = _tokenizer_into(
            staging, data, files, given
        )  # reads the sample: most bad files fail here
        spec = EncodeSpec(
            tokenizer_json,
            ReadPolicy.from_config(data),
            data.val_fraction,
            token_dtype(data.vocab_size).str,
            _anchor(files).path,
        )
        tokenizer_s = time.monotonic() - tokenizer_started
        with ray_session() if use_ray else nullcontext():
            pipeline_started = time.monotonic()  # Ray start-up is not pipeline time
            run = _run_on_ray if use_ray else _run_local
            totals = run(files, spec, staging, data.shard_tokens, input_sha[:8], drill)
            timings = {"tokenizer_s": tokenizer_s, "pipeline_s": time.monotonic() - pipeline_started}
        _check_enough(totals, data)
        manifest = _manifest(totals, data, input_sha, file_sha256(staging / TOKENIZER_FILE))
        write_json_atomic(staging / MANIFEST_FILE, manifest)
        _commit(staging, out_dir, drill)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest, timings


def prepare_inputs(data) -> tuple[list[CorpusFile], Path | None, str]:
    """(corpus files, data.tokenizer path or None, input fingerprint): what decides whether a folder is current."""
    files = list_files(data.paths)
    given = _given_tokenizer(data)
    return files, given, _fingerprint(files, data, file_sha256(given) if given else "")


def _given_tokenizer(data) -> Path | None:
    if not data.tokenizer:
        return None
    path = Path(data.tokenizer).expanduser()
    load_tokenizer_file(path, max_vocab=data.vocab_size)  # fails here, before any work, when it cannot serve
    return path


def _fingerprint(files: list[CorpusFile], data, tokenizer_sha: str) -> str:
    """sha256 over everything the shards depend on (like make: file size and mtime, not contents)."""
    settings = {
        k: getattr(data, k)
        for k in (
            "vocab_size",
            "val_fraction",
            "text_field",
            "decode_errors",
            "shard_tokens",
            "max_doc_bytes",
        )
    }
    blob = {
        "version": PREPARE_VERSION,
        "format": FORMAT,
        "settings": settings,
        "tokenizer_sha256": tokenizer_sha,
        "sample_bytes": TOKENIZER_SAMPLE_BYTES,
        "files": [[f.path, f.doc_id, f.size_bytes, f.mtime_ns] for f in files],
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _up_to_date(out_dir: Path, input_sha: str) -> dict | None:
    """The current manifest when it was built from these inputs and every file still matches it: the tokenizer
    and each shard by sha256 (a size check would miss a shard damaged in place; a damaged one is rebuilt)."""
    if not (out_dir / MANIFEST_FILE).is_file():
        return None
    try:
        manifest = read_data_manifest(out_dir)
        if manifest.get("input_sha256") != input_sha:
            return None
        check_tokenizer(out_dir, manifest)
        if file_sha256(out_dir / TOKENIZER_FILE) != manifest["tokenizer_sha256"]:
            return None  # a commit stopped before its tokenizer.json: rebuilt like any stale folder
        for entry in manifest["shards"]:
            check_shard(out_dir, entry, manifest["vocab_size"])
    except DataError as exc:
        get_logger().warning("%s; rebuilding %s", exc, out_dir)
        return None
    except (OSError, KeyError):
        return None  # anything amiss: rebuild
    return manifest


def _fresh_staging(out_dir: Path, tag: str) -> Path:
    """An empty staging folder; leftovers of interrupted runs are removed."""
    for old in out_dir.glob(STAGING_PREFIX + "*"):
        shutil.rmtree(old, ignore_errors=True)
    staging = out_dir / f"{STAGING_PREFIX}{tag}"
    staging.mkdir()
    return staging


def _tokenizer_into(staging: Path, data, files: list[CorpusFile], given: Path | None) -> str:
    """Write tokenizer.json into staging (a byte copy of data.tokenizer, or a newly trained one); its JSON text."""
    target = staging / TOKENIZER_FILE
    if given is not None:
        shutil.copyfile(given, target)
    else:
        tokenizer = train_tokenizer(_sample_texts(files, ReadPolicy.from_config(data)), data.vocab_size)
        target.write_text(tokenizer.to_str())
    return target.read_text()


def _doc_hash(doc_id: str) -> float:
    """A stable number in [0, 1) for a document id (the same on every machine and Python)."""
    return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") / 2.0**64


def _anchor(files: list[CorpusFile]) -> CorpusFile:
    return min(files, key=lambda f: (_doc_hash(f.doc_id), f.path))


def _sample_texts(files: list[CorpusFile], policy: ReadPolicy) -> Iterator[str]:
    """Texts for tokenizer training: whole files in stable-hash order until TOKENIZER_SAMPLE_BYTES."""
    taken = 0
    for file in sorted(files, key=lambda f: (_doc_hash(f.doc_id), f.path)):
        for _, text, _ in read_documents(file, policy):
            yield text
            taken += len(text)
            if taken >= TOKENIZER_SAMPLE_BYTES:
                return


def split_of(doc_id: str, val_fraction: float) -> str:
    return "val" if _doc_hash(doc_id) < val_fraction else "train"


def encode_unit(files: list[CorpusFile], spec: EncodeSpec, tokenizer) -> Iterator[dict]:
    """Read and tokenize a unit of files: dicts of columns (split, tokens, docs, text_bytes, replaced_bytes)."""
    pending: list[tuple[str, str, int]] = []
    pending_chars = 0
    for file in files:
        for index, (doc_id, text, replaced) in enumerate(read_documents(file, spec.policy)):
            anchored = index == 0 and file.path == spec.anchor_path and spec.val_fraction > 0
            pending.append(("val" if anchored else split_of(doc_id, spec.val_fraction), text, replaced))
            pending_chars += len(text)
            if pending_chars >= FLUSH_TEXT_BYTES:
                yield _encode(pending, tokenizer, np.dtype(spec.dtype))
                pending, pending_chars = [], 0
    if pending:
        yield _encode(pending, tokenizer, np.dtype(spec.dtype))


def _encode(docs: list[tuple[str, str, int]], tokenizer, dtype: np.dtype) -> dict:
    """One row per split present: the split's documents' tokens back to back, in document order."""
    arrays = encode_documents(tokenizer, [text for _, text, _ in docs], dtype)
    columns: dict[str, list] = {
        "split": [],
        "tokens": [],
        "docs": [],
        "text_bytes": [],
        "replaced_bytes": [],
        ERROR_COLUMN: [],
    }
    for split in SPLITS:
        chosen = [i for i, (s, _, _) in enumerate(docs) if s == split]
        if chosen:
            columns["split"].append(split)
            columns["tokens"].append(np.concatenate([arrays[i] for i in chosen]).tobytes())
            columns["docs"].append(len(chosen))
            columns["text_bytes"].append(sum(len(docs[i][1].encode("utf-8")) for i in chosen))
            columns["replaced_bytes"].append(sum(docs[i][2] for i in chosen))
            columns[ERROR_COLUMN].append("")
    return columns


def _error_columns(message: str) -> dict:
    return {
        "split": [""],
        "tokens": [b""],
        "docs": [0],
        "text_bytes": [0],
        "replaced_bytes": [0],
        ERROR_COLUMN: [message],
    }


def plan_units(files: list[CorpusFile], cpus: float) -> list[list[CorpusFile]]:
    """Consecutive files grouped into about UNITS_PER_CPU units per CPU (the grouping never changes the bytes)."""
    total = sum(f.size_bytes for f in files)
    low, high = UNIT_BYTES_RANGE
    target = min(high, max(low, int(total / max(1.0, cpus * UNITS_PER_CPU))))
    units, unit, size = [], [], 0
    for file in files:
        unit.append(file)
        size += file.size_bytes
        if size >= target:
            units.append(unit)
            unit, size = [], 0
    return units + [unit] if unit else units


class _Sink:
    """The driver's side: appends each row's tokens to its split's writer and adds up the counts."""

    def __init__(
        self, staging: Path, dtype: np.dtype, shard_tokens: int, tag: str, files, drill: PrepareDrill
    ):
        self.dtype = dtype
        self.writers = {s: ShardWriter(staging, s, dtype, shard_tokens, eot=EOT_ID, tag=tag) for s in SPLITS}
        self.totals = Totals(files=len(files))
        self.text_bytes, self.drill = max(1, sum(f.size_bytes for f in files)), drill

    def add(self, columns: dict) -> None:
        raise_if_error(columns[ERROR_COLUMN])
        for split, tokens, docs, text_bytes, replaced in zip(
            columns["split"],
            columns["tokens"],
            columns["docs"],
            columns["text_bytes"],
            columns["replaced_bytes"],
            strict=True,
        ):
            self.writers[split].add(np.frombuffer(tokens, dtype=self.dtype))
            self.totals.docs += int(docs)
            self.totals.text_bytes += int(text_bytes)
            self.totals.replaced_bytes += int(replaced)
        self.drill.at("prepare", 100 * self.totals.text_bytes // self.text_bytes)

    def close(self) -> Totals:
        self.totals.entries = [e for s in SPLITS for e in self.writers[s].close()]
        return self.totals


def _run_local(
    files, spec: EncodeSpec, staging: Path, shard_tokens: int, tag: str, drill: PrepareDrill
) -> Totals:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(spec.tokenizer_json)
    tokenizer.encode_special_tokens = True
    sink = _Sink(staging, np.dtype(spec.dtype), shard_tokens, tag, files, drill)
    for unit in plan_units(files, os.cpu_count() or 1):
        for columns in encode_unit(unit, spec, tokenizer):
            sink.add(columns)
    return sink.close()


def _run_on_ray(
    files, spec: EncodeSpec, staging: Path, shard_tokens: int, tag: str, drill: PrepareDrill
) -> Totals:
    import ray

    sink = _Sink(staging, np.dtype(spec.dtype), shard_tokens, tag, files, drill)
    units = plan_units(files, ray.cluster_resources().get("CPU", 1))
    rows = [{"files": json.dumps([asdict(f) for f in unit])} for unit in units]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
    # Ray types map_batches' function as taking the batch alone; fn_kwargs passes the rest (hence the ignore).
    encoded = dataset.map_batches(
        _encode_task,  # type: ignore[arg-type]
        batch_size=1,
        fn_kwargs={"spec": spec},
    )
    dataset = ordered(encoded, progress=True)
    for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        sink.add(table.to_pydict())
    return sink.close()


_TOKENIZERS: dict[int, object] = {}  # per task process: parse each tokenizer once


def _cached_tokenizer(tokenizer_json: str):
    from tokenizers import Tokenizer

    key = hash(tokenizer_json)
    if key not in _TOKENIZERS:
        tokenizer = Tokenizer.from_str(tokenizer_json)
        tokenizer.encode_special_tokens = True
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = tokenizer
    return _TOKENIZERS[key]


def _encode_task(batch: dict, spec: EncodeSpec) -> Iterator:
    """Ray Data UDF: one unit of files -> pyarrow tables of token rows (a DataError becomes an error row)."""
    import pyarrow as pa

    files = [CorpusFile(**f) for f in json.loads(str(batch["files"][0]))]

    def tables() -> Iterator:
        for columns in encode_unit(files, spec, _cached_tokenizer(spec.tokenizer_json)):
            yield pa.table(_typed(columns))

    yield from errors_as_rows(tables, lambda message: pa.table(_typed(_error_columns(message))))()


def _typed(columns: dict) -> dict:
    import pyarrow as pa

    return {
        "split": pa.array(columns["split"], pa.string()),
        "tokens": pa.array(columns["tokens"], pa.binary()),
        "docs": pa.array(columns["docs"], pa.int64()),
        "text_bytes": pa.array(columns["text_bytes"], pa.int64()),
        "replaced_bytes": pa.array(columns["replaced_bytes"], pa.int64()),
        ERROR_COLUMN: pa.array(columns[ERROR_COLUMN], pa.string()),
    }


def _check_enough(totals: Totals, data) -> None:
    window = data.seq_len + 1
    if totals.docs == 0:
        raise DataError(
            f"data.paths {list(data.paths) or 'default'} holds no text ({totals.files} files, all "
            f"empty); add documents or fix data.paths"
        )
    train_tokens = sum(e["tokens"] for e in totals.entries if e["split"] == "train")
    if train_tokens < window:
        raise DataError(
            f"the corpus gives {train_tokens} training tokens, fewer than one window of data.seq_len + 1 "
            f"= {window}; add documents, lower data.seq_len or lower data.val_fraction"
        )


def _manifest(totals: Totals, data, input_sha: str, tokenizer_sha: str) -> dict:
    return {
        "format": FORMAT,
        "input_sha256": input_sha,
        "tokenizer_sha256": tokenizer_sha,
        "vocab_size": data.vocab_size,
        "dtype": token_dtype(data.vocab_size).str,
        "eot_id": EOT_ID,
        "seq_len": data.seq_len,
        "val_fraction": data.val_fraction,
        "files": totals.files,
        "docs": totals.docs,
        "text_bytes": totals.text_bytes,
        "replaced_bytes": totals.replaced_bytes,
        "tokens": sum(e["tokens"] for e in totals.entries),
        "shards": totals.entries,
    }


def _commit(staging: Path, out_dir: Path, drill: PrepareDrill) -> None:
    """Move the new shards in (new names) and the tokenizer under its sha256 name, then manifest.json (the commit
    point), then tokenizer.json; then remove the shards and tokenizer copies the new manifest no longer names.
    After any rename the folder verifies: the old manifest with its old files, or the new one with its new."""
    manifest = json.loads((staging / MANIFEST_FILE).read_text())
    names = {e["file"] for e in manifest["shards"]}
    tokenizer = tokenizer_object(manifest["tokenizer_sha256"])
    shutil.copyfile(staging / TOKENIZER_FILE, staging / tokenizer)
    renames = [*sorted(names), tokenizer, MANIFEST_FILE, TOKENIZER_FILE]
    drill.at("commit", 0)
    for index, name in enumerate(renames, 1):
        os.replace(staging / name, out_dir / name)
        if name == MANIFEST_FILE:
            fsync_path(out_dir)
        drill.at("commit", index)
    fsync_path(out_dir)
    _remove(_leftovers(out_dir, manifest))


def _leftovers(out_dir: Path, manifest: dict) -> list[Path]:
    """Shards and sha256-named tokenizer copies the manifest does not name, and staging folders of killed runs."""
    names = {e["file"] for e in manifest["shards"]} | {tokenizer_object(manifest["tokenizer_sha256"])}
    return [
        path
        for path in out_dir.iterdir()
        if path.name.startswith(STAGING_PREFIX)
        or ((SHARD_NAME.match(path.name) or TOKENIZER_OBJECT.match(path.name)) and path.name not in names)
    ]


def _remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _tidy(out_dir: Path, manifest: dict) -> None:
    """Remove what a prepare killed after its commit left behind, unless a training reads the folder now."""
    leftovers = _leftovers(out_dir, manifest)
    if not leftovers:
        return
    try:
        with writing(out_dir):
            _remove(_leftovers(out_dir, manifest))
    except DataError as exc:
        get_logger().warning(
            "prepare: kept %d leftover files of an interrupted prepare: %s", len(leftovers), exc
        )


class PrepareDrill:
    """fault.drill for prepare: 'prepare@P' SIGKILLs this process once P percent of the text is tokenized,
    'commit@K' right after the K-th rename of the commit (0: before the first). For tests only."""

    def __init__(self, drill: str):
        self.points = {(phase, at) for phase, at, _ in parse_drills(drill, default_rank=0)}

    def at(self, phase: str, value: int) -> None:
        if any(p == phase and (value == at if phase == "commit" else value >= at) for p, at in self.points):
            get_logger().warning("fault drill: killing prepare (pid %d) at %s@%d", os.getpid(), phase, value)
            os.kill(os.getpid(), signal.SIGKILL)


def _warn_small_val(manifest: dict, data) -> None:
    val_tokens = split_summary(manifest).get("val", {}).get("tokens", 0)
    if data.val_fraction > 0 and val_tokens < data.seq_len + 1:
        get_logger().warning(
            "prepare: the validation split has %d tokens, fewer than one window of %d; evaluation "
            "will fail: raise data.val_fraction or add documents",
            val_tokens,
            data.seq_len + 1,
        )


def _summary(manifest: dict, out_dir: Path | str, skipped: bool, seconds: float) -> dict:
    return {
        "out_dir": str(out_dir),
        "skipped": skipped,
        "files": manifest["files"],
        "docs": manifest["docs"],
        "tokens": manifest["tokens"],
        "text_bytes": manifest["text_bytes"],
        "replaced_bytes": manifest["replaced_bytes"],
        "shards": len(manifest["shards"]),
        "splits": split_summary(manifest),
        "vocab_size": manifest["vocab_size"],
        "tokenizer_sha256": manifest["tokenizer_sha256"],
        "seconds": seconds,
    }
