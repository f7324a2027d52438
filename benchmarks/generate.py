"""Generation benchmark, side by side in one run: KV-cache decoding against full-window recompute.

Figures (one JSON object per line):
  kv_speedup        cached tokens/s / full-window tokens/s for `--new-tokens` (256) greedy tokens after a
                    `--prompt-tokens` (16) prompt, tiny.yaml's model (target >= 5)
  decode            one line per path: its median tokens/s and every repeat's
The model is tiny.yaml's (4 layers, d=128, 2k vocabulary, max_seq_len 256) with random weights: speed does not
depend on what the weights say, and greedy decoding of the raw decode loops never stops early (no EOT check).
16 + 256 tokens pass the 256-token window, so the cached path slides once (one re-encode of 192 tokens), as
`raylm generate` does; the full-window path re-runs the newest 256 tokens for each token.
The two paths alternate `--repeats` times (median of each), one torch thread each by default: a batch-1 decode
step is a few dozen small kernels, and two OpenMP threads on a shared 2-core machine spin against the
neighbours' work (measured here: the same SDPA call 5 us on one thread, 0.5 ms on two under load).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
from common import TINY, emit

from raylm.config import load_config
from raylm.config.derived import padded_vocab
from raylm.model.gpt import GPT, init_full_weights
from raylm.model.sampling import Sampler, decode_cached, decode_full_window

GREEDY = Sampler(temperature=0)
DECODERS = {"kv_cache": decode_cached, "full_window": decode_full_window}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens to generate per measurement")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="random prompt length")
    parser.add_argument("--repeats", type=int, default=3, help="alternating measurements of each path")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both paths")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, vocab_size = tiny_model()
    prompt = torch.randint(0, vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    timed_decode(decode_cached, model, prompt, vocab_size, 8)  # warm-up: first-call allocations and dispatch
    rates: dict[str, list[float]] = {name: [] for name in DECODERS}
    tokens: dict[str, list] = {}
    for _ in range(args.repeats):
        for name, decode in DECODERS.items():
            rate, tokens[name] = timed_decode(decode, model, prompt, vocab_size, args.new_tokens)
            rates[name].append(rate)
    for name, values in rates.items():
        emit(
            figure="decode",
            path=name,
            tokens_per_s=round(statistics.median(values), 1),
            repeats=[round(v, 1) for v in values],
        )
    window_new = (
        model.cfg.max_seq_len - args.prompt_tokens
    )  # the paths agree up to the window, then slide apart
    same = tokens["kv_cache"][:window_new] == tokens["full_window"][:window_new]
    speedup = statistics.median(rates["kv_cache"]) / statistics.median(rates["full_window"])
    emit(
        figure="kv_speedup",
        kv_speedup=round(speedup, 2),
        new_tokens=args.new_tokens,
        prompt_tokens=args.prompt_tokens,
        max_seq_len=model.cfg.max_seq_len,
        threads=args.threads,
        same_greedy_tokens_within_window=same,
        target=">= 5",
    )


if __name__ == "__main__":
    main()
