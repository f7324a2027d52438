"""The quantized folder `raylm compress` writes, in compressed-tensors' pack-quantized format, and how to read it.

The format is the one transformers (with `compressed-tensors` installed) and vLLM load for weight-only int8/int4
models; raylm reads it with plain torch, no compressed-tensors needed. The full description is
docs/compression.md. In short, next to config.json, tokenizer and raylm_config.yaml:

    model.safetensors   float tensors as `raylm export` writes them, except that each quantized matrix W
                        (`<module>.weight`, shape out x in) is stored as three tensors:
                        `<module>.weight_packed`  int32 (out, in * bits / 32): the integers q + 2**(bits-1), 32 / bits
                                                  consecutive columns per word, column 0 in the lowest bits
                        `<module>.weight_scale`   fp32 (out, in / group_size), one column for int8 (per channel)
                        `<module>.weight_shape`   int64 [out, in]
                        W[:, j] = q[:, j] * weight_scale[:, j // group_size]
    config.json         `quantization_config`: quant_method compressed-tensors, format pack-quantized, one
                        config group (weights: int, symmetric, 8 bits per channel or 4 bits per group)
    masks.safetensors   (pruned folders) one bool tensor per pruned matrix, under the matrix's own name

Names and row order are the export's (HF Llama, rotate-half wq/wk), so dequantizing gives the export back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raylm.errors import CheckpointError

QUANT_METHOD = "compressed-tensors"
PACKED_FORMAT = "pack-quantized"
OLD_QUANT_METHOD = "raylm"  # raylm's own earlier format, which nothing else read
MASKS_FILE = "masks.safetensors"
PACKED, SCALE, SHAPE = ".weight_packed", ".weight_scale", ".weight_shape"
PART_DTYPES = {PACKED: ("I32",), SHAPE: ("I64",)}  # safetensors dtypes of the integer parts (scales: float)
IGNORED_MODULES = ["lm_head"]  # the output head stays float: vLLM reads quantized linear layers only
READS = "raylm reads pack-quantized int8 (per channel) or int4 (per group), weight-only, symmetric"


@dataclass(frozen=True)
class QuantScheme:
    """How a folder's matrices are quantized: `bits` (8 or 4), `group_size` input columns per scale (None: one
    scale per output row)."""

    bits: int
    group_size: int | None


def quantization_config(bits: int, group_size: int | None) -> dict:
    """config.json's quantization_config for every linear layer but the output head quantized to `bits`."""
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": True,
        "strategy": "channel" if group_size is None else "group",
        "group_size": group_size,
        "dynamic": False,
    }
    return {
        "quant_method": QUANT_METHOD,
        "format": PACKED_FORMAT,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": PACKED_FORMAT,
            }
        },
        "ignore": list(IGNORED_MODULES),
        "kv_cache_scheme": None,
    }


def is_quantized(config: dict) -> bool:
    """True for a config.json with any quantization_config."""
    return bool(config.get("quantization_config"))


def read_scheme(config: dict, label: str) -> QuantScheme:
    """The scheme of a quantized config.json; CheckpointError naming the first setting raylm cannot read."""
    qc = config["quantization_config"]
    method = qc.get("quant_method")
    if method == OLD_QUANT_METHOD:
        raise CheckpointError(
            f"{label}: quantized by an older raylm compress in its own format (quant_method 'raylm'), which "
            f"nothing reads any more; compress the unquantized export again (raylm compress SOURCE OUT --quantize)"
        )
    groups = qc.get("config_groups") or {}
    scheme = next(iter(groups.values()), None) if len(groups) == 1 else None
    weights = scheme.get("weights") if isinstance(scheme, dict) else None
    problem = _unreadable(qc, scheme, weights) if method == QUANT_METHOD else f"quant_method {method!r}"
    if problem:
        raise CheckpointError(
            f"{label}: quantization_config has {problem}; {READS} (`raylm compress --quantize`); "
            f"load this folder with transformers or vLLM instead"
        )
    assert weights is not None  # _unreadable found none missing
    return QuantScheme(
        weights["num_bits"], weights.get("group_size") if weights["strategy"] == "group" else None
    )


def _unreadable(qc: dict, scheme: dict | None, weights: dict | None) -> str | None:
    """The first compressed-tensors setting outside what raylm reads, or None."""
    if qc.get("format") != PACKED_FORMAT or (scheme or {}).get("format", PACKED_FORMAT) != PACKED_FORMAT:
        return f"format {qc.get('format')!r}"
    if weights is None:
        return "not exactly one config group with weights"
    if qc.get("kv_cache_scheme") or qc.get("sparsity_config") or qc.get("transform_config"):
        return "a kv-cache, sparsity or transform scheme"
    if scheme and (scheme.get("input_activations") or scheme.get("output_activations")):
        return "activation quantization"
    strategy, group_size = weights.get("strategy"), weights.get("group_size")
    if (
        weights.get("type") != "int"
        or weights.get("symmetric") is not True
        or weights.get("num_bits") not in (4, 8)
        or weights.get("actorder")
        or not (
            strategy == "channel" or (strategy == "group" and isinstance(group_size, int) and group_size > 0)
        )
    ):
        keys = ("num_bits", "type", "symmetric", "strategy", "group_size", "actorder")
        return "weights " + ", ".join(f"{k}={weights.get(k)!r}" for k in keys)
    return None


def stored_names(weight_name: str) -> tuple[str, str, str]:
    """The (packed, scale, shape) tensor names of a quantized matrix `<module>.weight`."""
    base = weight_name.removesuffix(".weight")
    return base + PACKED, base + SCALE, base + SHAPE


def weight_name(stored: str) -> str | None:
    """The matrix name a `*.weight_packed` tensor stands for; None for any other tensor."""
    return stored.removesuffix(PACKED) + ".weight" if stored.endswith(PACKED) else None


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 (out, in) values in [-2**(bits-1), 2**(bits-1)) -> int32 (out, ceil(in * bits / 32)), as above."""
    per_word = 32 // bits
    unsigned = q.to(torch.int64) + (1 << (bits - 1))  # (out, in), in [0, 2**bits)
    rows, cols = unsigned.shape
    words = torch.nn.functional.pad(unsigned, (0, -cols % per_word)).reshape(rows, -1, per_word)
    packed = (words << (bits * torch.arange(per_word))).sum(dim=-1)  # (out, words), in [0, 2**32)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32).contiguous()


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The inverse of `pack`: int8 (out, cols)."""
    per_word = 32 // bits
    shifts = bits * torch.arange(per_word)
    fields = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (out, words, per_word)
    return (fields.reshape(packed.shape[0], -1)[:, :cols] - (1 << (bits - 1))).to(torch.int8)


def in_features(packed_shape: tuple[int, ...], scale_shape: tuple[int, ...], scheme: QuantScheme) -> int:
    """The input width of a stored matrix, from its headers: exact for groups, the packed width for channels."""
    if scheme.group_size is not None:
        return scale_shape[1] * scheme.group_size
    return packed_shape[1] * (32 // scheme.bits)


def dequantize(packed: torch.Tensor, scale: torch.Tensor, cols: int, bits: int) -> torch.Tensor:
    """fp32 (out, cols) from the stored form (no compressed-tensors needed)."""
    q = unpack(packed, bits, cols)
    group = cols // scale.shape[1]
    return q.float() * scale.float().repeat_interleave(group, dim=1)
