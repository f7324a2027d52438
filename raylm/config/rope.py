"""`model.rope_scaling`: the RoPE context-extension settings transformers defines, and their one-line checks.

The mapping carries transformers' keys (`modeling_rope_utils.py`, 4.57): `rope_type` (llama3 | linear | yarn)
and that type's parameters. The same check serves a run config (raylm.config.validate) and a Hugging Face
config.json read by `model.init_from` (raylm.model.hf_llama); raylm.model.rope does the arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# rope_type -> (required keys, optional keys), besides rope_type itself
ROPE_SCALING_KEYS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "linear": (frozenset({"factor"}), frozenset()),
    "llama3": (
        frozenset({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}),
        frozenset(),
    ),
    "yarn": (
        frozenset({"factor"}),
        frozenset(
            {
                "attention_factor",
                "beta_fast",
                "beta_slow",
                "original_max_position_embeddings",
                "mscale",
                "mscale_all_dim",
                "truncate",
            }
        ),
    ),
}
EXAMPLE = (
    "{rope_type: llama3, factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, "
    "original_max_position_embeddings: 8192}"
)
POSITIVE = ("factor", "low_freq_factor", "high_freq_factor", "attention_factor", "beta_fast", "beta_slow")


def normalized(scaling: Mapping[str, Any] | None) -> dict[str, Any]:
    """A rope_scaling mapping with transformers' legacy `type` key read as `rope_type`; {} for none or 'default'."""
    out = {key: value for key, value in (scaling or {}).items() if value is not None}  # null = HF's default
    if "type" in out and "rope_type" not in out:
        out["rope_type"] = out.pop("type")
    return {} if out.get("rope_type") == "default" and len(out) == 1 else out


def rope_scaling_problem(scaling: Mapping[str, Any]) -> str | None:
    """What is wrong with a (normalized) rope_scaling mapping and how to fix it, or None when raylm can run it."""
    if not scaling:
        return None
    kind = scaling.get("rope_type")
    if kind not in ROPE_SCALING_KEYS:
        return f"rope_type {kind!r} is not one of {', '.join(ROPE_SCALING_KEYS)}; e.g. {EXAMPLE}"
    required, optional = ROPE_SCALING_KEYS[kind]
    missing = sorted(required - scaling.keys())
    if missing:
        return f"rope_type {kind} needs {', '.join(missing)}; e.g. {EXAMPLE}"
    unknown = sorted(scaling.keys() - required - optional - {"rope_type"})
    if unknown:
        known = ", ".join(sorted(required | optional))
        return f"rope_type {kind} takes no {unknown[0]!r}; its keys are rope_type, {known}"
    return _value_problem(scaling)


def _value_problem(scaling: Mapping[str, Any]) -> str | None:
    for key, value in scaling.items():
        if key in POSITIVE and not _positive_number(value):
            return f"{key}={value!r} must be a positive number"
    if scaling["factor"] < 1:
        return f"factor={scaling['factor']} must be >= 1 (it stretches the trained context)"
    original = scaling.get("original_max_position_embeddings")
    if original is not None and (isinstance(original, bool) or not isinstance(original, int) or original < 1):
        return f"original_max_position_embeddings={original!r} must be a positive integer"
    if scaling["rope_type"] == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        return (
            f"high_freq_factor={scaling['high_freq_factor']} must exceed "
            f"low_freq_factor={scaling['low_freq_factor']}; Llama 3.1 uses 4.0 and 1.0"
        )
    if scaling.get("beta_fast", 32) < scaling.get("beta_slow", 1):
        return f"beta_fast={scaling.get('beta_fast', 32)} must be >= beta_slow={scaling.get('beta_slow', 1)}"
    if not isinstance(scaling.get("truncate", True), bool):
        return f"truncate={scaling['truncate']!r} must be true or false"
    for key in ("mscale", "mscale_all_dim"):
        if key in scaling and not _positive_number(scaling[key]):
            return f"{key}={scaling[key]!r} must be a positive number"
    return None


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf
