"""Guards on how raylm reads files: every torch.load is weights_only and comes after the file's hash check; no
pickle, no unsafe YAML, never DeepSpeed's own checkpoint loader."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from raylm.checkpoint import list_committed
from raylm.checkpoint.reader import iter_model_layers
from raylm.checkpoint.writer import save_full_weights
from raylm.config import resolve
from raylm.config.derived import padded_vocab
from raylm.errors import CheckpointError
from raylm.model.gpt import init_full_weights
from tests.conftest import REPO_ROOT

SOURCES = sorted((REPO_ROOT / "raylm").rglob("*.py"))
# Every function that unpickles, and what checks the file's sha256 against its manifest before it runs.
# Loaders that can build arbitrary objects (PyYAML's non-safe ones), and eval/exec; spelled from parts so that
# a plain text search for unsafe loads finds real call sites, not this list of what is forbidden.
FORBIDDEN_CALLS = {f"yaml.{kind}" for kind in ("load", "unsafe_load", "full_load")} | {"eval", "exec"}
TORCH_LOAD_SITES = {
    "raylm/checkpoint/state.py:_load_tensors": "verify_for_load: each rank hashes the files it reads first",
    "raylm/checkpoint/reader.py:iter_model_layers": "verify_checkpoint over every model file before the first load",
}


def calls(tree: ast.AST):
    """(enclosing function name, call node) for every call in a module."""
    for func in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
        for node in ast.walk(func):
            if isinstance(node, ast.Call):
                yield func.name, node


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def test_every_torch_load_is_weights_only_and_at_a_known_verified_site():
    sites = set()
    for path in SOURCES:
        for function, call in calls(ast.parse(path.read_text())):
            if dotted(call.func) == "torch.load":
                weights_only = [k for k in call.keywords if k.arg == "weights_only"]
                assert weights_only and getattr(weights_only[0].value, "value", None) is True, (
                    f"{path}:{call.lineno}"
                )
                sites.add(f"{path.relative_to(REPO_ROOT)}:{function}")
    assert sites == set(TORCH_LOAD_SITES), (
        "a new torch.load needs a hash check before it; add it to the table"
    )


def test_no_pickle_no_unsafe_yaml_no_deepspeed_checkpoint_loader():
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        imported = {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for alias in node.names
        } | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & {"pickle", "cPickle", "dill", "marshal", "shelve"}, path
        for _, call in calls(tree):
            name = dotted(call.func)
            assert name not in FORBIDDEN_CALLS, (path, name)
            # raylm's own load_checkpoint is a plain function; a method call would be DeepSpeed's engine loader
            assert not (isinstance(call.func, ast.Attribute) and call.func.attr == "load_checkpoint"), path


def test_an_altered_model_file_is_refused_before_anything_is_unpickled(tmp_path, monkeypatch):
    cfg = resolve(
        {
            "data": {"vocab_size": 300, "seq_len": 16, "out_dir": str(tmp_path / "data")},
            "model": {"n_layer": 1, "n_head": 2, "d_model": 32, "max_seq_len": 16},
        }
    )
    weights = init_full_weights(cfg.model, padded_vocab(cfg.data.vocab_size), seed=0)
    folder = save_full_weights(cfg, weights, tmp_path / "checkpoints", 1)
    victim = next(Path(folder).glob("model/*.pt"))
    blob = bytearray(victim.read_bytes())
    blob[-5] ^= 0xFF  # same size: only the hash can tell
    victim.write_bytes(bytes(blob))

    def never(*args, **kwargs):
        raise AssertionError("torch.load ran before the hash check")

    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(CheckpointError, match=f"{victim.name} does not match its sha256"):
        next(iter_model_layers(list_committed(tmp_path / "checkpoints")[0]))
