"""A shard corrupted under a running config fails the run at once with exit 3 naming the file: a data error is
not retried (fault.max_failures stays for faults a restart can fix)."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from raylm.errors import RaylmError
from raylm.train.driver import train


def test_corrupt_shard_fails_at_once_naming_the_file(ray_cluster, small_config, prepared, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    shard = data / next(
        e["file"] for e in json.loads((data / "manifest.json").read_text())["shards"] if e["split"] == "train"
    )
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # same size: only the sha256 check can tell
    shard.write_bytes(bytes(blob))
    cfg = small_config("corrupt", f"data.out_dir={data}", "fault.max_failures=3")
    start = time.monotonic()
    with pytest.raises(RaylmError) as failed:
        train(cfg)
    assert failed.value.exit_code == 3, str(failed.value)
    assert str(failed.value).startswith("training failed: shard ") and shard.name in str(failed.value)
    assert "sha256" in str(failed.value) and "\n" not in str(failed.value)
    assert time.monotonic() - start < 120
    assert_no_train_controller_left()


def assert_no_train_controller_left(timeout_s: float = 30.0) -> None:
    """A finished run's TrainController goes with it (the driver's signal handlers held its handle, once)."""
    from ray.util.state import list_actors

    deadline = time.monotonic() + timeout_s
    while True:
        alive = [a.class_name for a in list_actors(filters=[("state", "=", "ALIVE")])]
        if "TrainController" not in alive or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert "TrainController" not in alive, alive
