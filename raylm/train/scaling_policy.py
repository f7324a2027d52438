"""How an elastic raylm run's worker group is sized: whole DP replicas only, and a checkpoint before each resize.

Ray Train's ElasticScalingPolicy sizes the group to what the cluster fits, any count from min to max workers.
raylm's engine needs whole DP replicas of pp * cp * tp workers, each TP group on one node, so this policy counts per
node only whole TP groups and rounds the total down to a multiple of pp * cp * tp: every group Ray starts holds whole
replicas, and no rank is left outside one. It asks the cluster afresh (the autoscaling coordinator otherwise
refreshes its view every 20 s, which would keep a dead node in the count: docs/ray-facts.md 7), and it resizes
a healthy group only after the group committed a checkpoint for it (the handshake in raylm.train.elastic).

Ray Train v2 has no public scaling-policy API: this subclasses an internal of the pinned Ray version
(`ElasticScalingPolicy`), overrides its `_count_possible_workers` and `_get_reserved_resources` and reads only
the attributes a call to the coordinator needs (docs/private-apis.md); tests/unit/test_private_api_canary.py
fails if an upgrade moves any of them.
"""

from __future__ import annotations

import time

import ray
from ray.train.v2._internal.execution.scaling_policy import (
    AUTOSCALING_REQUESTS_GET_TIMEOUT_S,
    NoopDecision,
    ResizeDecision,
    ScalingDecision,
)
from ray.train.v2._internal.execution.scaling_policy.elastic import ElasticScalingPolicy

from raylm.log import get_logger
from raylm.train.elastic import ResizeChannel

WAIT_PAUSE_S = 0.2


def node_death_s() -> float:
    """Seconds until the GCS declares a silent node dead (its health-check period times the misses it allows),
    plus a margin for the news to reach the coordinator."""
    try:
        return (
            ray._config.health_check_period_ms() * ray._config.health_check_failure_threshold() / 1000 + 2.0
        )
    except AttributeError:  # a Ray without these settings: its defaults (3 s x 5)
        return 17.0


def may_still_lose_a_node(
    possible: int, failed_workers: int, failed_for_s: float | None, node_death_s: float
) -> bool:
    """True while a restart should wait: the group of `failed_workers` failed `failed_for_s` seconds ago (None: no
    failure), the cluster still counts room for all of them, and Ray may not yet have declared a lost node dead."""
    return failed_for_s is not None and possible >= failed_workers and failed_for_s < node_death_s


def whole_replicas(workers_per_node: list[int], tp: int, replica_workers: int, max_workers: int) -> int:
    """Workers the nodes can hold as whole DP replicas: whole TP groups per node, rounded down to replicas."""
    fits = sum(count // tp * tp for count in workers_per_node)
    return min(fits, max_workers) // replica_workers * replica_workers


class WholeReplicaScalingPolicy(ElasticScalingPolicy):
    """Ray's elastic policy, sized in whole DP replicas, that resizes a running group only after a checkpoint."""

    def __init__(self, scaling_config, tp: int, replica_workers: int, channel: str):
        super().__init__(scaling_config)
        self.tp, self.replica_workers = tp, replica_workers
        self.channel = ResizeChannel(channel)
        self.asked = (
            0  # the request number the running group was last asked to checkpoint for (0 = none pending)
        )
        self.requests = 0
        self.group_workers = 0  # the size of the newest group started (0 before the first)
        self.failed_at: float | None = (
            None  # when the newest group was found not running (None while it runs)
        )
        self.reserved = None  # the coordinator's latest answer (None: none yet, or it failed)
        self.reserved_at = float("-inf")  # when it was asked

    def _count_possible_workers(self, reserved_resources) -> int:
        per_worker = {k: v for k, v in self.scaling_config._resources_per_worker_not_none.items() if v > 0}
        if not per_worker:  # workers that need nothing fit anywhere, as in Ray's policy
            return self.scaling_config.max_workers
        counts = [
            int(min(node.get(name, 0.0) // need for name, need in per_worker.items()))
            for node in reserved_resources.values()
        ]
        return whole_replicas(counts, self.tp, self.replica_workers, self.scaling_config.max_workers)

    def _get_reserved_resources(self):
        """The coordinator's reservation recomputed against the live nodes (a node known dead no longer counts),
        at most once per GET_RESERVED_RESOURCES_INTERVAL_S as in Ray's policy."""
        if time.monotonic() - self.reserved_at < self.GET_RESERVED_RESOURCES_INTERVAL_S:
            return self.reserved
        try:
            self.reserved = ray.get(
                self._autoscaling_coordinator.get_reserved_resources.remote(
                    self._requester_id, recompute=True
                ),
                timeout=AUTOSCALING_REQUESTS_GET_TIMEOUT_S,
            )
        except Exception as exc:  # as Ray's policy: no answer means no resize now
            get_logger().warning("could not read the cluster's resources for a resize decision: %s", exc)
            self.reserved = None
        self.reserved_at = time.monotonic()
        return self.reserved

    def make_decision_for_non_running_worker_group(self) -> ScalingDecision:
        """Start (or restart) the group at the most whole replicas that fit. After a failure, a count as large as
        the failed group's waits until Ray could have declared a lost node dead (its workers may die before the
        GCS misses the node's heartbeats), so the group restarts at the size that really fits at once."""
        self.asked = 0
        self.channel.clear()  # a group that starts now owes no answer to an earlier request
        if self.group_workers and self.failed_at is None:
            self.failed_at = time.monotonic()
        reserved = self._get_reserved_resources()
        if reserved is not None and self._settling(self._count_possible_workers(reserved)):
            self._maybe_send_resource_request()
            decision: ScalingDecision = NoopDecision()
        else:
            decision = super().make_decision_for_non_running_worker_group()
        if isinstance(decision, ResizeDecision):
            self.group_workers, self.failed_at = decision.num_workers, None
        else:
            time.sleep(WAIT_PAUSE_S)  # the controller asks again at once: do not spin its event loop
        return decision

    def _settling(self, possible: int) -> bool:
        since = None if self.failed_at is None else time.monotonic() - self.failed_at
        return may_still_lose_a_node(possible, self.group_workers, since, node_death_s())

    def make_decision_for_running_worker_group(
        self, worker_group_state, worker_group_status
    ) -> ScalingDecision:
        if self.asked:
            return self._answer(worker_group_state.num_workers)
        decision = super().make_decision_for_running_worker_group(worker_group_state, worker_group_status)
        if isinstance(decision, ResizeDecision):
            self.requests += 1
            self.asked = self.requests
            self.channel.write("request", self.asked)
            get_logger().info(
                "room for %d workers (now %d): asking the group to commit a checkpoint first",
                decision.num_workers,
                worker_group_state.num_workers,
            )
            return NoopDecision()
        return decision

    def _answer(self, current_workers: int) -> ScalingDecision:
        """Once the group has committed its checkpoint: resize if another size still fits, else let it go on."""
        if self.channel.read("ready") < self.asked:
            return NoopDecision()
        reserved = self._get_reserved_resources()
        target = self._count_possible_workers(reserved) if reserved is not None else current_workers
        if target != current_workers and target >= self.scaling_config.min_workers:
            self.asked, self.group_workers = 0, target
            self.channel.clear()
            get_logger().info("resizing the worker group from %d to %d workers", current_workers, target)
            return self._get_resize_decision(target)
        self.channel.write("release", self.asked)
        self.asked = 0
        return NoopDecision()

    async def before_controller_shutdown(self):
        self.channel.clear()
        await super().before_controller_shutdown()

    def before_controller_abort(self):
        self.channel.clear()
        super().before_controller_abort()
