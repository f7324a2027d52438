"""RoPE's cos/sin tables, plain or with a context-extension scaling (llama3, linear, yarn) as transformers has it.

Each scaling changes only the inverse frequencies, plus (yarn) one attention factor that multiplies cos and sin,
so q.k grows by its square: transformers' `modeling_rope_utils.py` (4.57), `_compute_*_parameters`, term by
term, in float64 (transformers computes in float32). The mapping's keys are checked by raylm.config.rope.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from raylm.config.schema import ModelConfig

YARN_BETA_FAST, YARN_BETA_SLOW = 32, 1  # transformers' defaults


def plain_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """RoPE's inverse frequencies theta^(-2k/head_dim), k < head_dim/2, float64."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def _linear(inv_freq: torch.Tensor, scaling: Mapping[str, Any], **_: Any) -> tuple[torch.Tensor, float]:
    """Position interpolation: every frequency divided by factor."""
    return inv_freq / scaling["factor"], 1.0


def _llama3(inv_freq: torch.Tensor, scaling: Mapping[str, Any], **_: Any) -> tuple[torch.Tensor, float]:
    """Llama 3.1: wavelengths longer than original/low_freq_factor are divided by factor, shorter than
    original/high_freq_factor kept, those between blended smoothly."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, blended, scaled), 1.0


def _yarn_attention_factor(scaling: Mapping[str, Any]) -> float:
    """yarn's factor on cos and sin: given, or 0.1 ln(factor) + 1 (DeepSeek's mscale ratio where both are set)."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor, m, m_all = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
    return mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)


def _yarn(
    inv_freq: torch.Tensor, scaling: Mapping[str, Any], head_dim: int, theta: float, max_seq_len: int
) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023): interpolate the low frequencies, keep the high ones, ramp linearly between the
    dimensions that turn beta_slow and beta_fast times over the original context."""
    original = scaling.get("original_max_position_embeddings") or max_seq_len

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = correction_dim(scaling.get("beta_fast") or YARN_BETA_FAST)
    high = correction_dim(scaling.get("beta_slow") or YARN_BETA_SLOW)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
    return inv_freq / scaling["factor"] * (1 - keep) + inv_freq * keep, _yarn_attention_factor(scaling)


SCALINGS: dict[str, Callable[..., tuple[torch.Tensor, float]]] = {
    "linear": _linear,
    "llama3": _llama3,
    "yarn": _yarn,
}  # each: (inv_freq, scaling, head_dim=, theta=, max_seq_len=) -> (scaled inv_freq, attention factor)


def inv_freq_and_factor(
    head_dim: int, theta: float, max_seq_len: int, scaling: Mapping[str, Any] | None = None
) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (head_dim/2,) float64, attention factor on cos and sin) under `scaling`."""
    inv_freq = plain_inv_freq(head_dim, theta)
    if not scaling:
        return inv_freq, 1.0
    scale = SCALINGS[scaling["rope_type"]]
    return scale(inv_freq, scaling, head_dim=head_dim, theta=theta, max_seq_len=max_seq_len)


def rope_tables(
    head_dim: int, max_seq_len: int, theta: float, scaling: Mapping[str, Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (max_seq_len, head_dim // 2), for rotating interleaved pairs; a yarn attention
    factor is folded into both."""
    inv_freq, attention_factor = inv_freq_and_factor(head_dim, theta, max_seq_len, scaling)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (max_seq_len, hd/2)
    return (angles.cos() * attention_factor).float(), (angles.sin() * attention_factor).float()


def model_rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables of a model config: every position up to max_seq_len, under model.rope_scaling."""
    return rope_tables(cfg.d_model // cfg.n_head, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
