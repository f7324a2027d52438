"""Per-DP-rank streams, the last data step before the engine: shards -> packed windows -> (inputs, targets) batches.

A split is its shards back to back, one token sequence; window w is tokens [w*T, w*T + T + 1) for T = seq_len
(documents are packed across window edges, EOT between them). raylm.data.order maps global sample g to a window.
DP rank r of n takes g = start + r + k*n, k = 0, 1, ...; so ranks are disjoint and together cover every g once,
every rank with the same DP index (pipeline stages, tensor ranks) reads the identical sequence without a
collective (hang 3), and a run resumes at any global offset, under any dp size that divides it, without
re-reading the epoch. A sample is always a whole window of data.seq_len: under the sequence-length warm-up
(schedule.seq_len) a step at window L < T reads the same samples and cuts each into T / L windows (split_windows),
so the sample ids, the stream's resume state and the tokens per step do not depend on the window length, and a
run resumed at any step reads what the uninterrupted run read. Shards are memory-mapped and read lazily; each
shard is checked against the manifest (sha256, ids < vocab) the first time this process touches it, and a bad one
stops the stream with its name.

A source may be an s3:// or gs:// prefix: its manifest is fetched when the stream opens and each shard is fetched
into the node's data.cache_dir the first time it is read (raylm.data.cache), then memory-mapped like a local one.

Reading: with prefetch > 0 and Ray initialized (always, inside Ray Train workers) the rank's chunks of
CHUNK_SAMPLES windows are read by a Ray Data pipeline (`map_batches` over chunk ids, in order, `prefetch`
chunks ahead, tasks pinned to this node so they read the same files); otherwise in-process. Both paths run
the same ChunkReader, so they give identical samples.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raylm.config.schema import DataConfig
from raylm.data.cache import fetch_shard, open_cached
from raylm.data.documents import document_ids, document_positions
from raylm.data.order import Order
from raylm.data.ray_datasets import ERROR_COLUMN, ordered, raise_if_error, ray_is_up
from raylm.data.shards import check_shard, check_shard_size, read_data_manifest
from raylm.errors import DataError
from raylm.storage.file_names import TOKENIZER_FILE
from raylm.storage.uri import is_uri

DEFAULT_PREFETCH = 2  # chunks read ahead of the trainer
CHUNK_SAMPLES = 256  # windows per read: one vectorized locate, one Ray Data block
CHUNKS_PER_DATASET = 256  # the Ray path restarts its (finite) dataset after this many chunks
READ_TASK_CPUS = (
    0  # window reads are copies from the page cache; tasks that need no CPU cannot starve (hang 2)
)
OPEN_SHARDS = 64  # memory maps kept open per split (each holds a file descriptor)

_VERIFIED: set[tuple] = set()  # shards this process has checked, by (path, size, mtime, sha256)


@dataclass(frozen=True)
class StreamPlan:
    """Everything that fixes one rank's sample sequence (picklable: Ray Data tasks rebuild the reader from it)."""

    sources: tuple[tuple[str, float], ...]
    split: str
    seq_len: int
    seed: int
    dp_rank: int
    dp_size: int
    start_sample: int
    chunk_samples: int
    cache_dir: str = ""  # data.cache_dir: where shards of s3:// or gs:// sources are fetched on this node
    first_read_stall_s: float = (
        0.0  # a fault drill (read@STEP): the task reading chunk 0 waits this long first
    )

    def global_samples(self, local: np.ndarray) -> np.ndarray:
        return self.start_sample + self.dp_rank + local * self.dp_size


def normalize_sources(paths_or_sources: Any) -> tuple[tuple[str, float], ...]:
    """A folder, a list of folders, or [{path, weight}, ...] -> ((folder, weight), ...)."""
    items = [paths_or_sources] if isinstance(paths_or_sources, (str, Path)) else list(paths_or_sources)
    if not items:
        raise DataError("no data sources given; set data.out_dir or data.sources")
    out = []
    for item in items:
        path, weight = (item["path"], item.get("weight", 1.0)) if isinstance(item, dict) else (item, 1.0)
        out.append((str(path) if is_uri(path) else str(Path(path).expanduser()), float(weight)))
    return tuple(out)


class SplitReader:
    """One prepared folder's split as one token sequence, read through lazily opened, verified memory maps."""

    def __init__(self, folder: str | Path, manifest: dict, split: str, seq_len: int, source: str = ""):
        self.folder, self.split, self.seq_len = Path(folder), split, seq_len
        self.source = source  # an s3:// or gs:// prefix whose shards are fetched into folder on first use
        self.vocab_size = manifest["vocab_size"]
        self.entries = [e for e in manifest["shards"] if e["split"] == split]
        for entry in self.entries if not source else ():
            check_shard_size(self.folder, entry)  # a stat each: missing or truncated shards fail at open
        self.starts = np.concatenate([[0], np.cumsum([e["tokens"] for e in self.entries])]).astype(np.int64)
        tokens = int(self.starts[-1])
        self.windows = max(0, (tokens - 1) // seq_len)
        if self.windows == 0:
            more = ", raise data.val_fraction" if split == "val" else ""
            raise DataError(
                f"the {split} split of {folder} has {tokens} tokens, fewer than one window of "
                f"data.seq_len + 1 = {seq_len + 1}; lower data.seq_len{more} or add documents, then "
                f"run `raylm prepare`"
            )
        self._open: OrderedDict[int, np.memmap] = OrderedDict()

    def read(self, windows: np.ndarray, out: np.ndarray) -> None:
        """Fill out[i] (seq_len + 1 tokens, int64) with window windows[i]."""
        starts = windows * self.seq_len
        shard_of = np.searchsorted(self.starts, starts, side="right") - 1
        for row, (start, shard) in enumerate(zip(starts.tolist(), shard_of.tolist(), strict=True)):
            filled, end = 0, start + self.seq_len + 1
            while start < end:  # a window may run across a shard edge
                tokens = self._tokens(shard)
                offset = start - int(self.starts[shard])
                piece = tokens[offset : offset + end - start]
                out[row, filled : filled + len(piece)] = piece
                filled, start, shard = filled + len(piece), start + len(piece), shard + 1

    def _tokens(self, shard: int) -> np.memmap:
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        entry = self.entries[shard]
        if self.source:
            fetch_shard(self.source, self.folder, entry, self.vocab_size)
        path = check_shard_size(self.folder, entry)
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns, entry["sha256"])
        if key not in _VERIFIED:
            check_shard(self.folder, entry, self.vocab_size)
            _VERIFIED.add(key)
        if len(self._open) >= OPEN_SHARDS:
            self._open.popitem(last=False)
        self._open[shard] = np.memmap(path, dtype=entry["dtype"], mode="r")
        return self._open[shard]

    def close(self) -> None:
        self._open.clear()


def open_readers(
    sources: Sequence[tuple[str, float]], split: str, seq_len: int, cache_dir: str = "", refresh: bool = True
) -> list[SplitReader]:
    """A reader per source; every source must come from the same tokenizer. A URI source reads from its cache
    folder (its manifest fetched again when refresh, else the one this node already holds)."""
    readers, first = [], None
    local: str | Path
    for folder, _ in sources:
        if is_uri(folder):
            (local, manifest), remote = open_cached(folder, cache_dir, refresh), folder
        else:
            local, manifest, remote = folder, read_data_manifest(folder), ""
        if first is None:
            first = (folder, manifest["tokenizer_sha256"], Path(local) / TOKENIZER_FILE)  # a local copy
        elif manifest["tokenizer_sha256"] != first[1]:
            raise DataError(
                f"data source {folder} was prepared with another tokenizer (sha256 "
                f"{manifest['tokenizer_sha256'][:16]}...) than {first[0]} ({first[1][:16]}...); prepare "
                f"every source with data.tokenizer={first[2]}"
            )
        readers.append(SplitReader(local, manifest, split, seq_len, source=remote))
    return readers


def order_of(readers: Sequence[SplitReader], sources: Sequence[tuple[str, float]], seed: int) -> Order:
    """The global sample order over the sources' windows, as every rank of a run computes it."""
    return Order(
        [r.windows for r in readers], [w for _, w in sources], seed, [folder for folder, _ in sources]
    )


class ChunkReader:
    """Chunk c of a rank's sequence: its local samples [c*C, (c+1)*C) as a (C, seq_len + 1) int64 array."""

    def __init__(self, plan: StreamPlan, refresh: bool = True):
        self.plan = plan
        self.readers = open_readers(plan.sources, plan.split, plan.seq_len, plan.cache_dir, refresh)
        self.order = order_of(self.readers, plan.sources, plan.seed)

    def chunk(self, index: int) -> np.ndarray:
        local = np.arange(index * self.plan.chunk_samples, (index + 1) * self.plan.chunk_samples)
        return self.windows(self.plan.global_samples(local))

    def windows(self, samples: np.ndarray) -> np.ndarray:
        source, _, window = self.order.locate_arrays(samples)
        out = np.empty((len(samples), self.plan.seq_len + 1), dtype=np.int64)
        for s in np.unique(source):
            rows = np.flatnonzero(source == s)
            block = np.empty((len(rows), self.plan.seq_len + 1), dtype=np.int64)
            self.readers[s].read(window[rows], block)
            out[rows] = block
        return out

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


def _check_args(seq_len: int, dp_rank: int, dp_size: int, micro_batch: int, start_sample: int) -> None:
    if seq_len < 1 or micro_batch < 1 or dp_size < 1:
        raise DataError(
            f"seq_len={seq_len}, micro_batch={micro_batch} and dp_size={dp_size} must all be >= 1"
        )
    if not 0 <= dp_rank < dp_size:
        raise DataError(f"dp_rank={dp_rank} is outside [0, dp_size={dp_size})")
    if start_sample < 0 or start_sample % dp_size:
        raise DataError(
            f"start_sample={start_sample} is not a multiple of dp_size={dp_size}: steps consume whole "
            f"global batches, so every DP rank resumes at the same multiple of dp_size; resume from "
            f"the sample count a checkpoint recorded"
        )


def split_windows(windows: np.ndarray, length: int) -> np.ndarray:
    """(B, T + 1) sample windows -> (B * T / length, length + 1), each sample's pieces in order: piece j of a
    sample is its tokens [j * length, (j + 1) * length + 1). Neighbouring pieces share one token (the last target
    of one is the first input of the next), so every target of the sample is trained exactly once."""
    B, T = windows.shape[0], windows.shape[1] - 1
    assert length > 0 and T % length == 0, f"a window of {length} tokens does not divide a sample of {T}"
    pieces = T // length
    index = np.arange(pieces)[:, None] * length + np.arange(length + 1)  # (pieces, length + 1)
    return windows[:, index].reshape(B * pieces, length + 1)


class RankStream:
    """Infinite iterator of (inputs, targets) int64 tensors of shape (micro_batch, seq_len) for one DP rank;
    after set_window(L), (micro_batch * seq_len / L, L): the same samples, each cut into windows of L.

    With `documents` (data.document_mask: 'continue' or 'restart', data.document_positions) inputs is the
    tuple (tokens, document ids, positions), each (micro_batch, seq_len): raylm.data.documents."""

    def __init__(
        self,
        paths_or_sources: Any,
        split: str,
        seq_len: int,
        seed: int,
        dp_rank: int,
        dp_size: int,
        micro_batch: int,
        start_sample: int = 0,
        prefetch: int = DEFAULT_PREFETCH,
        cache_dir: str = "",
        first_read_stall_s: float = 0.0,
        documents: str = "",
    ):
        _check_args(seq_len, dp_rank, dp_size, micro_batch, start_sample)
        self.micro_batch, self.dp_size, self.prefetch = micro_batch, dp_size, prefetch
        self.documents = documents
        self.plan = StreamPlan(
            normalize_sources(paths_or_sources),
            split,
            seq_len,
            seed,
            dp_rank,
            dp_size,
            start_sample,
            micro_batch * max(1, CHUNK_SAMPLES // micro_batch),
            cache_dir,
            first_read_stall_s,
        )
        self.reader = ChunkReader(self.plan)  # opens and checks the manifests here, in the caller's process
        self.order = self.reader.order
        self.global_offset = start_sample
        self.on_ray = prefetch > 0 and ray_is_up()
        self._chunks = _ray_chunks(self.plan, prefetch) if self.on_ray else self._local_chunks()
        self._chunk: np.ndarray | None = None
        self._row = 0
        self.window = seq_len  # tokens per row of the batches it yields (schedule.seq_len)

    def set_window(self, length: int) -> None:
        """Yield rows of `length` tokens from the next micro-batch on (a divisor of seq_len; no effect on which
        samples come next)."""
        if length < 1 or self.plan.seq_len % length:
            raise DataError(f"a window of {length} tokens does not divide data.seq_len={self.plan.seq_len}")
        self.window = length

    def __iter__(self) -> RankStream:
        return self

    def __next__(self):
        import torch

        if self._chunk is None or self._row >= len(self._chunk):
            self._chunk, self._row = next(self._chunks), 0
        windows = self._chunk[self._row : self._row + self.micro_batch]  # (B, T + 1)
        self._row += self.micro_batch
        self.global_offset += self.micro_batch * self.dp_size
        if self.window != self.plan.seq_len:
            windows = split_windows(windows, self.window)  # (B * T / L, L + 1)
        # np.array copies: the chunk may be a read-only Ray buffer, and the trainer may write into its batch.
        tokens, targets = np.array(windows[:, :-1]), np.array(windows[:, 1:])  # (B, T)
        if not self.documents:
            return torch.from_numpy(tokens), torch.from_numpy(targets)
        positions = document_positions(tokens, self.documents)
        inputs = (
            torch.from_numpy(tokens),
            torch.from_numpy(document_ids(tokens)),
            torch.from_numpy(positions),
        )
        return inputs, torch.from_numpy(targets)

    def _local_chunks(self) -> Generator[np.ndarray, None, None]:
        index = 0
        while True:
            yield self.reader.chunk(index)
            index += 1

    def state_dict(self) -> dict:
        """Where the stream is: the global sample offset every DP rank has reached, and what fixes the order."""
        return {
            "global_offset": self.global_offset,
            "split": self.plan.split,
            "seed": self.plan.seed,
            "seq_len": self.plan.seq_len,
            "dp_size": self.dp_size,
        }

    def close(self) -> None:
        """Stop reading ahead (and the Ray Data pipeline) and drop the memory maps."""
        self._chunks.close()
        self.reader.close()


_CHUNK_READERS: dict[StreamPlan, ChunkReader] = {}  # per task process: one reader per plan


def _read_task(batch: dict, plan: StreamPlan) -> dict:
    """Ray Data UDF: chunk ids -> that chunk's windows as bytes (a DataError becomes an error row)."""
    try:
        if plan.first_read_stall_s and 0 in batch["chunk"]:
            time.sleep(plan.first_read_stall_s)  # long enough to be found running and killed from outside
        if plan not in _CHUNK_READERS:
            _CHUNK_READERS.clear()
            _CHUNK_READERS[plan] = ChunkReader(plan, refresh=False)  # the rank fetched the manifests just now
        data = [_CHUNK_READERS[plan].chunk(int(c)).tobytes() for c in batch["chunk"]]
        return {
            "windows": np.array(data, dtype=object),
            ERROR_COLUMN: np.array([""] * len(data), dtype=object),
        }
    except DataError as exc:
        return {"windows": np.array([b""], dtype=object), ERROR_COLUMN: np.array([str(exc)], dtype=object)}


def _ray_chunks(plan: StreamPlan, prefetch: int) -> Generator[np.ndarray, None, None]:
    """The rank's chunks through Ray Data, CHUNKS_PER_DATASET per (finite) dataset, in order."""
    import ray

    here = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}  # read the files this rank would read
    first = 0
    while True:
        items = [{"chunk": c} for c in range(first, first + CHUNKS_PER_DATASET)]
        dataset = ray.data.from_items(items, override_num_blocks=CHUNKS_PER_DATASET)
        readers = ray.data.TaskPoolStrategy(size=max(1, prefetch))
        # Ray types map_batches' function as taking the batch alone; fn_kwargs passes the rest (ignored).
        read = dataset.map_batches(
            _read_task,  # type: ignore[arg-type]
            batch_size=1,
            fn_kwargs={"plan": plan},
            num_cpus=READ_TASK_CPUS,
            compute=readers,
            label_selector=here,
        )
        dataset = ordered(read)
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=prefetch):
            raise_if_error(batch[ERROR_COLUMN])
            for data in batch["windows"]:
                yield np.frombuffer(data, dtype=np.int64).reshape(-1, plan.seq_len + 1)
        first += CHUNKS_PER_DATASET


def build_rank_stream(
    cfg, split: str, dp_rank: int, dp_size: int, start_sample: int = 0, first_read_stall_s: float = 0.0
) -> RankStream:
    """The stream a training rank reads: data.sources (or data.out_dir), data.seq_len, run.seed, micro_batch,
    with document boundaries under data.document_mask."""
    sources = list(cfg.data.sources) or cfg.data.out_dir
    return RankStream(
        sources,
        split,
        cfg.data.seq_len,
        cfg.run.seed,
        dp_rank,
        dp_size,
        cfg.parallel.micro_batch,
        start_sample=start_sample,
        cache_dir=cfg.data.cache_dir,
        first_read_stall_s=first_read_stall_s,
        documents=stream_documents(cfg.data),
    )


def stream_documents(data: DataConfig) -> str:
    """RankStream's `documents` for a data config section: data.document_positions under data.document_mask."""
    return data.document_positions if data.document_mask else ""


def run_order(cfg, split: str = "train") -> Order:
    """The global sample order of a run's split (what its ranks' streams follow), for exact data accounting."""
    sources = normalize_sources(list(cfg.data.sources) or cfg.data.out_dir)
    readers = open_readers(sources, split, cfg.data.seq_len, cfg.data.cache_dir)
    try:
        return order_of(readers, sources, cfg.run.seed)
    finally:
        for reader in readers:
            reader.close()


def peek(
    out_dir: Any,
    dp_rank: int = 0,
    dp_size: int = 1,
    start: int = 0,
    count: int = 4,
    seed: int = 0,
    seq_len: int | None = None,
    split: str = "train",
    cache_dir: str = "",
) -> Iterator[dict]:
    """The samples DP rank `dp_rank` of `dp_size` trains on, from its `start`-th on: JSON-able dicts with text."""
    from raylm.data.tokenizer import load_tokenizer

    sources = normalize_sources(out_dir)
    seq_len = seq_len or read_data_manifest(sources[0][0]).get("seq_len") or 128
    _check_args(seq_len, dp_rank, dp_size, 1, 0)
    plan = StreamPlan(sources, split, seq_len, seed, dp_rank, dp_size, 0, 1, cache_dir)
    reader = ChunkReader(plan)
    first = sources[0][0]
    tokenizer = load_tokenizer(open_cached(first, cache_dir, refresh=False)[0] if is_uri(first) else first)
    samples = plan.global_samples(np.arange(start, start + count))
    located = reader.order.locate(samples)
    try:
        for g, where, window in zip(samples.tolist(), located, reader.windows(samples), strict=True):
            inputs = window[:-1].tolist()
            text = tokenizer.decode(inputs, skip_special_tokens=False)  # EOT shows where documents meet
            yield {
                "sample_id": g,
                "source": plan.sources[where.source][0],
                "epoch": where.epoch,
                "window": where.window,
                "tokens": inputs,
                "text": text,
            }
    finally:
        reader.close()
