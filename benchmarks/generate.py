"""Generation benchmark, side by side in one run: KV-cache decoding against full-window recompute and against
transformers, and batched prompt files against one prompt at a time.

Figures (one JSON object per line):
  kv_speedup          cached tokens/s / full-window tokens/s for `--new-tokens` (256) greedy tokens after a
                      `--prompt-tokens` (16) prompt, tiny.yaml's model (target >= 5)
  raylm_vs_hf_decode  `raylm generate`'s greedy decode tokens/s (raylm.train.generate.complete, the model loaded
                      from an export folder) / transformers' `generate(do_sample=False)` tokens/s on the same
                      folder, batch 1, up to the window (target >= 1.0); the texts must be equal
  batch_speedup       tokens/s of 16 prompts of different lengths decoded as one left-padded batch
                      (complete_batch, what `raylm generate --prompt-file` runs) / the same prompts one at a
                      time (target >= 4); each prompt's text must be equal both ways
  decode              one line per path: its median tokens/s and every repeat's
The model is tiny.yaml's (4 layers, d=128, 2k vocabulary, max_seq_len 256) with random weights: speed does not
depend on what the weights say. The raw decode loops never stop early (no EOT check); the generate paths stop
at EOT as `raylm generate` does (transformers at its EOS, the same id), so both count the same tokens.
16 + 256 tokens pass the 256-token window, so the cached path slides once (one re-encode of 192 tokens), as
`raylm generate` does; the full-window path re-runs the newest 256 tokens for each token.
Each pair alternates `--repeats` times (median of each, the spread of the per-repeat ratios printed), one torch
thread by default: a batch-1 decode step is a few dozen small kernels, and two OpenMP threads on a shared
2-core machine spin against the neighbours' work (measured here: the same SDPA call 5 us on one thread, 0.5 ms
on two under load).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import REPO_ROOT, TINY, emit, scratch_dir

from raylm.checkpoint.export import export
from raylm.checkpoint.writer import save_full_weights
from raylm.config import load_config
from raylm.config.derived import padded_vocab
from raylm.data.tokenizer import train_tokenizer
from raylm.model.gpt import GPT, init_full_weights
from raylm.model.sampling import Sampler, decode_cached, decode_full_window
from raylm.train.generate import GenerateOptions, complete, complete_batch, load_model, sampled_vocab

GREEDY = Sampler(temperature=0)
DECODERS = {"kv_cache": decode_cached, "full_window": decode_full_window}
BATCH_PROMPTS = 16


def tiny_model() -> tuple[GPT, int]:
    """tiny.yaml's model with random weights, and the tokenizer's vocab size (the logits the sampler sees)."""
    cfg = load_config(TINY)
    vocab = padded_vocab(cfg.data.vocab_size)
    model = GPT(cfg.model, vocab)
    model.load_state_dict(init_full_weights(cfg.model, vocab, seed=cfg.run.seed))
    return model.eval(), cfg.data.vocab_size


def timed_decode(
    decode, model: GPT, prompt: torch.Tensor, vocab_size: int, new_tokens: int
) -> tuple[float, list]:
    """(tokens/s, token ids) for `new_tokens` greedy tokens, the prefill included in the time."""
    start = time.perf_counter()
    tokens = [int(t) for t in itertools.islice(decode(model, prompt, vocab_size, GREEDY), new_tokens)]
    return new_tokens / (time.perf_counter() - start), tokens


def alternate(paths: dict[str, Callable[[], tuple[int, object]]], repeats: int) -> tuple[dict, dict, dict]:
    """Run the paths in turn `repeats` times: ({name: [tokens/s per repeat]} by wall time, the same by this
    process's CPU time, {name: last result}). CPU time leaves out the time the neighbours' work holds the
    core, so its ratio moves less with the machine's load than the wall-time one."""
    rates: dict[str, list[float]] = {name: [] for name in paths}
    cpu_rates: dict[str, list[float]] = {name: [] for name in paths}
    results: dict[str, object] = {}
    for _ in range(repeats):
        for name, path in paths.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            tokens, results[name] = path()
            cpu_rates[name].append(tokens / (time.process_time() - start_cpu))
            rates[name].append(tokens / (time.perf_counter() - start))
    for name, values in rates.items():
        emit(
            figure="decode",
            path=name,
            tokens_per_s=round(statistics.median(values), 1),
            repeats=[round(v, 1) for v in values],
            cpu_tokens_per_s=round(statistics.median(cpu_rates[name]), 1),
        )
    return rates, cpu_rates, results


def ratio(rates: dict[str, list[float]], fast: str, slow: str) -> dict:
    """The median ratio of two paths' tokens/s and the range of the per-repeat ratios (each pair ran back to back)."""
    pairs = [a / b for a, b in zip(rates[fast], rates[slow], strict=True)]
    median = statistics.median(rates[fast]) / statistics.median(rates[slow])
    return {
        "median": round(median, 3),
        "per_repeat": [round(r, 3) for r in pairs],
        "spread": round(max(pairs) - min(pairs), 3),
    }


def kv_speedup(args: argparse.Namespace) -> None:
    model, vocab_size = tiny_model()
    prompt = torch.randint(0, vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    timed_decode(decode_cached, model, prompt, vocab_size, 8)  # warm-up: first-call allocations and dispatch
    paths = {
        name: (
            lambda decode=decode: (
                args.new_tokens,
                timed_decode(decode, model, prompt, vocab_size, args.new_tokens)[1],
            )
        )
        for name, decode in DECODERS.items()
    }
    rates, _, tokens = alternate(paths, args.repeats)
    window_new = (
        model.cfg.max_seq_len - args.prompt_tokens
    )  # the paths agree up to the window, then slide apart
    same = tokens["kv_cache"][:window_new] == tokens["full_window"][:window_new]  # type: ignore[index]
    emit(
        figure="kv_speedup",
        kv_speedup=ratio(rates, "kv_cache", "full_window")["median"],
        new_tokens=args.new_tokens,
        prompt_tokens=args.prompt_tokens,
        max_seq_len=model.cfg.max_seq_len,
        threads=args.threads,
        same_greedy_tokens_within_window=same,
        target=">= 5",
    )


def python_sources() -> list[str]:
    """Text to train the export's tokenizer on: this repository's Python modules (no corpus to prepare)."""
    return [path.read_text() for path in sorted((REPO_ROOT / "raylm").rglob("*.py"))]


def tiny_export(root: Path) -> Path:
    """An export folder of tiny.yaml's model with random weights and a BPE tokenizer of its vocabulary size."""
    texts = python_sources()
    tokenizer = train_tokenizer(texts, load_config(TINY).data.vocab_size)
    (root / "data").mkdir(parents=True)
    tokenizer.save(str(root / "data" / "tokenizer.json"))
    cfg = load_config(
        TINY, [f"data.out_dir={root / 'data'}", f"data.vocab_size={tokenizer.get_vocab_size()}"]
    )
    vocab = padded_vocab(cfg.data.vocab_size)
    save_full_weights(
        cfg, init_full_weights(cfg.model, vocab, seed=cfg.run.seed), root / "run" / "checkpoints", 1
    )
    export(root / "run", root / "export")
    return root / "export"


def prompt_lines(tokenizer, count: int, longest: int) -> list[str]:
    """`count` source lines of different lengths (at most `longest` tokens), for prompts."""
    lines = {line.strip() for text in python_sources() for line in text.splitlines()}
    fitting = sorted(line for line in lines if 0 < len(tokenizer.encode(line).ids) <= longest)
    step = max(1, len(fitting) // count)
    return fitting[::step][:count]


def raylm_vs_hf(folder: Path, args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer, cfg = load_model(folder)
    vocab_size = sampled_vocab(tokenizer, cfg)
    hf, hf_tokenizer = (
        AutoModelForCausalLM.from_pretrained(folder).eval(),
        AutoTokenizer.from_pretrained(folder),
    )
    prompt = "def main(args):\n    parser = argparse.ArgumentParser("
    new_tokens = cfg.model.max_seq_len - len(tokenizer.encode(prompt).ids)  # up to the window: no slide

    def raylm_path(n: int = new_tokens) -> tuple[int, str]:
        out = complete(model, tokenizer, vocab_size, prompt, GenerateOptions(temperature=0, max_new_tokens=n))
        return out.new_tokens, out.completion

    def hf_path(n: int = new_tokens) -> tuple[int, str]:
        inputs = hf_tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = hf.generate(**inputs, do_sample=False, temperature=None, top_k=None, max_new_tokens=n)
        new = out[0, inputs["input_ids"].size(1) :].tolist()
        new = (
            new[: new.index(hf.generation_config.eos_token_id)]
            if hf.generation_config.eos_token_id in new
            else new
        )
        return len(new), hf_tokenizer.decode(new)

    raylm_path(8), hf_path(8)  # warm-up
    rates, cpu_rates, texts = alternate({"raylm_generate": raylm_path, "hf_generate": hf_path}, args.repeats)
    figure = ratio(rates, "raylm_generate", "hf_generate")
    emit(
        figure="raylm_vs_hf_decode",
        raylm_vs_hf_decode=figure.pop("median"),
        **figure,
        cpu_time_ratio=ratio(cpu_rates, "raylm_generate", "hf_generate")["median"],
        new_tokens=raylm_path(new_tokens)[0],
        same_text=texts["raylm_generate"] == texts["hf_generate"],
        threads=args.threads,
        target=">= 1.0",
    )


def batch_speedup(folder: Path, args: argparse.Namespace) -> None:
    model, tokenizer, cfg = load_model(folder)
    vocab_size = sampled_vocab(tokenizer, cfg)
    prompts = prompt_lines(tokenizer, BATCH_PROMPTS, longest=48)
    options = GenerateOptions(temperature=0, max_new_tokens=args.batch_new_tokens)

    def batched() -> tuple[int, list]:
        out = complete_batch(model, tokenizer, vocab_size, prompts, options)
        return sum(c.new_tokens for c in out), out

    def one_at_a_time() -> tuple[int, list]:
        out = [complete(model, tokenizer, vocab_size, p, options) for p in prompts]
        return sum(c.new_tokens for c in out), out

    rates, cpu_rates, outs = alternate({"batched": batched, "one_at_a_time": one_at_a_time}, args.repeats)
    figure = ratio(rates, "batched", "one_at_a_time")
    lengths = [len(tokenizer.encode(p).ids) for p in prompts]
    emit(
        figure="batch_speedup",
        batch_speedup=figure.pop("median"),
        **figure,
        cpu_time_ratio=ratio(cpu_rates, "batched", "one_at_a_time")["median"],
        prompts=len(prompts),
        prompt_tokens=[min(lengths), max(lengths)],
        new_tokens=sum(c.new_tokens for c in outs["batched"]),  # type: ignore[attr-defined]
        same_text=outs["batched"] == outs["one_at_a_time"],
        threads=args.threads,
        target=">= 4",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens per kv_speedup measurement")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="random prompt length for kv_speedup")
    parser.add_argument(
        "--batch-new-tokens", type=int, default=64, help="most new tokens per prompt in batch_speedup"
    )
    parser.add_argument("--repeats", type=int, default=9, help="alternating measurements of each path")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every path")
    parser.add_argument(
        "--only", choices=["kv", "hf", "batch"], action="append", help="run only these figures"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    only = set(args.only or ["kv", "hf", "batch"])
    if "kv" in only:
        kv_speedup(args)
    if only & {"hf", "batch"}:
        folder = tiny_export(scratch_dir("raylm-bench-generate-"))
        if "hf" in only:
            raylm_vs_hf(folder, args)
        if "batch" in only:
            batch_speedup(folder, args)


if __name__ == "__main__":
    main()
