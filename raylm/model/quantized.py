"""raylm's compressed folder and how to read it back (`raylm compress` writes it, hf_weights reads it).

The folder is a Hugging Face Llama export whose linear weights may be quantized, plus masks.

The full description is docs/compression.md. In short, next to config.json, tokenizer and raylm_config.yaml:

    model.safetensors   float tensors as `raylm export` writes them, except that each quantized matrix W is
                        `W.qweight` (int8, or uint8 holding two int4) and `W.scales` (fp32) instead of `W`
    masks.safetensors   (pruned folders) one bool tensor per pruned matrix, under the matrix's own name
    config.json         `quantization_config: {quant_method: raylm, bits: 8|4, group_size: N|null}` when quantized

Names and row order are the export's (HF Llama, rotate-half wq/wk), so dequantizing gives the export back.
"""

from __future__ import annotations

import torch

QUANT_METHOD = "raylm"
MASKS_FILE = "masks.safetensors"
QWEIGHT, SCALES = ".qweight", ".scales"
QUANT_DTYPES = ("I8", "U8")  # int8 values; uint8 pairs of int4 values


def quantization_config(bits: int, group_size: int | None) -> dict:
    """config.json's quantization_config for a folder quantized to `bits` (group_size None: one scale per row)."""
    return {"quant_method": QUANT_METHOD, "bits": bits, "group_size": group_size}


def is_raylm_quantized(config: dict) -> bool:
    return (config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD


def stored_names(weight_name: str) -> tuple[str, str]:
    """The (qweight, scales) tensor names of a quantized matrix."""
    base = weight_name.removesuffix(".weight")
    return base + QWEIGHT, base + SCALES


def weight_name(stored: str) -> str | None:
    """The matrix name a `*.qweight` tensor stands for; None for any other tensor."""
    return stored.removesuffix(QWEIGHT) + ".weight" if stored.endswith(QWEIGHT) else None


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: int8 (out, 2 * packed columns) in [-8, 7]."""
    low, high = (packed & 0xF).to(torch.int8), (packed >> 4).to(torch.int8)
    values = torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)
    return torch.where(values >= 8, values - 16, values)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 (out, in) from the stored form (no torchao needed)."""
    q = unpack_int4(qweight) if bits == 4 else qweight.to(torch.int8)
    group = q.shape[1] // scales.shape[1]
    return q.float() * scales.float().repeat_interleave(group, dim=1)


def in_features(qweight_shape: tuple[int, ...], bits: int) -> int:
    """The input width of the matrix a stored qweight holds."""
    return qweight_shape[1] * (8 // bits)
