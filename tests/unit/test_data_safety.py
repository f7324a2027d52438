"""Nothing raylm deletes or reads may lie outside the folder the user named: names, links and manifest keys."""

from __future__ import annotations

import json

import pytest

from raylm.checkpoint.manifest import read_checkpoint_manifest
from raylm.config import resolve
from raylm.data.shards import read_data_manifest
from raylm.errors import CheckpointError, ConfigError, DataError, RaylmError
from raylm.safe_paths import is_inside_name
from raylm.train.run_folder import prepare_run_dir
from raylm.tune.sweep import _prepare_sweep_dir


@pytest.mark.parametrize("name", ["", ".", "..", "/tmp/x", "a/b", "../up", "a\\b", " "])
def test_tune_name_must_be_one_folder_name(name):
    with pytest.raises(ConfigError, match=r"tune.name=.* must be one folder name .* e.g. tune.name=lr-sweep"):
        resolve({}, [f"tune.name={json.dumps(name)}"])


def test_sweep_overwrite_stays_inside_run_dir(tmp_path):
    """tune.name='' used to make --overwrite delete run.dir itself; now the config is refused first."""
    keep = tmp_path / "runs" / "other-run" / "metrics.jsonl"
    keep.parent.mkdir(parents=True)
    keep.write_text("{}\n")
    with pytest.raises(ConfigError):
        resolve({}, [f"run.dir={tmp_path / 'runs'}", "tune.name=''"])
    cfg = resolve({}, [f"run.dir={tmp_path / 'runs'}", "tune.name=s1"])
    (tmp_path / "runs" / "s1").mkdir()
    (tmp_path / "runs" / "s1" / "old").write_text("x")
    with pytest.raises(RaylmError, match="already exists; pass --overwrite"):
        _prepare_sweep_dir(cfg, overwrite=False)
    assert _prepare_sweep_dir(cfg, overwrite=True) == tmp_path / "runs" / "s1"
    assert not (tmp_path / "runs" / "s1" / "old").exists() and keep.exists()


def test_overwrite_never_deletes_through_a_symlinked_run_folder(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "metrics.jsonl").write_text('{"step": 0}\n')
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "r1").symlink_to(target)
    cfg = resolve({}, [f"run.dir={runs}", "run.name=r1"])
    with pytest.raises(
        RaylmError,
        match=f"run folder {runs / 'r1'} is a symbolic link to {target}; --overwrite "
        f"never deletes through a link",
    ):
        prepare_run_dir(cfg, overwrite=True)
    assert (target / "metrics.jsonl").read_text() == '{"step": 0}\n' and (runs / "r1").is_symlink()


def test_overwrite_never_deletes_through_a_symlinked_sweep_folder(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "keep").write_text("x")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "s1").symlink_to(target)
    cfg = resolve({}, [f"run.dir={tmp_path / 'runs'}", "tune.name=s1"])
    with pytest.raises(RaylmError, match="is a symbolic link to"):
        _prepare_sweep_dir(cfg, overwrite=True)
    assert (target / "keep").exists()


@pytest.mark.parametrize(
    "key,ok",
    [
        ("model/001-layers.0.pt", True),
        ("trainer_state.json", True),
        ("../x", False),
        ("/etc/passwd", False),
        ("a/../../b", False),
        ("", False),
        ("a//b", False),
        ("./a", False),
        ("a\\..\\b", False),
        (7, False),
    ],
)
def test_manifest_keys_must_stay_inside(key, ok):
    assert is_inside_name(key) is ok


def test_checkpoint_manifest_with_an_outside_key_is_refused_before_reading(tmp_path):
    secret = tmp_path / "secret.pt"
    secret.write_bytes(b"not yours")
    folder = tmp_path / "step-00000001"
    folder.mkdir()
    manifest = {
        "format": "raylm-checkpoint/1",
        "step": 1,
        "files": {"../secret.pt": {"bytes": 9, "sha256": "0"}},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"lists '../secret.pt', a path outside the checkpoint folder"):
        read_checkpoint_manifest(folder)


def test_shard_manifest_with_an_outside_file_is_refused(tmp_path):
    manifest = {"format": "raylm-shards/1", "shards": [{"file": "/etc/passwd", "bytes": 1}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="lists a shard file outside"):
        read_data_manifest(tmp_path)
