"""raylm.train.kv without Ray (its actor's map, rank0_decides outside a process group) and config's Layout."""

import pytest

from raylm.config import resolve
from raylm.config.layout import Layout
from raylm.errors import ConfigError
from raylm.train.kv import KVStore, rank0_decides


def test_the_store_puts_takes_and_clears_by_prefix():
    store = KVStore()
    assert store.get("a/request") is None
    assert store.put("a/request", "1") and store.get("a/request") == "1"
    assert not store.put("a/request", "2", overwrite=False) and store.get("a/request") == "1"
    store.put("a/ready", "1")
    store.put("b/request", "3")
    assert store.take("a/ready") == "1" and store.get("a/ready") is None and store.take("a/ready") is None
    store.delete_prefix("a/")
    assert store.items == {"b/request": "3"}


def test_without_a_process_group_each_rank_keeps_its_own_answer():
    assert rank0_decides(0, lambda: 7, default=0) == 7
    assert rank0_decides(1, lambda: pytest.fail("only rank 0 decides"), default=0) == 0
    assert rank0_decides(0, lambda: "stop", default=None) == "stop"


def test_the_layout_owns_the_degrees_arithmetic():
    layout = Layout.of(resolve({}, ["parallel.pp=2", "parallel.dp=[1, 3]", "train.global_batch=24"]).parallel)
    assert (layout.world_size, layout.replica_size, layout.elastic) == (6, 2, True)  # dp starts at dp_max
    assert list(layout.dp_sizes()) == [1, 2, 3] and layout.worker_range() == (2, 6)
    assert layout.batch_quantum(micro_batch=2) == 12 and layout.dp_of_group(4) == 2
    with pytest.raises(ConfigError, match=r"5 workers is not a whole number of DP replicas of pp \* tp = 2"):
        layout.dp_of_group(5)
    with pytest.raises(ConfigError, match=r"= 2 ranks, but 3 were started"):
        Layout(pp=2, tp=1, dp=1).check_started(3)
