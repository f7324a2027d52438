"""The global sample order the streams share: sample g -> (source, epoch, window), a pure function of the seed.

No state, no shuffle buffer, no collective: any process computes any sample's place from (seed, g) alone, so
every rank agrees without talking, and a run resumes at any global offset without replaying the epoch.
- A mixture deals each block of MIXTURE_BLOCK consecutive samples to the sources in fixed counts proportional
  to their weights, in a seeded order inside the block; each source's samples are numbered 0, 1, 2, ...
- A source's n-th sample is window permute(n mod W, W, key(seed, source, epoch)) of epoch n // W, where W is its
  window count: every window once per epoch, in a fresh order each epoch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from raylm.errors import DataError

MIXTURE_BLOCK = 1024  # samples per mixture block: the granularity at which weights hold exactly
FEISTEL_ROUNDS = 4
MASK64 = (1 << 64) - 1


def mix64(value: int) -> int:
    """splitmix64's finalizer on a Python int: a well-spread 64-bit key."""
    value = (value + 0x9E3779B97F4A7C15) & MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & MASK64
    return value ^ (value >> 31)


def _mix_array(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping multiplication is intended)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(indices: np.ndarray, size: int, key: int) -> np.ndarray:
    """A seeded bijection of [0, size) applied to indices: a Feistel network with cycle walking."""
    indices = np.asarray(indices, dtype=np.int64)
    if size <= 1:
        return indices.copy()
    half_bits = max(1, ((size - 1).bit_length() + 1) // 2)  # the network permutes [0, 4**half_bits) >= size
    round_keys = [mix64(key * FEISTEL_ROUNDS + r) for r in range(FEISTEL_ROUNDS)]
    out = _feistel(indices.astype(np.uint64), half_bits, round_keys)
    outside = out >= size
    while outside.any():  # walk the cycle until it lands back inside [0, size): still a bijection
        out[outside] = _feistel(out[outside], half_bits, round_keys)
        outside = out >= size
    return out.astype(np.int64)


def _feistel(x: np.ndarray, half_bits: int, round_keys: list[int]) -> np.ndarray:
    bits, mask = np.uint64(half_bits), np.uint64((1 << half_bits) - 1)
    left, right = x >> bits, x & mask
    with np.errstate(over="ignore"):
        for round_key in round_keys:
            left, right = right, left ^ (_mix_array(right ^ np.uint64(round_key)) & mask)
    return (left << bits) | right


class Sample(NamedTuple):
    source: int
    epoch: int
    window: int


class SourceWindows(NamedTuple):
    name: str
    windows: int


class Mixture:
    """Weighted sources: global sample g -> (source, that source's own sample number)."""

    def __init__(self, weights: Sequence[float], seed: int, names: Sequence[str] | None = None):
        self.names = list(names) if names else [str(i) for i in range(len(weights))]
        self.seed = seed
        self.counts = _apportion(list(weights), MIXTURE_BLOCK, self.names)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def locate(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        samples = np.asarray(samples, dtype=np.int64)
        if len(self.counts) == 1:
            return np.zeros_like(samples), samples.copy()
        blocks, slots = np.divmod(samples, MIXTURE_BLOCK)
        source, within = np.empty_like(samples), np.empty_like(samples)
        for block in np.unique(blocks):
            chosen = blocks == block
            source_of_slot, rank_of_slot = self._block(int(block))
            src = source_of_slot[slots[chosen]]
            source[chosen] = src
            within[chosen] = block * self.counts[src] + rank_of_slot[slots[chosen]]
        return source, within

    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """Which source each slot of a block goes to, and its rank among that source's slots."""
        if block not in self._blocks:
            if len(self._blocks) > 64:
                self._blocks.clear()
            position = permute(np.arange(MIXTURE_BLOCK), MIXTURE_BLOCK, mix64(self.seed ^ mix64(block)))
            source_of_slot = np.searchsorted(self.starts, position, side="right") - 1
            rank_of_slot = np.empty(MIXTURE_BLOCK, dtype=np.int64)
            for s in range(len(self.counts)):
                slots = np.flatnonzero(source_of_slot == s)
                rank_of_slot[slots] = np.arange(len(slots))
            self._blocks[block] = (source_of_slot, rank_of_slot)
        return self._blocks[block]


def _apportion(weights: list[float], total: int, names: list[str]) -> np.ndarray:
    """Integer counts summing to total, proportional to weights (largest remainder)."""
    if not weights or any(not w > 0 for w in weights):
        raise DataError(f"data source weights {weights} must all be positive numbers; fix data.sources")
    shares = np.array(weights, dtype=np.float64) / sum(weights) * total
    counts = np.floor(shares).astype(np.int64)
    counts[np.argsort(-(shares - counts), kind="stable")[: total - counts.sum()]] += 1
    for name, count, weight in zip(names, counts, weights, strict=True):
        if count == 0:
            raise DataError(
                f"data source {name} has weight {weight}, less than one sample in {total}; raise its "
                f"weight in data.sources to at least {sum(weights) / total:.3g}"
            )
    return counts


class Order:
    """The sample order of one split over one or more sources (each with its window count)."""

    def __init__(
        self, windows: Sequence[int], weights: Sequence[float], seed: int, names: Sequence[str] | None = None
    ):
        names = list(names) if names else [str(i) for i in range(len(windows))]
        self.sources = [SourceWindows(name, int(count)) for name, count in zip(names, windows, strict=True)]
        self.seed = seed
        self.mixture = Mixture(weights, seed, [s.name for s in self.sources])

    def locate_arrays(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source, epoch, window) arrays for global sample numbers."""
        source, within = self.mixture.locate(samples)
        epoch, window = np.empty_like(within), np.empty_like(within)
        for s in np.unique(source):
            chosen = source == s
            windows = self.sources[s].windows
            ep, position = np.divmod(within[chosen], windows)
            epoch[chosen] = ep
            shuffled = np.empty_like(position)
            for e in np.unique(ep):
                same = ep == e
                shuffled[same] = permute(position[same], windows, epoch_key(self.seed, int(s), int(e)))
            window[chosen] = shuffled
        return source, epoch, window

    def locate(self, samples: np.ndarray) -> list[Sample]:
        return [Sample(*row) for row in zip(*(a.tolist() for a in self.locate_arrays(samples)), strict=True)]


def epoch_key(seed: int, source: int, epoch: int) -> int:
    return mix64(mix64(mix64(seed & MASK64) ^ source) ^ epoch)


def samples_sha(order: Order, start: int, stop: int) -> str:
    """First 16 hex digits of the sha256 of global samples [start, stop) as (source, epoch, window) triples:
    two steps share it exactly when they trained on the same samples in the same order (metrics' samples_sha)."""
    source, epoch, window = order.locate_arrays(np.arange(start, stop, dtype=np.int64))
    triples = np.stack([source, epoch, window], axis=1).astype("<i8")  # (samples, 3)
    return hashlib.sha256(triples.tobytes()).hexdigest()[:16]
