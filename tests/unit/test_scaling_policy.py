"""WholeReplicaScalingPolicy's reservation cache: the coordinator is asked at most once per interval."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from ray.train import ScalingConfig

from raylm.log import get_logger
from raylm.train import scaling_policy
from raylm.train.scaling_policy import WholeReplicaScalingPolicy


class Coordinator:
    """A stand-in for Ray's autoscaling coordinator actor: counts the asks, answers or fails."""

    def __init__(self, answers: list):
        self.answers, self.asks = answers, []
        self.get_reserved_resources = SimpleNamespace(remote=self.ask)

    def ask(self, requester_id, recompute=False):
        self.asks.append((requester_id, recompute))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def policy_over(monkeypatch, coordinator: Coordinator) -> WholeReplicaScalingPolicy:
    scaling = ScalingConfig(num_workers=(2, 4))
    policy = WholeReplicaScalingPolicy(scaling, tp=1, replica_workers=2, channel="c")
    policy._requester_id = "train-run"
    policy._coordinator_client = SimpleNamespace(_autoscaling_coordinator=coordinator)
    monkeypatch.setattr(scaling_policy.ray, "get", lambda value, timeout=None: value)
    return policy


def test_reserved_resources_are_recomputed_at_most_once_per_interval(monkeypatch):
    nodes = {"node-a": {"CPU": 4.0}}
    coordinator = Coordinator([nodes, {"node-a": {"CPU": 2.0}}])
    policy = policy_over(monkeypatch, coordinator)
    clock = [100.0]
    monkeypatch.setattr(scaling_policy.time, "monotonic", lambda: clock[0])
    assert policy._get_reserved_resources() == nodes
    clock[0] += policy.GET_RESERVED_RESOURCES_INTERVAL_S / 2
    assert policy._get_reserved_resources() == nodes  # the cached answer
    clock[0] += policy.GET_RESERVED_RESOURCES_INTERVAL_S
    assert policy._get_reserved_resources() == {"node-a": {"CPU": 2.0}}
    assert coordinator.asks == [("train-run", True), ("train-run", True)]


def test_a_failed_ask_means_no_resize_now_and_says_why(monkeypatch, caplog):
    coordinator = Coordinator([TimeoutError("coordinator busy")])
    policy = policy_over(monkeypatch, coordinator)
    monkeypatch.setattr(get_logger(), "propagate", True)  # to caplog's handler on the root logger
    with caplog.at_level(logging.WARNING):
        assert policy._get_reserved_resources() is None
    assert "could not read the cluster's resources for a resize decision: coordinator busy" in caplog.text
