"""`raylm export`: a checkpoint as a Hugging Face Llama folder (safetensors, config.json, tokenizer.json), and back.

The safetensors file is streamed: its header is computed from the model config, then each layer's tensors are
appended as its model file is read, so no more than one layer is ever in memory and optimizer files are never
opened. Names follow transformers' LlamaForCausalLM; raylm's RoPE rotates interleaved pairs while HF's rotates
halves, so the rows of wq and wk are permuted exactly as HF's convert_llama_weights_to_hf does.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import uuid
from pathlib import Path

import torch
import yaml

from raylm.checkpoint.manifest import read_manifest, verify_checkpoint
from raylm.checkpoint.names import CONFIG_FILE, TOKENIZER_FILE, model_file
from raylm.checkpoint.reader import iter_model_layers, resolve_checkpoint
from raylm.checkpoint.writer import model_config_of
from raylm.config.derived import ffn_hidden, kv_heads, padded_vocab
from raylm.config.schema import ModelConfig
from raylm.errors import RaylmError
from raylm.model.gpt import HF_LLAMA_NAMES, param_shapes

WEIGHTS_FILE = "model.safetensors"
HF_CONFIG_FILE = "config.json"
RAYLM_CONFIG_FILE = "raylm_config.yaml"  # the run config, so `raylm generate` knows the tokenizer's vocab size
ROTARY = ("attention.wq.weight", "attention.wk.weight")


def hf_name(name: str) -> str:
    """raylm name -> LlamaForCausalLM name: layers.3.attention.wq.weight -> model.layers.3.self_attn.q_proj.weight."""
    module, leaf = name.rsplit(".", 1)
    if module.startswith("layers."):
        _, idx, rest = module.split(".", 2)
        return f"model.layers.{idx}.{HF_LLAMA_NAMES[rest]}.{leaf}"
    return f"{HF_LLAMA_NAMES[module]}.{leaf}"


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's output rows from RoPE pairs (2k, 2k+1) to halves (k, k + head_dim/2): HF's permute."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of interleaved_to_half."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def to_hf_tensor(name: str, t: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    if name.endswith(ROTARY[0]):
        return interleaved_to_half(t, model.n_head)
    if name.endswith(ROTARY[1]):
        return interleaved_to_half(t, kv_heads(model))
    return t


def hf_config(model: ModelConfig, vocab_rows: int) -> dict:
    """config.json for transformers' LlamaForCausalLM; vocab_size is the embedding's (padded) row count."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32",
        "vocab_size": vocab_rows, "hidden_size": model.d_model, "intermediate_size": ffn_hidden(model),
        "num_hidden_layers": model.n_layer, "num_attention_heads": model.n_head,
        "num_key_value_heads": kv_heads(model), "head_dim": model.d_model // model.n_head, "hidden_act": "silu",
        "max_position_embeddings": model.max_seq_len, "rms_norm_eps": model.norm_eps, "rope_theta": model.rope_theta,
        "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "tie_word_embeddings": model.tie_embeddings, "initializer_range": model.init_std, "use_cache": True,
    }


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


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")


def _stream_layers(f, folder: Path, model: ModelConfig, shapes: dict[str, torch.Size]) -> int:
    """Append each layer's tensors, in `shapes` order, as its model file is read; returns how many were written."""
    written = 0
    for rel_path, tensors in iter_model_layers(folder):
        for name in (n for n in shapes if model_file(n, model.n_layer) == rel_path):
            t = tensors.get(name)
            if t is None or t.shape != shapes[name]:
                raise RaylmError(f"{folder / rel_path} lacks {name} or holds another shape than "
                                 f"{tuple(shapes[name])}; the checkpoint does not match its own manifest's model")
            f.write(to_hf_tensor(name, t.float(), model).contiguous().numpy().tobytes())
            written += 1
    return written


def _write_weights(folder: Path, model: ModelConfig, vocab_rows: int, out: Path) -> int:
    """model.safetensors with HF names and RoPE layout, written to a temporary name and renamed when complete."""
    shapes = param_shapes(model, vocab_rows)  # embedding, blocks, norm, head: the layer files' order
    tmp = _tmp_name(out)
    try:
        with open(tmp, "wb") as f:
            f.write(_safetensors_header([(hf_name(n), tuple(shape)) for n, shape in shapes.items()]))
            written = _stream_layers(f, folder, model, shapes)
            f.flush()
            os.fsync(f.fileno())
        if written != len(shapes):
            raise RaylmError(f"{folder} holds {written} of the model's {len(shapes)} tensors; re-save the checkpoint")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return written


def _copy(src: Path, dst: Path) -> None:
    tmp = _tmp_name(dst)
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def export(source: str | Path, out_dir: str | Path) -> dict:
    """Write a checkpoint (or a run folder's newest one) to out_dir as a Hugging Face Llama folder; a summary."""
    folder = resolve_checkpoint(source)
    manifest = read_manifest(folder)  # the model files and config are verified as they are streamed
    model = model_config_of(manifest)
    vocab_rows = manifest["padded_vocab"]
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    tensors = _write_weights(folder, model, vocab_rows, out / WEIGHTS_FILE)
    config_tmp = _tmp_name(out / HF_CONFIG_FILE)
    config_tmp.write_text(json.dumps(hf_config(model, vocab_rows), indent=2) + "\n")
    os.replace(config_tmp, out / HF_CONFIG_FILE)
    _copy(folder / CONFIG_FILE, out / RAYLM_CONFIG_FILE)
    has_tokenizer = TOKENIZER_FILE in manifest["files"]
    if has_tokenizer:
        verify_checkpoint(folder, only=[TOKENIZER_FILE])
        _copy(folder / TOKENIZER_FILE, out / TOKENIZER_FILE)
    return {"checkpoint": str(folder), "out_dir": str(out), "step": manifest["step"], "tensors": tensors,
            "weights_bytes": (out / WEIGHTS_FILE).stat().st_size, "tokenizer": has_tokenizer}


def _model_from_hf(config: dict, folder: Path) -> dict:
    """raylm model settings from a Llama config.json; RaylmError for what raylm's GPT cannot represent."""
    unsupported = {"model_type": config.get("model_type") != "llama",
                   "rope_scaling": config.get("rope_scaling") is not None,
                   "hidden_act": config.get("hidden_act", "silu") != "silu",
                   "attention_bias": bool(config.get("attention_bias")), "mlp_bias": bool(config.get("mlp_bias")),
                   "head_dim": config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
                   != config["hidden_size"] // config["num_attention_heads"]}
    bad = [key for key, is_bad in unsupported.items() if is_bad]
    if bad:
        raise RaylmError(f"{folder / HF_CONFIG_FILE}: raylm's GPT cannot load a model with these settings: "
                         f"{', '.join(f'{k}={config.get(k)!r}' for k in bad)}; export it from a raylm checkpoint")
    return {"n_layer": config["num_hidden_layers"], "n_head": config["num_attention_heads"],
            "n_kv_head": config.get("num_key_value_heads", config["num_attention_heads"]),
            "d_model": config["hidden_size"], "ffn_hidden": config["intermediate_size"],
            "max_seq_len": config["max_position_embeddings"], "rope_theta": config.get("rope_theta", 10000.0),
            "norm_eps": config["rms_norm_eps"], "tie_embeddings": config.get("tie_word_embeddings", False),
            "init_std": config.get("initializer_range", 0.02)}


def load_export(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(raw run-config tree, raylm full state dict) from an export folder, the inverse of `export`.

    The model section comes from config.json; the rest of the tree from raylm_config.yaml when present (it
    carries data.vocab_size, the tokenizer's size below the padded embedding rows).
    """
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    if not (folder / HF_CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise RaylmError(f"{folder} is not an export folder (needs {HF_CONFIG_FILE} and {WEIGHTS_FILE}); "
                         f"create one with `raylm export CHECKPOINT_OR_RUN OUT_DIR`")
    config = json.loads((folder / HF_CONFIG_FILE).read_text())
    tree = yaml.safe_load((folder / RAYLM_CONFIG_FILE).read_text()) if (folder / RAYLM_CONFIG_FILE).is_file() else {}
    tree["model"] = {**tree.get("model", {}), **_model_from_hf(config, folder)}
    tree.setdefault("data", {}).setdefault("vocab_size", config["vocab_size"])
    if padded_vocab(tree["data"]["vocab_size"]) != config["vocab_size"]:
        raise RaylmError(f"{folder / HF_CONFIG_FILE}: vocab_size={config['vocab_size']} is not data.vocab_size="
                         f"{tree['data']['vocab_size']} padded to a multiple of 128; raylm cannot load it")
    model = ModelConfig(**tree["model"])
    by_hf = {hf_name(n): n for n in param_shapes(model, config["vocab_size"])}
    state = {}
    for key, t in load_file(folder / WEIGHTS_FILE).items():
        if key not in by_hf:
            if key == "lm_head.weight" and model.tie_embeddings:
                continue  # some writers store the tied head anyway
            raise RaylmError(f"{folder / WEIGHTS_FILE} holds {key}, which a raylm Llama does not have")
        name = by_hf[key]
        if name.endswith(ROTARY[0]):
            t = half_to_interleaved(t, model.n_head)
        elif name.endswith(ROTARY[1]):
            t = half_to_interleaved(t, kv_heads(model))
        state[name] = t.float()
    missing = sorted(set(by_hf.values()) - set(state))
    if missing:
        raise RaylmError(f"{folder / WEIGHTS_FILE} lacks {len(missing)} tensors, e.g. {hf_name(missing[0])}")
    return tree, state
