"""`raylm compress`: read a run, checkpoint or export, prune and/or quantize its linear layers, write a folder.

    summary = compress(CompressOptions(source="runs/t1", out_dir="exports/t1-int8", quantize="int8"))

The output is an export folder that `raylm eval`, `raylm generate` and, when it is not quantized,
`model.init_from` read; a quantized one is in compressed-tensors' pack-quantized format (raylm.model.quantized),
which transformers and vLLM load too. Pruning touches every 2-D weight except the token embedding; quantization
also leaves the output head (ignored by the format's readers) and the norms in fp32. The summary is one JSON-able
dict: parameters, bytes before and after, sparsity, and with `eval_data` loss and perplexity of the source and of
the output on the same samples (raylm.evaluate).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from raylm.checkpoint.export import write_hf_files
from raylm.compress.prune import CompressError, check_prune_options, prune_masks
from raylm.compress.quantize import BITS, quantize
from raylm.config import resolve
from raylm.config.derived import padded_vocab
from raylm.evaluate import evaluate, open_source
from raylm.model.hf_llama import hf_name, to_hf_tensor
from raylm.model.quantized import MASKS_FILE, is_quantized, pack, quantization_config, stored_names
from raylm.storage.atomic import atomic_path, copy_atomic, write_atomic
from raylm.storage.file_names import HF_CONFIG_FILE, RAYLM_CONFIG_FILE, WEIGHTS_FILE
from raylm.storage.uri import refuse_uri

EMBEDDING, OUTPUT = "tok_embeddings.weight", "output.weight"


@dataclass(frozen=True)
class CompressOptions:
    """What `raylm compress` was asked to do; `check` refuses bad values with one line each."""

    source: str
    out_dir: str
    quantize: str | None = None  # int8 | int4
    group_size: int = 128  # int4 only: input columns per scale
    prune: float | None = None  # fraction of linear weights to remove
    pattern: str = "unstructured"
    scope: str = "layer"
    dequantize: bool = False  # write a quantized folder back as float weights
    eval_data: str | None = None

    def check(self) -> None:
        if self.quantize is None and self.prune is None and not self.dequantize:
            raise CompressError("nothing to do: pass --quantize int8|int4, --prune FRACTION or --dequantize")
        if self.quantize is not None and self.quantize not in BITS:
            raise CompressError(
                f"--quantize {self.quantize!r} is not a quantization method; use int8 or int4"
            )
        if self.dequantize and (self.quantize or self.prune is not None):
            raise CompressError(
                "--dequantize writes float weights and cannot be combined with --quantize or "
                "--prune; dequantize first, then compress the result"
            )
        if self.group_size < 1:
            raise CompressError(
                f"--group-size {self.group_size} must be a positive number of input columns, e.g. 128"
            )
        if self.prune is not None or self.pattern != "unstructured" or self.scope != "layer":
            check_prune_options(0.5 if self.prune is None else self.prune, self.pattern, self.scope)
        if Path(self.out_dir).expanduser().resolve() == Path(self.source).expanduser().resolve():
            raise CompressError(f"OUT {self.out_dir} is the SOURCE folder; name a new folder for the output")


def linear_names(state: dict[str, torch.Tensor], head: bool) -> list[str]:
    """The matrices compress touches: every 2-D weight but the embedding; the output head only when `head`."""
    return [n for n, t in state.items() if t.dim() == 2 and n != EMBEDDING and (head or n != OUTPUT)]


def _check_source(options: CompressOptions) -> bool:
    """Refuse a source compress cannot work on; True when it is a quantized folder."""
    config_file = Path(options.source).expanduser() / HF_CONFIG_FILE
    try:
        quantized = config_file.is_file() and is_quantized(json.loads(config_file.read_text()))
    except (ValueError, AttributeError):
        quantized = False  # open_source names what is wrong with the folder
    if quantized and (options.quantize or options.prune is not None):
        raise CompressError(
            f"{options.source} is already quantized; compress the unquantized export, or "
            f"dequantize it first (raylm compress {options.source} OUT --dequantize)"
        )
    if options.dequantize and not quantized:
        raise CompressError(
            f"--dequantize: {options.source} is not a quantized folder; there is nothing to dequantize"
        )
    return quantized


def _check_group_size(hf: dict[str, torch.Tensor], names: list[str], group_size: int) -> None:
    for name in names:
        cols = hf[name].shape[1]
        if cols % group_size:
            divisors = [g for g in (256, 128, 64, 32, 16) if cols % g == 0]
            raise CompressError(
                f"--group-size {group_size} does not divide the input width {cols} of layer "
                f"{name}; pass a --group-size that divides every linear layer's width "
                f"(e.g. {divisors[0] if divisors else 'a divisor of ' + str(cols)})"
            )


def compress(options: CompressOptions) -> dict:
    """Write the compressed folder and return the summary (see the module docstring)."""
    options.check()
    refuse_uri(
        "compress OUT",
        options.out_dir,
        "compressed folders are written to a local folder only; write locally, then copy the folder",
    )
    source_quantized = _check_source(options)
    opened = open_source(options.source)
    cfg = resolve(opened.tree, {"data.paths": [], "data.sources": [], "model.init_from": ""})
    state = opened.read_state()
    hf = {hf_name(n): to_hf_tensor(n, t.float(), cfg.model) for n, t in state.items()}
    linear = [hf_name(n) for n in linear_names(state, head=False)]
    prunable = [hf_name(n) for n in linear_names(state, head=True)]
    masks = _prune(hf, prunable, options)
    if options.quantize == "int4":
        _check_group_size(hf, linear, options.group_size)
    stored = _quantize(hf, linear, options) if options.quantize else hf
    out = Path(options.out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    qconfig = (
        quantization_config(
            BITS[options.quantize], options.group_size if options.quantize == "int4" else None
        )
        if options.quantize
        else None
    )
    _write_folder(out, stored, masks, opened, cfg, qconfig)
    if masks is None and not options.prune and (Path(options.source) / MASKS_FILE).is_file():
        copy_atomic(Path(options.source) / MASKS_FILE, out / MASKS_FILE)  # a pruned export keeps its masks
    summary = _summary(options, hf, stored, prunable, source_quantized)
    if options.eval_data is not None:
        before = evaluate(options.source, data=options.eval_data)
        after = evaluate(out, data=options.eval_data)
        summary.update(
            {
                "eval_samples": after["samples"],
                "loss_before": before["loss"],
                "ppl_before": before["ppl"],
                "loss_after": after["loss"],
                "ppl_after": after["ppl"],
                "ppl_ratio": after["ppl"] / before["ppl"],
            }
        )
    return summary


def _prune(
    hf: dict[str, torch.Tensor], names: list[str], options: CompressOptions
) -> dict[str, torch.Tensor] | None:
    """Zero the pruned weights of `hf` in place; the masks (None when not pruning)."""
    if options.prune is None:
        return None
    masks = prune_masks({n: hf[n] for n in names}, options.prune, options.pattern, options.scope)
    for name, mask in masks.items():
        hf[name] = hf[name] * mask
    return masks


def _quantize(
    hf: dict[str, torch.Tensor], names: list[str], options: CompressOptions
) -> dict[str, torch.Tensor]:
    """The tensors to store: each named matrix as its packed integers, scales and shape, the rest as they are."""
    assert options.quantize is not None  # called only with --quantize
    stored = {}
    for name, tensor in hf.items():
        if name in names:
            q = quantize(tensor, options.quantize, options.group_size)
            packed, scale, shape = stored_names(name)
            stored[packed] = pack(q.q, BITS[options.quantize])
            stored[scale], stored[shape] = q.scales, torch.tensor(tensor.shape, dtype=torch.int64)
        else:
            stored[name] = tensor.contiguous()
    return stored


def _write_folder(
    out: Path,
    stored: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor] | None,
    opened,
    cfg,
    qconfig: dict | None,
) -> None:
    """model.safetensors, masks.safetensors, config.json and the tokenizer and run-config files, each renamed
    into place when complete."""
    from safetensors.torch import save_file

    _save(save_file, stored, out / WEIGHTS_FILE)
    if masks is not None:
        _save(save_file, {n: m.contiguous() for n, m in masks.items()}, out / MASKS_FILE)
    write_hf_files(
        out,
        cfg.model,
        cfg.data.vocab_size,
        padded_vocab(cfg.data.vocab_size),
        opened.tokenizer,
        quantization=qconfig,
    )
    tree = {**opened.tree, "model": {**opened.tree.get("model", {}), "init_from": ""}}
    write_atomic(out / RAYLM_CONFIG_FILE, yaml.safe_dump(tree, sort_keys=False))


def _save(save_file, tensors: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def _summary(
    options: CompressOptions,
    hf: dict[str, torch.Tensor],
    stored: dict[str, torch.Tensor],
    linear: list[str],
    source_quantized: bool,
) -> dict:
    """Parameters, fp32 bytes before, stored bytes after, and the zeros among the linear weights (the embedding
    is never pruned, so it is left out)."""
    parameters = sum(t.numel() for t in hf.values())
    zeros = sum(int((hf[n] == 0).sum()) for n in linear)
    linear_params = sum(hf[n].numel() for n in linear)
    bytes_before, bytes_after = 4 * parameters, sum(t.numel() * t.element_size() for t in stored.values())
    method = (
        "dequantize"
        if options.dequantize
        else "+".join(
            ([f"prune{options.prune}:{options.pattern}:{options.scope}"] if options.prune is not None else [])
            + ([options.quantize] if options.quantize else [])
        )
    )
    return {
        "source": options.source,
        "out_dir": options.out_dir,
        "method": method,
        "group_size": options.group_size if options.quantize == "int4" else None,
        "parameters": parameters,
        "linear_parameters": linear_params,
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
        "size_ratio": bytes_after / bytes_before,
        "sparsity": zeros / linear_params if linear_params else 0.0,
        "source_quantized": source_quantized,
    }
