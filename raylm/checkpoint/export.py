"""`raylm export`: a checkpoint as a Hugging Face Llama folder that transformers loads as is, and back.

The folder: model.safetensors, config.json (LlamaForCausalLM, with raylm's special-token ids),
generation_config.json, tokenizer.json with tokenizer_config.json and special_tokens_map.json (a fast tokenizer
whose ids equal raylm's), and raylm_config.yaml (the run config). The safetensors file is streamed: its header
is computed from the model config, then each layer's tensors are appended as its model file is read, so no
more than one layer is ever in memory and optimizer files are never opened. Names and the wq/wk row order
follow transformers' Llama (raylm.model.hf_llama); reading back goes through raylm.model.hf_weights.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import torch
import yaml

from raylm.checkpoint.manifest import read_checkpoint_manifest, verify_checkpoint
from raylm.checkpoint.names import model_file
from raylm.checkpoint.reader import iter_model_layers, resolve_checkpoint
from raylm.checkpoint.writer import model_config_of
from raylm.config.derived import padded_vocab
from raylm.config.schema import ModelConfig
from raylm.data.tokenizer import EOT, EOT_ID, SPECIAL_TOKENS, load_tokenizer_file
from raylm.errors import RaylmError
from raylm.model.gpt import param_shapes
from raylm.model.hf_llama import hf_config, hf_name, model_settings, to_hf_tensor
from raylm.model.hf_weights import HFWeights, open_folder
from raylm.storage.atomic import atomic_open, copy_atomic, write_json_atomic
from raylm.storage.file_names import (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    HF_CONFIG_FILE,
    RAYLM_CONFIG_FILE,
    SPECIAL_TOKENS_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
)
from raylm.storage.location import (
    Location,
    as_location,
    download_folder,
    is_remote,
    local_view,
    read_bytes,
    upload_folder,
)

PAD = SPECIAL_TOKENS[1]  # "<|pad|>"


def _safetensors_header(specs: list[tuple[str, tuple[int, ...]]]) -> bytes:
    """The 8-byte length plus JSON header of an all-fp32 safetensors file holding `specs` in order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in specs:
        nbytes = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header so tensor data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _stream_layers(f, folder: Location, model: ModelConfig, shapes: dict[str, torch.Size]) -> int:
    """Append each layer's tensors, in `shapes` order, as its model file is read; returns how many were written."""
    written = 0
    for rel_path, tensors in iter_model_layers(folder):
        for name in (n for n in shapes if model_file(n, model.n_layer) == rel_path):
            t = tensors.get(name)
            if t is None or t.shape != shapes[name]:
                raise RaylmError(
                    f"{folder / rel_path} lacks {name} or holds another shape than "
                    f"{tuple(shapes[name])}; the checkpoint does not match its own manifest's model"
                )
            f.write(to_hf_tensor(name, t.float(), model).contiguous().numpy().tobytes())
            written += 1
    return written


def _write_weights(folder: Location, model: ModelConfig, vocab_rows: int, out: Path) -> int:
    """model.safetensors with HF names and RoPE layout, written to a temporary name and renamed when complete."""
    shapes = param_shapes(model, vocab_rows)  # embedding, blocks, norm, head: the layer files' order
    with atomic_open(out) as f:
        f.write(_safetensors_header([(hf_name(n), tuple(shape)) for n, shape in shapes.items()]))
        written = _stream_layers(f, folder, model, shapes)
        if written != len(shapes):
            raise RaylmError(
                f"{folder} holds {written} of the model's {len(shapes)} tensors; re-save the checkpoint"
            )
    return written


def special_token_ids(tokenizer_path: Path | None) -> dict[str, int | None]:
    """bos/eos/pad ids for config.json: raylm's end-of-document token (id 0) is both BOS and EOS, since every
    training window sees it at document boundaries and never <|bos|>; pad is <|pad|> where the tokenizer has it."""
    pad_id = None
    if tokenizer_path is not None:
        pad_id = load_tokenizer_file(tokenizer_path).token_to_id(PAD)
    return {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": pad_id}


def generation_config(model: ModelConfig, vocab_size: int, vocab_rows: int, token_ids: dict) -> dict:
    """generation_config.json: `raylm generate`'s defaults; the padding rows past the tokenizer's vocabulary are
    suppressed, as raylm generate never picks them."""
    return {
        **token_ids,
        "do_sample": True,
        "temperature": 0.8,
        "top_k": 50,
        "max_length": model.max_seq_len,
        "suppress_tokens": list(range(vocab_size, vocab_rows)) or None,
    }


def tokenizer_config(model: ModelConfig, token_ids: dict) -> tuple[dict, dict]:
    """(tokenizer_config.json, special_tokens_map.json) for transformers' fast tokenizer over tokenizer.json.

    split_special_tokens: a literal "<|endoftext|>" in text is ordinary text, as in raylm's tokenizer; no
    BOS/EOS is added on encode and decoding does not touch spaces, so HF's ids and text equal raylm's; no
    token_type_ids, which LlamaForCausalLM.generate refuses."""
    special = {"bos_token": EOT, "eos_token": EOT}
    if token_ids["pad_token_id"] is not None:
        special["pad_token"] = PAD
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": model.max_seq_len,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_input_names": ["input_ids", "attention_mask"],
    }
    return config, special


def write_hf_files(
    out: Path,
    model: ModelConfig,
    vocab_size: int,
    vocab_rows: int,
    tokenizer: Path | None,
    quantization: dict | None = None,
) -> None:
    """config.json (with `quantization` as its quantization_config: raylm compress) and generation_config.json,
    plus the tokenizer files when the checkpoint has a tokenizer."""
    token_ids = special_token_ids(tokenizer)
    config = hf_config(model, vocab_rows, token_ids)
    hf_file = {**config, "quantization_config": quantization} if quantization else config
    write_json_atomic(out / HF_CONFIG_FILE, hf_file, indent=2)
    generation = generation_config(model, vocab_size, vocab_rows, token_ids)
    write_json_atomic(out / GENERATION_CONFIG_FILE, generation, indent=2)
    if tokenizer is not None:
        copy_atomic(tokenizer, out / TOKENIZER_FILE)
        config, special = tokenizer_config(model, token_ids)
        write_json_atomic(out / TOKENIZER_CONFIG_FILE, config, indent=2)
        write_json_atomic(out / SPECIAL_TOKENS_FILE, special, indent=2)


def export(source: Location | str, out_dir: Location | str) -> dict:
    """Write a checkpoint (or a run folder's newest one) to out_dir as a Hugging Face Llama folder; a summary.

    Either may be on object storage: a source's files are fetched into this node's cache, verified; an s3://
    or gs:// out_dir is written in this node's mirror of it, then uploaded with config.json last."""
    target = as_location(out_dir, "export OUT_DIR")
    folder = resolve_checkpoint(source)
    manifest = read_checkpoint_manifest(
        folder
    )  # the model files and config are verified as they are streamed
    model = model_config_of(manifest)
    vocab_rows = manifest["padded_vocab"]
    out = local_view(target)
    if is_remote(target):
        shutil.rmtree(out, ignore_errors=True)  # an earlier export to the prefix: only this one's files go up
    out.mkdir(parents=True, exist_ok=True)
    tensors = _write_weights(folder, model, vocab_rows, out / WEIGHTS_FILE)
    has_tokenizer = TOKENIZER_FILE in manifest["files"]
    if has_tokenizer:
        verify_checkpoint(folder, only=[TOKENIZER_FILE])
    source_files = local_view(folder)  # verified above (tokenizer) and while streaming (model files, config)
    write_hf_files(
        out,
        model,
        manifest["vocab_size"],
        vocab_rows,
        source_files / TOKENIZER_FILE if has_tokenizer else None,
    )
    copy_atomic(source_files / CONFIG_FILE, out / RAYLM_CONFIG_FILE)
    if is_remote(target):
        upload_folder(out, target, last=(HF_CONFIG_FILE,))
    return {
        "checkpoint": str(folder),
        "out_dir": str(target),
        "step": manifest["step"],
        "tensors": tensors,
        "weights_bytes": (out / WEIGHTS_FILE).stat().st_size,
        "tokenizer": has_tokenizer,
    }


def export_folder(source: Location | str) -> Path | None:
    """The local folder of an export (a folder or prefix holding config.json; a prefix is fetched into this node's
    cache first), or None when the source is a run or checkpoint."""
    location = as_location(source, "RUN_OR_CHECKPOINT")
    if read_bytes(location / HF_CONFIG_FILE) is None:
        return None
    return download_folder(location) if is_remote(location) else location


def open_export(folder: str | Path) -> tuple[dict, HFWeights]:
    """(raw run-config tree, WeightSource over its tensors) of an export folder; only headers are read.

    The model section comes from config.json; the rest of the tree from raylm_config.yaml when present (it
    carries data.vocab_size, the tokenizer's size below the padded embedding rows). Any Llama folder that
    raylm.model.hf_weights accepts opens here too.
    """
    hf = open_folder(folder, quantized_ok=True)  # eval and generate read quantized folders, dequantized
    path = hf.path
    tree = (
        yaml.safe_load((path / RAYLM_CONFIG_FILE).read_text()) if (path / RAYLM_CONFIG_FILE).is_file() else {}
    )
    rows = hf.config["vocab_size"]
    tree["model"] = {
        **tree.get("model", {}),
        **model_settings(hf.config),
        "init_from": "",
    }  # weights: this folder
    tree.setdefault("data", {}).setdefault("vocab_size", rows)
    if padded_vocab(tree["data"]["vocab_size"]) != rows:
        raise RaylmError(
            f"{path / HF_CONFIG_FILE}: vocab_size={rows} is not data.vocab_size="
            f"{tree['data']['vocab_size']} padded to a multiple of 128; raylm cannot load it"
        )
    return tree, HFWeights(hf, ModelConfig(**tree["model"]), rows)


def load_export(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(raw run-config tree, raylm full state dict) from an export folder, the inverse of `export`."""
    tree, weights = open_export(folder)
    return tree, {name: weights.read(name) for name in weights.shapes}
