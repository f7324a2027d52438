"""A multi-node Ray cluster on one machine, run as its own process for tests/ray/test_multinode.py.

Starts `ray.cluster_utils.Cluster`: a head with no CPUs (it hosts the drivers and Ray Train's controller, never a
worker) and one raylet per name given, each with its own CPUs and a custom resource named after it. It prints one
JSON line {"address", "nodes": {name: node_id}} and then obeys stdin lines, answering each with the nodes:
`remove NAME` (every process of that node SIGKILLed: a lost machine), `add NAME` (a fresh node). EOF shuts all down.
"""

from __future__ import annotations

import json
import sys

CPUS_PER_NODE = 2
# The head's GCS declares a killed raylet dead after period x threshold (defaults: 3 s x 5) when it goes silent.
HEAD_SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}


def add(cluster, nodes: dict, name: str) -> None:
    nodes[name] = cluster.add_node(num_cpus=CPUS_PER_NODE, resources={name: 1})


def remove(cluster, nodes: dict, name: str) -> None:
    cluster.remove_node(nodes.pop(name), allow_graceful=False)


def announce(cluster, nodes: dict) -> None:
    print(
        json.dumps({"address": cluster.address, "nodes": {n: node.node_id for n, node in nodes.items()}}),
        flush=True,
    )


def main(names: list[str]) -> None:
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": HEAD_SYSTEM_CONFIG}
    )
    nodes: dict = {}
    try:
        for name in names:
            add(cluster, nodes, name)
        announce(cluster, nodes)
        for line in sys.stdin:
            verb, name = line.split()
            {"add": add, "remove": remove}[verb](cluster, nodes, name)
            announce(cluster, nodes)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
