"""The checkpoint folder protocol on one process: commit, verify before unpickling, resume picking, pruning."""

from __future__ import annotations

import json
import os
import random
import sys
import threading

import pytest
import torch

from raylm.checkpoint import (
    capture_rng,
    list_checkpoints,
    list_committed,
    load_checkpoint_weights,
    pick_resume,
    prune,
    resolve_checkpoint,
    restore_rng,
    resume_candidates,
    step_dir_name,
    verify_checkpoint,
)
from raylm.checkpoint.background import set_nice
from raylm.checkpoint.commit import new_tmp_dir
from raylm.checkpoint.host_copies import HostCopies
from raylm.checkpoint.names import layer_file
from raylm.checkpoint.writer import save_full_weights
from raylm.config import resolve
from raylm.config.derived import padded_vocab
from raylm.errors import CheckpointError, RaylmError
from raylm.model.facts import layer_index
from raylm.model.gpt import init_full_weights, param_shapes


@pytest.fixture
def cfg(tmp_path):
    return resolve(
        {
            "data": {"vocab_size": 300, "seq_len": 16, "out_dir": str(tmp_path / "data")},
            "model": {"n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 32, "max_seq_len": 16},
        }
    )


@pytest.fixture
def weights(cfg):
    return init_full_weights(cfg.model, padded_vocab(cfg.data.vocab_size), seed=0)


@pytest.fixture
def ckpt_dir(tmp_path, cfg, weights):
    """Committed checkpoints at steps 10, 20 and 30."""
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        save_full_weights(cfg, weights, root, step)
    return root


def test_commit_layout_and_manifest(ckpt_dir, cfg, weights):
    newest = ckpt_dir / step_dir_name(30)
    assert [p.name for p in list_committed(ckpt_dir)] == ["step-00000030", "step-00000020", "step-00000010"]
    manifest = verify_checkpoint(newest)
    assert manifest["step"] == 30 and manifest["optimizer"] is False and manifest["padded_vocab"] == 384
    assert "model/000-tok_embeddings.pt" in manifest["files"] and "model/003-norm.pt" in manifest["files"]
    record = manifest["files"]["model/001-layers.0.pt"]
    assert (
        record["bytes"] == (newest / "model/001-layers.0.pt").stat().st_size and len(record["sha256"]) == 64
    )
    tree, state = load_checkpoint_weights(ckpt_dir.parent)  # a run folder: its newest checkpoint
    assert tree["model"]["n_layer"] == 2
    assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in weights)


def test_tmp_folders_never_count(ckpt_dir):
    interrupted = new_tmp_dir(ckpt_dir, 40)  # a save that died before its rename
    (interrupted / "model").mkdir()
    (interrupted / "model" / "000-tok_embeddings.pt").write_bytes(b"partial")
    assert step_dir_name(40) not in [p.name for p in list_checkpoints(ckpt_dir)]
    assert pick_resume(ckpt_dir, "auto").name == step_dir_name(30)
    assert resolve_checkpoint(ckpt_dir).name == step_dir_name(30)


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-7])


def _alter(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    path.write_bytes(bytes(data))


DAMAGE = {"truncated": _truncate, "altered": _alter, "missing": lambda p: p.unlink()}
TARGETS = ["model/002-layers.1.pt", "config.yaml", "manifest.json"]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_auto_falls_back_and_required_names_the_file(ckpt_dir, warnings_seen, monkeypatch, damage, target):
    newest = ckpt_dir / step_dir_name(30)
    DAMAGE[damage](newest / target)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("unpickled before verification"))
    assert pick_resume(ckpt_dir, "auto") == ckpt_dir / step_dir_name(20)
    warning = " ".join(r.getMessage() for r in warnings_seen.records)
    assert "step-00000030" in warning and target in warning
    with pytest.raises(CheckpointError, match=target.replace(".", r"\.")):
        pick_resume(ckpt_dir, "required")


def test_picking_reads_no_file_an_altered_one_is_found_by_the_loading_ranks(ckpt_dir, monkeypatch):
    """Resume picking checks manifests and sizes only: the sha256 of each file is checked by the ranks that read
    it (tests/distributed/test_checkpoint.py: a bad file under auto falls back to the older checkpoint)."""
    _alter(ckpt_dir / step_dir_name(30) / "model/002-layers.1.pt")
    monkeypatch.setattr(
        "raylm.checkpoint.manifest.file_record", lambda *a: pytest.fail("hashed while picking")
    )
    assert resume_candidates(ckpt_dir, "auto")[:2] == [
        ckpt_dir / step_dir_name(30),
        ckpt_dir / step_dir_name(20),
    ]
    assert pick_resume(ckpt_dir, "required") == ckpt_dir / step_dir_name(30)


def test_bad_model_file_fails_before_any_unpickling(ckpt_dir, monkeypatch):
    _alter(ckpt_dir / step_dir_name(30) / "model/001-layers.0.pt")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("unpickled before verification"))
    with pytest.raises(CheckpointError, match=r"model/001-layers\.0\.pt.*sha256"):
        load_checkpoint_weights(ckpt_dir / step_dir_name(30))


def test_policies_without_checkpoints(tmp_path, ckpt_dir):
    empty = tmp_path / "empty"
    assert pick_resume(empty, "auto") is None
    assert pick_resume(ckpt_dir, "never") is None
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        pick_resume(empty, "required")
    with pytest.raises(RaylmError, match="checkpoint.resume"):
        pick_resume(ckpt_dir, "sometimes")
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        resolve_checkpoint(empty)


def test_every_checkpoint_bad_under_auto_is_an_error_that_deletes_nothing(ckpt_dir, warnings_seen):
    """Starting over silently would lose the run's place, and the fresh run's pruning would delete them."""
    before = sorted(p.name for p in ckpt_dir.iterdir())
    for folder in list_committed(ckpt_dir):
        _truncate(folder / "config.yaml")
    with pytest.raises(
        CheckpointError,
        match=r"every checkpoint in .* is damaged \(step-00000030, step-00000020, "
        r"step-00000010; .*nothing was deleted",
    ):
        pick_resume(ckpt_dir, "auto")
    assert len(warnings_seen.records) == 3  # each bad file named once
    assert sorted(p.name for p in ckpt_dir.iterdir()) == before


def test_prune_keeps_newest_protected_and_removes_tmp(ckpt_dir, cfg, weights):
    save_full_weights(cfg, weights, ckpt_dir, 40)
    stale = new_tmp_dir(ckpt_dir, 50)
    removed = prune(ckpt_dir, keep=2, protect=ckpt_dir / step_dir_name(10))
    assert sorted(p.name for p in removed) == sorted([step_dir_name(20), stale.name])
    assert [p.name for p in list_committed(ckpt_dir)] == ["step-00000040", "step-00000030", "step-00000010"]
    assert not stale.exists()
    prune(ckpt_dir, keep=1)
    assert [p.name for p in list_committed(ckpt_dir)] == ["step-00000040"]


def test_prune_counts_only_committed(ckpt_dir):
    (ckpt_dir / step_dir_name(30) / "manifest.json").unlink()  # no longer committed: neither kept nor counted
    prune(ckpt_dir, keep=2)
    assert [p.name for p in list_committed(ckpt_dir)] == ["step-00000020", "step-00000010"]


def test_same_step_is_replaced(ckpt_dir, cfg, weights):
    changed = {k: v + 1 for k, v in weights.items()}
    save_full_weights(cfg, changed, ckpt_dir, 30, {"note": "second"})
    folder = ckpt_dir / step_dir_name(30)
    assert json.loads((folder / "trainer_state.json").read_text())["note"] == "second"
    _, state = load_checkpoint_weights(folder)
    assert torch.equal(state["norm.weight"], changed["norm.weight"])
    assert not [p for p in ckpt_dir.iterdir() if p.name.startswith("tmp-")]


def test_tokenizer_is_copied_when_the_run_has_one(tmp_path, cfg, weights):
    data = tmp_path / "data"
    data.mkdir()
    (data / "tokenizer.json").write_text('{"model": {}}')
    folder = save_full_weights(cfg, weights, tmp_path / "ck", 1)
    assert "tokenizer.json" in verify_checkpoint(folder)["files"]


def test_layer_files_follow_the_pipeline_layer_order(cfg):
    from raylm.parallel.pipeline import layer_specs
    from raylm.parallel.tensor import TPGroup

    names = list(param_shapes(cfg.model, 384))
    specs = layer_specs(cfg.model, 384, TPGroup(None, 0, 1))
    prefixes = [
        spec.typename.name_prefix if hasattr(spec.typename, "name_prefix") else None for spec in specs
    ]
    for name in names:  # layer_index points at the spec whose layer holds the parameter (blocks: any block)
        prefix = prefixes[layer_index(name, cfg.model.n_layer)]
        assert name.startswith(prefix or "layers."), (name, prefix)
    assert layer_file("layers.1.feed_forward.w2.weight", 2) == "002-layers.1.pt"
    files = [layer_file(n, 2) for n in names]
    assert files == sorted(files)  # parameter order = file order, which export's streaming relies on


def test_rng_state_round_trip(tmp_path):
    state = capture_rng()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random())
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_host_copies_reuse_their_buffers_until_a_shape_changes():
    host, weight = HostCopies(), torch.randn(3, 4)
    first = host.copy("w", weight)
    weight.add_(1.0)  # the next optimizer step
    second = host.copy("w", weight)
    assert second.data_ptr() == first.data_ptr() != weight.data_ptr() and torch.equal(second, weight)
    assert host.copy("w", torch.ones(5, dtype=torch.float16)).dtype == torch.float32
    assert host.nbytes() == 5 * 4


@pytest.mark.skipif(sys.platform != "linux", reason="nice is per thread on Linux only")
def test_set_nice_lowers_only_the_calling_thread():
    seen = []

    def writer():
        set_nice(19)
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    thread = threading.Thread(target=writer)
    thread.start()
    thread.join()
    assert seen == [19] and os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == 0
