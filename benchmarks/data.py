"""Data benchmarks: prepare's tokenize rate vs raw encode_batch, stream headroom vs the tiny trainer, prepare memory.

Run `python benchmarks/data.py` (no arguments: the default stdlib corpus, about 3 minutes on 2 cores). Prints one
JSON object per line: tokenize_ratio (target >= 0.8), stream_headroom (>= 10), prepare_mem_ratio (<= 1.5).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from common import emit  # noqa: E402  (first: stdout holds JSON lines only)

from raylm.config import load_config, resolve  # noqa: E402

TINY = REPO_ROOT / "jobs" / "configs" / "tiny.yaml"
ASSUMED_CONSUMER_TOKENS_PER_S = 20_000.0  # the tiny run's trainer, when the model cannot be measured here
STREAM_MICRO_BATCHES = 3000
MEM_SAMPLE_S = 0.2


def tiny_config(out_dir: Path, *overrides: str):
    """The tiny run config (defaults when jobs/configs/tiny.yaml is absent) with its data in out_dir."""
    overrides = (f"data.out_dir={out_dir}", *overrides)
    return load_config(TINY, overrides) if TINY.is_file() else resolve({}, overrides)


def raw_encode_s(files, tokenizer) -> tuple[float, int]:
    """Seconds for reading the files and one Tokenizer.encode_batch over their texts, and the bytes."""
    start = time.monotonic()
    texts = [Path(f.path).read_bytes().decode("utf-8", errors="replace") for f in files]
    tokenizer.encode_batch(texts)
    return time.monotonic() - start, sum(len(t.encode("utf-8")) for t in texts)


def bench_tokenize(scratch: Path) -> Path:
    """(a) prepare's Ray Data read+tokenize+write phase against raw encode_batch, same files, same cores."""
    import ray

    from raylm.data.corpus import list_files
    from raylm.data.prepare import prepare
    from raylm.data.tokenizer import load_tokenizer

    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    out_dir = scratch / "tiny"
    cfg = tiny_config(out_dir)
    summary = prepare(cfg)  # trains the tokenizer; Ray is already up, so pipeline_s is the data work alone
    raw_s, raw_bytes = raw_encode_s(list_files(cfg.data.paths), load_tokenizer(out_dir))
    ray.shutdown()
    prepare_mb_s, raw_mb_s = summary["text_bytes"] / 1e6 / summary["pipeline_s"], raw_bytes / 1e6 / raw_s
    emit(
        figure="tokenize_ratio",
        tokenize_ratio=round(prepare_mb_s / raw_mb_s, 3),
        prepare_mb_s=round(prepare_mb_s, 2),
        raw_encode_batch_mb_s=round(raw_mb_s, 2),
        corpus_mb=round(raw_bytes / 1e6, 1),
        cores=os.cpu_count(),
        prepare_total_s=round(summary["seconds"], 1),
        target=">= 0.8",
    )
    return out_dir


def consumer_tokens_per_s(cfg) -> tuple[float, str]:
    """The tiny model's plain torch forward+backward+AdamW rate at micro_batch x seq_len, or the assumption."""
    try:
        import torch

        from raylm.config.derived import padded_vocab
        from raylm.model.gpt import GPT
    except ImportError:
        return ASSUMED_CONSUMER_TOKENS_PER_S, "assumed"
    tiny = load_config(TINY) if TINY.is_file() else cfg
    model = GPT(tiny.model, padded_vocab(tiny.data.vocab_size))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, tiny.data.vocab_size, (tiny.parallel.micro_batch, tiny.data.seq_len + 1))
    for step in range(25):
        if step == 5:
            start = time.monotonic()
        loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        optim.step()
        optim.zero_grad()
    return 20 * batch[:, 1:].numel() / (time.monotonic() - start), "measured"


def bench_stream(out_dir: Path) -> None:
    """(b) tokens/s one DP rank's stream delivers against what the tiny trainer consumes."""
    from raylm.data.stream import build_rank_stream

    cfg = tiny_config(out_dir)
    consumer, how = consumer_tokens_per_s(cfg)
    stream = build_rank_stream(cfg, "train", dp_rank=0, dp_size=1)
    next(stream)  # first touch: opens and hashes shards lazily
    start, tokens = time.monotonic(), 0
    for inputs, _ in itertools.islice(stream, STREAM_MICRO_BATCHES):
        tokens += inputs.numel()
    stream_tps = tokens / (time.monotonic() - start)
    stream.close()
    emit(
        figure="stream_headroom",
        stream_headroom=round(stream_tps / consumer, 1),
        stream_tokens_per_s=round(stream_tps),
        consumer_tokens_per_s=round(consumer),
        consumer=how,
        headroom_vs_20k=round(stream_tps / ASSUMED_CONSUMER_TOKENS_PER_S, 1),
        target=">= 10",
    )


PREPARE_CHILD = """
import json, sys
from raylm.config import resolve
from raylm.data.prepare import prepare
print(json.dumps(prepare(resolve({}, sys.argv[1:]))))
"""


def peak_tree_rss_mb(command: list[str]) -> tuple[float, dict]:
    """Run a command; sample the summed RSS of it and every descendant (Ray's raylet and workers) until it ends."""
    import psutil

    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO_ROOT
    )
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            procs = [root] + root.children(recursive=True)
            total = 0
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            peak = max(peak, total)
        except psutil.Error:
            pass
        time.sleep(MEM_SAMPLE_S)
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"prepare exited with {proc.returncode}: {out[-500:]}")
    return peak / 1e6, json.loads(out.strip().splitlines()[-1])


def bench_memory(scratch: Path) -> None:
    """(c) peak memory of prepare on the default corpus and on it repeated 4 times (4 links to the same folder)."""
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    copies = []
    for i in range(4):
        link = scratch / f"copy{i}"
        link.symlink_to(stdlib, target_is_directory=True)
        copies.append(str(link / "**" / "*.py"))
    base = [sys.executable, "-c", PREPARE_CHILD, "data.vocab_size=2048"]
    one_mb, one = peak_tree_rss_mb(base + [f"data.out_dir={scratch / 'mem1'}"])
    four_mb, four = peak_tree_rss_mb(
        base + [f"data.out_dir={scratch / 'mem4'}", f"data.paths={json.dumps(copies)}"]
    )
    emit(
        figure="prepare_mem_ratio",
        prepare_mem_ratio=round(four_mb / one_mb, 3),
        peak_rss_mb_1x=round(one_mb),
        peak_rss_mb_4x=round(four_mb),
        tokens_1x=one["tokens"],
        tokens_4x=four["tokens"],
        seconds_1x=round(one["seconds"], 1),
        seconds_4x=round(four["seconds"], 1),
        measured="summed RSS of the prepare process and its Ray processes",
        target="<= 1.5",
    )


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="raylm-bench-data-") as tmp:
        scratch = Path(tmp)
        out_dir = bench_tokenize(scratch)
        bench_stream(out_dir)
        bench_memory(scratch)


if __name__ == "__main__":
    main()
