"""A Hugging Face Llama folder (config.json + safetensors) as a WeightSource: `model.init_from`, eval, generate.

`open_folder` is the one place that decides whether a folder can be read at all (a Llama, float safetensors,
not truncated; `_check_format` holds the format rules); it parses config.json and the safetensors headers only.
A quantized folder (compressed-tensors pack-quantized, what `raylm compress` writes) opens only where asked
(`quantized_ok`: eval, generate): its matrices are dequantized as they are read (raylm.model.quantized), and any
other quantization is refused in one line; a pruned folder's masks are served by `read_mask`.
`HFWeights` then checks every tensor a model config needs against those headers, naming the first mismatch, and serves
`read(name, shard)` from memory-mapped files: `get_slice` reads only a tensor-parallel rank's rows or columns,
so a rank touches only the bytes it owns. wq/wk rows go back from HF's rotate-half order to raylm's
interleaved pairs after slicing, which is exact because a TP slice holds whole heads.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from raylm.config.schema import ModelConfig
from raylm.errors import CheckpointError
from raylm.model.gpt import param_shapes
from raylm.model.hf_llama import (
    LLAMA_ARCH,
    LLAMA_TYPE,
    differing_settings,
    half_to_interleaved,
    hf_name,
    rotary_heads,
    unsupported_settings,
)
from raylm.model.quantized import (
    MASKS_FILE,
    PART_DTYPES,
    QuantScheme,
    dequantize,
    in_features,
    is_quantized,
    read_scheme,
    stored_names,
    weight_name,
)
from raylm.model.weight_source import Shard
from raylm.storage.file_names import HF_CONFIG_FILE

INDEX_FILE = "model.safetensors.index.json"  # sharded folders map each tensor to its file here
FLOAT_DTYPES = ("F32", "BF16", "F16")
REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "rms_norm_eps",
)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older HF writers saved; recomputed by every reader
FIX = "point it at a Hugging Face Llama folder of float safetensors, such as one `raylm export` wrote"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what its header says."""

    file: Path
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class HFFolder:
    """A readable Llama folder: its config.json and every tensor's header entry, by HF name."""

    path: Path
    label: str  # how messages name it, e.g. "model.init_from=/exports/t1"
    config: dict
    tensors: dict[str, TensorInfo]  # a quantized matrix appears under its float name with dtype Q8 or Q4
    masks: dict[str, TensorInfo]  # pruning masks by the name of the matrix they belong to (empty: none)
    scheme: QuantScheme | None = None  # how the Q8/Q4 matrices are stored (None: not quantized)
    parts: dict[str, TensorInfo] | None = None  # the packed, scale and shape tensors of the Q8/Q4 matrices


def open_folder(folder: str | Path, label: str | None = None, quantized_ok: bool = False) -> HFFolder:
    """Check that `folder` is a float Llama safetensors folder (or, with quantized_ok, a quantized one raylm
    reads) and read its headers; CheckpointError if not."""
    path = Path(folder).expanduser()
    label = label or str(path)
    if not path.is_dir():
        raise CheckpointError(f"{label}: no such folder; {FIX}")
    config = _read_config(path, label)
    tensors = _read_headers(_tensor_files(path, label), label)
    tensors, scheme, parts = _check_format(config, tensors, label, quantized_ok)
    masks = _read_headers([path / MASKS_FILE], label) if (path / MASKS_FILE).is_file() else {}
    return HFFolder(path, label, config, tensors, masks, scheme, parts)


def _read_config(path: Path, label: str) -> dict:
    file = path / HF_CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{label}: no {HF_CONFIG_FILE} in {path}; {FIX}")
    config = _json(file, label)
    missing = [key for key in REQUIRED_KEYS if not isinstance(config.get(key), (int, float))]
    if missing:
        raise CheckpointError(
            f"{label}: {file} has no numeric {missing[0]}, which a Llama config.json has; {FIX}"
        )
    architectures = config.get("architectures") or [LLAMA_ARCH]
    if config.get("model_type") != LLAMA_TYPE or LLAMA_ARCH not in architectures:
        raise CheckpointError(
            f"{label}: {file} describes model_type={config.get('model_type')!r} architectures="
            f"{architectures}, not a Llama ({LLAMA_ARCH}); raylm trains Llama-family models only, "
            f"so {FIX}"
        )
    return config


def _json(file: Path, label: str) -> dict:
    """A JSON object from `file`; CheckpointError naming the file otherwise."""
    try:
        obj = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{label}: {file} is not valid JSON ({exc}); {FIX}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{label}: {file} holds a {type(obj).__name__}, not a JSON object; {FIX}")
    return obj


def _tensor_files(path: Path, label: str) -> list[Path]:
    """The safetensors files to read: those the index names when there is one, else every *.safetensors."""
    if (path / INDEX_FILE).is_file():
        names = sorted(set(_json(path / INDEX_FILE, label).get("weight_map", {}).values()))
        bad = [n for n in names if "/" in n or n.startswith(".") or not (path / n).is_file()]
        if bad:
            raise CheckpointError(
                f"{label}: {INDEX_FILE} names {bad[0]!r}, which is not a file in {path}; "
                f"copy the whole folder again"
            )
        return [path / n for n in names]
    files = sorted(p for p in path.glob("*.safetensors") if p.name != MASKS_FILE)
    if not files:
        others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        found = (
            f" (found {', '.join(others[:3])}: pickles are never read, loading one can run code)"
            if others
            else ""
        )
        raise CheckpointError(f"{label}: no *.safetensors file in {path}{found}; {FIX}")
    return files


def _read_headers(files: list[Path], label: str) -> dict[str, TensorInfo]:
    """Every tensor's dtype and shape from the safetensors headers of `files` (no tensor data is read)."""
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for name, entry in _header(file, label).items():
            if name != "__metadata__":
                tensors[name] = TensorInfo(file, entry["dtype"], tuple(entry["shape"]))
    return tensors


def _header(file: Path, label: str) -> dict:
    """A safetensors file's JSON header, after checking the file holds every byte the header points to."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw_len = f.read(8)
        header_len = struct.unpack("<Q", raw_len)[0] if len(raw_len) == 8 else size
        if header_len > size - 8:
            raise CheckpointError(
                f"{label}: {file} is not a safetensors file (or is truncated); copy it again"
            )
        try:
            header = json.loads(f.read(header_len))
            entries = [e for k, e in header.items() if k != "__metadata__"]
            data_end = max(
                (e["data_offsets"][1] for e in entries if e["dtype"] and e["shape"] is not None), default=0
            )
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise CheckpointError(
                f"{label}: {file} has a malformed safetensors header; copy it again"
            ) from None
    if 8 + header_len + data_end > size:
        raise CheckpointError(
            f"{label}: {file} has {size} bytes but its header needs {8 + header_len + data_end} "
            f"(truncated); copy it again"
        )
    return header


def _check_format(
    config: dict, tensors: dict[str, TensorInfo], label: str, quantized_ok: bool
) -> tuple[dict[str, TensorInfo], QuantScheme | None, dict[str, TensorInfo] | None]:
    """The format rules in one place: float dtypes (a quantized layout raylm reads, where quantized_ok), settings
    raylm's GPT can run. Returns the tensors as a float model sees them, the quantization scheme and the stored
    parts of the quantized matrices (None, None for a float folder)."""
    scheme, parts = None, None
    if is_quantized(config):
        if not quantized_ok:
            raise CheckpointError(
                f"{label}: a quantized folder cannot start training, which needs float weights; dequantize "
                f"it first (`raylm compress {config_folder(label)} OUT --dequantize`) and start from OUT, or "
                f"start from the unquantized export"
            )
        scheme = read_scheme(config, label)
        tensors, parts = _dequantized_view(tensors, scheme)
    stored = {**tensors, **(parts or {})}
    odd = next(((n, t.dtype) for n, t in stored.items() if t.dtype not in _dtypes_of(n, scheme)), None)
    if odd:
        raise CheckpointError(
            f"{label}: tensor {odd[0]} is {odd[1]}, not one of {', '.join(FLOAT_DTYPES)} (a "
            f"quantized folder?); point it at the unquantized export"
        )
    bad = unsupported_settings(config)
    if bad:
        raise CheckpointError(f"{label}: raylm's GPT cannot run a Llama with {', '.join(bad)}; {FIX}")
    return tensors, scheme, parts


def _dtypes_of(name: str, scheme: QuantScheme | None) -> tuple[str, ...]:
    """The dtypes a tensor of this name may have: float, or a quantized part's own."""
    if scheme is None:
        return FLOAT_DTYPES
    return PART_DTYPES.get(name[name.rfind(".") :], FLOAT_DTYPES + (f"Q{scheme.bits}",))


def config_folder(label: str) -> str:
    """The folder a label names ("model.init_from=/x" -> "/x")."""
    return label.split("=", 1)[-1]


def _dequantized_view(
    tensors: dict[str, TensorInfo], scheme: QuantScheme
) -> tuple[dict[str, TensorInfo], dict[str, TensorInfo]]:
    """(the tensors as a float model sees them, the stored parts of its quantized matrices): each W's packed,
    scale and shape tensors become W (dtype Q8/Q4, full shape); a part without the others stays in the view
    under its own name, for check_matches to name."""
    view: dict[str, TensorInfo] = {}
    parts: dict[str, TensorInfo] = {}
    for name, info in tensors.items():
        matrix = weight_name(name)
        if matrix is not None:
            names = stored_names(matrix)
            if all(n in tensors for n in names):
                cols = in_features(info.shape, tensors[names[1]].shape, scheme)
                view[matrix] = TensorInfo(info.file, f"Q{scheme.bits}", (info.shape[0], cols))
                parts.update({n: tensors[n] for n in names})
    view.update({n: info for n, info in tensors.items() if n not in parts})
    return view, parts


class HFWeights:
    """The WeightSource over an opened folder, checked against the model this run builds."""

    def __init__(self, folder: HFFolder, model: ModelConfig, vocab_rows: int):
        self.folder, self.model = folder, model
        self.shapes = param_shapes(model, vocab_rows)
        check_matches(folder, model, self.shapes)
        self._open: dict[Path, object] = {}

    def read(self, name: str, shard: Shard | None = None) -> torch.Tensor:
        """Parameter `name` (raylm's name and layout), or only `shard` of it, as fp32."""
        return self._read(name, shard, self.folder.tensors).float()

    def read_mask(self, name: str, shard: Shard | None = None) -> torch.Tensor | None:
        """The pruning mask of parameter `name` (or `shard` of it; bool, True = kept), None if it has none."""
        return self._read(name, shard, self.folder.masks) if hf_name(name) in self.folder.masks else None

    def _read(self, name: str, shard: Shard | None, tensors: dict[str, TensorInfo]) -> torch.Tensor:
        heads = rotary_heads(name, self.model)
        if shard is not None and heads and shard.dim != 0:
            return shard.of(self._read(name, None, tensors))  # not a split TP uses; exact, only slower
        part = self._slice(hf_name(name), shard, tensors)
        if heads:
            part = half_to_interleaved(part, heads // (shard.count if shard else 1))
        return part

    def _slice(self, key: str, shard: Shard | None, tensors: dict[str, TensorInfo]) -> torch.Tensor:
        info = tensors[key]
        if info.dtype.startswith(
            "Q"
        ):  # a quantized matrix: dequantized whole (eval and generate read it whole)
            full = self._dequantize(key, info)
            return full if shard is None else shard.of(full)
        tensor = self._handle(info.file).get_slice(key)
        if shard is None:
            return tensor[:]
        size = info.shape[shard.dim] // shard.count
        index = [slice(None)] * len(info.shape)
        index[shard.dim] = slice(shard.index * size, (shard.index + 1) * size)
        return tensor[tuple(index)]

    def _dequantize(self, key: str, info: TensorInfo) -> torch.Tensor:
        assert self.folder.parts is not None  # a Q8/Q4 entry exists only in a quantized folder's view
        parts = self.folder.parts
        packed, scale, shape = (self._handle(parts[n].file).get_tensor(n) for n in stored_names(key))
        if shape.tolist() != list(info.shape):
            raise CheckpointError(
                f"{self.folder.label}: {stored_names(key)[2]} is {shape.tolist()} but its packed and scale "
                f"tensors hold {list(info.shape)}; the folder is damaged, compress the export again"
            )
        return dequantize(packed, scale, info.shape[1], int(info.dtype[1:]))

    def _handle(self, file: Path):
        from safetensors import safe_open

        if file not in self._open:
            self._open[file] = safe_open(str(file), framework="pt")  # memory-mapped; nothing read yet
        return self._open[file]


def check_matches(folder: HFFolder, model: ModelConfig, shapes: dict[str, torch.Size]) -> None:
    """CheckpointError naming the first tensor whose shape differs from the model's, else the first setting that
    differs with the shapes alike (fewer layers, heads, RoPE base, norm eps, tying), else a tensor raylm has no
    use for."""
    for name, shape in shapes.items():
        key = hf_name(name)
        have = folder.tensors.get(key)
        if have is None or have.shape != tuple(shape):
            found = "is missing" if have is None else f"has shape {have.shape}"
            raise CheckpointError(
                f"{folder.label}: {key} {found} but the model config needs {tuple(shape)}; "
                f"{_fix_for(folder, model)}"
            )
    differ = differing_settings(folder.config, model)  # the shapes agree, yet the models differ
    if differ:
        key, hf_key, theirs, mine = differ[0]
        raise CheckpointError(
            f"{folder.label}: config.json has {hf_key}={theirs!r} but model.{key}={mine!r}; "
            f"set model.{key}={theirs} to start from this folder"
        )
    odd_mask = next(
        (
            k
            for k, m in folder.masks.items()
            if m.dtype != "BOOL" or k not in folder.tensors or m.shape != folder.tensors[k].shape
        ),
        None,
    )
    if odd_mask:
        raise CheckpointError(
            f"{folder.label}: {MASKS_FILE} holds {odd_mask}, which is not a bool tensor shaped like "
            f"the weight of that name; prune the unpruned export again with `raylm compress`"
        )
    wanted = {hf_name(n) for n in shapes} | ({"lm_head.weight"} if model.tie_embeddings else set())
    extra = sorted(k for k in folder.tensors if k not in wanted and not k.endswith(IGNORED_SUFFIXES))
    if extra:
        raise CheckpointError(
            f"{folder.label}: holds {extra[0]}, which raylm's Llama has no place for "
            f"({len(extra)} such tensors); {FIX}"
        )


def _fix_for(folder: HFFolder, model: ModelConfig) -> str:
    """How to make the model config match the folder: the overrides that differ, or why there are none."""
    overrides = [f"model.{key}={theirs}" for key, _, theirs, _ in differing_settings(folder.config, model)]
    rows = folder.config.get("vocab_size")
    vocab = f"data.vocab_size padded to {rows} rows (a multiple of 128)"
    if overrides:
        return f"set {' '.join(overrides)} (from its config.json) and keep {vocab}"
    return f"the model settings agree with its config.json, so the vocabulary differs: it needs {vocab}"


def open_hf_weights(
    folder: str | Path, model: ModelConfig, vocab_rows: int, label: str | None = None
) -> HFWeights:
    """Open and check a folder for `model` with `vocab_rows` embedding rows: the reader every caller uses."""
    return HFWeights(open_folder(folder, label), model, vocab_rows)
