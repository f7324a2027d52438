"""Next-token sampling and decode loops on one device: the pure sampler and the KV-cache loop behind `raylm generate`.

The sampler is a pure function of (logits, settings, generator). The decode loops are generators that yield
one next token (B, 1) at a time and compute the following one only when asked, so the caller stops them at
end-of-text, a stop string or a token budget without paying for a forward it throws away.

`decode_rows` encodes a batch of prompts once (prefill, left-padded when their lengths differ) and then runs
the model on one new token per row and step against the cached keys and values; `decode_cached` is it for a
(B, T) tensor of equal-length prompts. `decode_full_window` re-runs the whole window for every token: the slow reference
that the greedy test and benchmarks/generate.py compare against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from raylm.model.gpt import GPT, KVCache


@dataclass(frozen=True)
class Sampler:
    """How the next token is picked from the logits: greedy when temperature is 0, else sampled."""

    temperature: float = 0.8
    top_k: int = 0  # keep the k most likely tokens (0 = all)
    top_p: float = (
        1.0  # keep the smallest set of most likely tokens whose probability reaches top_p (1 = all)
    )

    def __call__(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return next_token(logits, self, generator)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits (B, V) with every token outside the top-k and outside the top-p nucleus set to -inf.

    Tokens tied with the k-th logit are all kept. The nucleus is taken after top-k, over what top-k left."""
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, -1:]  # (B, 1): the k-th largest logit of each row
        logits = logits.masked_fill(logits < kth, float("-inf"))  # (B, V)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)  # (B, V)
        # drop a token when the tokens before it already reach top_p: the most likely token always stays
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p  # (B, V), in sorted order
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # (B, V), back in vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))  # (B, V)
    return logits


def next_token(
    logits: torch.Tensor, sampler: Sampler, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The next token id of each row (B, 1) from its logits (B, V): argmax at temperature 0, else a draw from
    the temperature-scaled distribution filtered by top-k then top-p."""
    if sampler.temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    scaled = filter_logits(logits.float() / sampler.temperature, sampler.top_k, sampler.top_p)  # (B, V)
    return torch.multinomial(scaled.softmax(dim=-1), 1, generator=generator)  # (B, 1)


def slide_keep(max_seq_len: int) -> int:
    """Tokens kept when a full cache slides: 3/4 of the window, so every token still sees at least that much
    context and the re-encode (one prefill of this many tokens) comes once every max_seq_len / 4 tokens."""
    return max(1, max_seq_len - max_seq_len // 4)


def row_sampler(
    sampler: Sampler, generators: list[torch.Generator]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Next tokens (B, 1) from logits (B, V), row b drawn with generators[b]: each row's draws are the ones it
    would take alone, whatever the other rows are. Greedy picks need no generator and take the batch at once."""
    if sampler.temperature <= 0:
        return sampler
    return lambda logits: torch.cat([sampler(logits[b : b + 1], g) for b, g in enumerate(generators)])


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ids (B, T), padding slots of each row (B,) or None when no row is padded): rows right-aligned at the
    longest. The padding id is 0; what it is does not matter, since no real token attends to it."""
    longest = max(len(row) for row in rows)
    pad = [longest - len(row) for row in rows]
    ids = torch.tensor([[0] * n + row for n, row in zip(pad, rows, strict=True)])  # (B, T)
    return ids, torch.tensor(pad) if any(pad) else None


@torch.inference_mode()
def decode_rows(
    model: GPT, prompts: list[list[int]], vocab_size: int, draw: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[torch.Tensor]:
    """Yield the next token of every prompt (B, 1), forever, with a KV cache: a prefill of the left-padded
    prompts, then one token per row a step; `draw` picks tokens from logits (a Sampler, or row_sampler).

    Each row computes what it would alone (its own RoPE positions, its padding masked), so its tokens are the
    ones a batch of one gives. RoPE positions end at max_seq_len, so the cache holds one window: a prompt longer
    than that keeps its newest max_seq_len tokens (as the full-window path does). When the cache is full, every
    row is encoded again into a fresh cache: a row whose own tokens fill the window keeps its newest
    `slide_keep` (it slides, at the step it would alone), the others keep all of theirs, and decoding goes on.
    Up to the window the text is the full-window path's; past it each token sees 3/4 to all of a window
    instead of exactly one. Logit rows past `vocab_size` (the embedding's padding) are never chosen."""
    window = model.cfg.max_seq_len
    rows = [prompt[-window:] for prompt in prompts]  # each row's own tokens that the cache will hold
    while True:
        idx, pad = left_padded(rows)
        cache = KVCache(model, len(rows), pad)
        logits = model(idx, cache=cache, last_only=True)[:, -1, :vocab_size]  # (B, V): prefill
        while True:
            next_id = draw(logits)  # (B, 1)
            yield next_id
            for row, token in zip(rows, next_id.view(-1).tolist(), strict=True):
                row.append(token)
            if cache.pos == window:
                break
            logits = model(next_id, cache=cache)[:, -1, :vocab_size]  # (B, V): one token against the cache
        rows = [row[-slide_keep(window) :] if len(row) > window else row for row in rows]


def decode_cached(
    model: GPT, idx: torch.Tensor, vocab_size: int, sampler: Sampler, generator: torch.Generator | None = None
) -> Iterator[torch.Tensor]:
    """Yield the next token (B, 1) after idx (B, T), forever, with a KV cache (decode_rows on equal-length
    rows; one generator draws for the whole batch)."""
    return decode_rows(model, idx.tolist(), vocab_size, lambda logits: sampler(logits, generator))


@torch.inference_mode()
def decode_full_window(
    model: GPT, idx: torch.Tensor, vocab_size: int, sampler: Sampler, generator: torch.Generator | None = None
) -> Iterator[torch.Tensor]:
    """Yield the next token (B, 1) after idx (B, T), forever, re-running the newest max_seq_len tokens for each:
    no cache, the reference decode_cached must match for greedy decoding up to the window."""
    window = model.cfg.max_seq_len
    while True:
        logits = model(idx[:, -window:])[:, -1, :vocab_size]  # (B, V)
        next_id = sampler(logits, generator)  # (B, 1)
        yield next_id
        idx = torch.cat([idx, next_id], dim=1)  # (B, T + 1)
