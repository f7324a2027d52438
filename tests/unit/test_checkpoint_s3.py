"""Runs and checkpoints on object storage against a real S3-speaking server on 127.0.0.1 (moto, reached through
pyarrow as S3 is): the manifest-last commit, resume picking, pruning, --overwrite's reach, exports, the run lock.

The training side (every rank uploading its own files, resume on a multi-node cluster, a storage outage during
an upload) is in tests/ray/test_multinode.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from raylm.checkpoint import list_committed, load_checkpoint_weights, pick_resume, prune, verify_checkpoint
from raylm.checkpoint.commit import new_tmp_dir, upload_own_files
from raylm.checkpoint.export import export, export_folder, load_export
from raylm.checkpoint.writer import save_full_weights, save_torch
from raylm.config import resolve
from raylm.config.derived import padded_vocab
from raylm.errors import CheckpointError, RaylmError
from raylm.model.gpt import init_full_weights
from raylm.storage.location import local_view
from raylm.storage.uri import parse_uri
from raylm.train.run_folder import prepare_run_dir, run_path
from raylm.train.run_lock import hold_run_lock
from tests.s3_server import BUCKET, DUMMY_KEYS, keys, put_object, s3_endpoint, use_endpoint

pytestmark = pytest.mark.unit
__all__ = ["s3_endpoint"]  # the module's S3 server fixture
STEP_30 = "step-00000030"


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    use_endpoint(monkeypatch, s3_endpoint)
    return s3_endpoint


@pytest.fixture
def cfg(tmp_path):
    return resolve(
        {
            "data": {
                "vocab_size": 300,
                "seq_len": 16,
                "out_dir": str(tmp_path / "data"),
                "cache_dir": str(tmp_path / "cache"),
            },
            "model": {"n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 32, "max_seq_len": 16},
        }
    )


@pytest.fixture
def weights(cfg):
    return init_full_weights(cfg.model, padded_vocab(cfg.data.vocab_size), seed=0)


@pytest.fixture
def prefix(s3, tmp_path, cfg, weights):
    """s3://<bucket>/<test>/run/checkpoints with committed checkpoints at steps 10, 20 and 30."""
    root = parse_uri(f"s3://{BUCKET}/{tmp_path.name}/run/checkpoints")
    for step in (10, 20, 30):
        save_full_weights(cfg, weights, root, step)
    return root


def test_commit_writes_every_file_then_the_manifest_and_loads_back(prefix, s3, weights, tmp_path):
    assert [p.name for p in list_committed(prefix)] == ["step-00000030", "step-00000020", "step-00000010"]
    objects = keys(s3, f"{prefix.key}/{STEP_30}/")
    manifest = verify_checkpoint(prefix / STEP_30)  # every object fetched and checked by sha256
    assert {
        f"{prefix.key}/{STEP_30}/{name}": record["bytes"] for name, record in manifest["files"].items()
    }.items() <= objects.items()
    tree, state = load_checkpoint_weights(prefix.parent)  # a run prefix: its newest checkpoint
    assert tree["model"]["n_layer"] == 2 and all(torch.equal(state[k], weights[k]) for k in weights)
    assert not (tmp_path / "s3:").exists()


def test_a_prefix_without_manifest_is_an_upload_never_a_checkpoint_and_prune_removes_it(
    prefix, s3, cfg, weights
):
    tmp = new_tmp_dir(prefix, 40, cfg.data.cache_dir)  # an upload that died before its manifest
    files = save_torch(
        tmp, "model/000-tok_embeddings.pt", {"tok_embeddings.weight": weights["tok_embeddings.weight"]}
    )
    upload_own_files(tmp, prefix, 40, files)
    assert keys(s3, f"{prefix.key}/step-00000040/")
    assert [p.name for p in list_committed(prefix)][0] == STEP_30
    assert pick_resume(prefix, "auto").name == STEP_30
    assert pick_resume(prefix, "required").name == STEP_30  # not a checkpoint, so not a damaged one either
    removed = prune(prefix, keep=2)
    assert sorted(p.name for p in removed) == ["step-00000010", "step-00000040"]
    assert not keys(s3, f"{prefix.key}/step-00000040/") and not keys(s3, f"{prefix.key}/step-00000010/")
    assert [p.name for p in list_committed(prefix)] == [STEP_30, "step-00000020"]


@pytest.mark.parametrize("damage", ["missing", "short"])
def test_a_missing_or_short_object_is_skipped_under_auto_and_refused_under_required(
    prefix, s3, damage, warnings_seen
):
    key = f"{prefix.key}/{STEP_30}/model/002-layers.1.pt"
    from tests.s3_server import client

    if damage == "missing":
        client(s3).delete_object(Bucket=BUCKET, Key=key)
    else:
        put_object(s3, key, b"short")
    assert pick_resume(prefix, "auto").name == "step-00000020"
    warning = " ".join(r.getMessage() for r in warnings_seen.records)
    assert STEP_30 in warning and "model/002-layers.1.pt" in warning
    with pytest.raises(
        CheckpointError,
        match=r"s3://.*/step-00000030/model/002-layers\.1\.pt (is missing|has 5 "
        r"bytes)",
    ):
        pick_resume(prefix, "required")


def test_an_altered_object_fails_its_sha256_and_never_reaches_the_cache(prefix, s3, cfg):
    key = f"{prefix.key}/{STEP_30}/model/001-layers.0.pt"
    data = bytearray(keys_data(s3, key))
    data[len(data) // 2] ^= 0xFF
    put_object(s3, key, bytes(data))
    assert pick_resume(prefix, "required").name == STEP_30  # sizes check out: the loading ranks hash
    with pytest.raises(CheckpointError, match=r"model/001-layers\.0\.pt does not match its sha256"):
        verify_checkpoint(prefix / STEP_30, cache_dir=cfg.data.cache_dir)
    mirror = local_view(prefix / STEP_30, cfg.data.cache_dir)
    assert not (mirror / "model/001-layers.0.pt").exists()
    assert not [p for p in mirror.rglob("*") if p.name.endswith(".part")]


def keys_data(endpoint: str, key: str) -> bytes:
    from tests.s3_server import client

    return client(endpoint).get_object(Bucket=BUCKET, Key=key)["Body"].read()


def test_the_same_step_saved_again_replaces_every_object(prefix, s3, cfg, weights):
    changed = {k: v + 1 for k, v in weights.items()}
    save_full_weights(cfg, changed, prefix, 30, {"note": "second"})
    _, state = load_checkpoint_weights(prefix / STEP_30)
    assert torch.equal(state["norm.weight"], changed["norm.weight"])
    assert json.loads(keys_data(s3, f"{prefix.key}/{STEP_30}/trainer_state.json"))["note"] == "second"


def test_export_to_and_from_object_storage(prefix, s3, weights, tmp_path):
    out = f"s3://{BUCKET}/{tmp_path.name}/exports/e1"
    summary = export(str(prefix.parent), out)
    assert summary["out_dir"] == out and summary["step"] == 30
    assert {"config.json", "model.safetensors", "raylm_config.yaml"} <= {
        k.rpartition("/")[2] for k in keys(s3, f"{tmp_path.name}/exports/e1/")
    }
    _, state = load_export(export_folder(out))
    assert all(torch.equal(state[k], weights[k]) for k in weights)
    assert export_folder(str(prefix.parent)) is None  # a run, not an export


def test_generate_and_eval_read_a_run_prefix_through_the_verified_cache(prefix, weights, tmp_path):
    from raylm.evaluate import open_source
    from raylm.train.generate import load_weights

    tree, state, folder = load_weights(str(prefix.parent))
    assert tree["model"]["n_layer"] == 2 and all(torch.equal(state[k], weights[k]) for k in weights)
    assert folder.is_dir() and not str(folder).startswith("s3:")  # a local folder: the fetched, checked files
    source = open_source(str(prefix.parent))
    assert source.step == 30 and all(torch.equal(source.read_state()[k], weights[k]) for k in weights)


def test_overwrite_deletes_only_raylms_objects_under_that_exact_prefix(s3, tmp_path, cfg, weights):
    runs = f"{tmp_path.name}/runs"
    run_cfg = resolve(
        {}, [f"run.dir=s3://{BUCKET}/{runs}", "run.name=r1", f"data.cache_dir={tmp_path / 'c'}"]
    )
    run = run_path(run_cfg)
    save_full_weights(cfg, weights, run / "checkpoints", 10)
    put_object(s3, f"{runs}/r1/metrics.jsonl", b'{"step": 0}\n')
    put_object(s3, f"{runs}/r1/notes.txt", b"mine")  # not a name raylm writes
    put_object(s3, f"{runs}/r10/metrics.jsonl", b'{"step": 0}\n')  # another run whose name starts alike
    put_object(s3, f"{runs}/r1-metrics.jsonl", b"x")
    with pytest.raises(RaylmError, match="no committed checkpoint|already holds"):
        prepare_run_dir(
            resolve({}, [f"run.dir=s3://{BUCKET}/{runs}", "run.name=r1", "checkpoint.resume=never"]),
            overwrite=False,
        )
    prepare_run_dir(run_cfg, overwrite=True)
    left = keys(s3, f"{runs}/")
    assert (
        f"{runs}/r1/notes.txt" in left
        and f"{runs}/r10/metrics.jsonl" in left
        and f"{runs}/r1-metrics.jsonl" in left
    )
    assert not [k for k in left if k.startswith(f"{runs}/r1/checkpoints/") or k == f"{runs}/r1/metrics.jsonl"]
    assert f"{runs}/r1/config.yaml" in left  # the new run's config


def test_no_credential_reaches_config_or_manifest(prefix, s3, tmp_path):
    texts = [keys_data(s3, key) for key in keys(s3, f"{tmp_path.name}/") if key.endswith((".json", ".yaml"))]
    assert texts
    for secret in (DUMMY_KEYS["AWS_ACCESS_KEY_ID"], DUMMY_KEYS["AWS_SECRET_ACCESS_KEY"]):
        assert not [t for t in texts if secret.encode() in t]


def test_a_run_in_a_bucket_that_does_not_exist_is_one_line(s3, tmp_path):
    from raylm.errors import StorageError

    with pytest.raises(
        StorageError,
        match=r"^bucket no-such-bucket of s3://no-such-bucket/runs/r1 does not exist "
        r"\(endpoint http://127\.0\.0\.1:\d+ from AWS_ENDPOINT_URL\); create it",
    ):
        prepare_run_dir(
            resolve(
                {}, ["run.dir=s3://no-such-bucket/runs", "run.name=r1", f"data.cache_dir={tmp_path / 'c'}"]
            ),
            overwrite=False,
        )


def test_ray_trains_own_storage_error_ends_the_run_in_raylms_words(s3):
    from raylm.train.driver import _root_cause

    ray_text = (
        "When uploading part for key 'r/checkpoint_manager_snapshot.json' in bucket 'raylm-test': AWS Error "
        "NETWORK_CONNECTION during UploadPart operation: curlCode: 7, Could not connect to server"
    )
    line = _root_cause(RuntimeError(ray_text), parse_uri(f"s3://{BUCKET}/runs/r"))
    assert (
        line.startswith(
            f"cannot write the run to s3://{BUCKET}/runs/r: the storage endpoint does not answer "
            "(endpoint http://127.0.0.1:"
        )
        and "from AWS_ENDPOINT_URL" in line
    ), line


def test_the_run_lock_of_a_prefix_is_held_on_this_machine(s3, tmp_path):
    run = parse_uri(f"s3://{BUCKET}/{tmp_path.name}/runs/r1")
    in_use = r"run folder s3://.*/runs/r1 is in use by another raylm run"
    held = str(tmp_path / "c")
    with hold_run_lock(run, held), pytest.raises(RaylmError, match=in_use), hold_run_lock(run, held):
        pass
