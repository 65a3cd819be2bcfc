"""`make cluster`'s topology: the same pools as the topology file, replicas on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway import manifests
from gateway.cluster import LOCAL_REPLICAS, LocalCluster, local_topology
from gateway.config import Topology
from serving.launcher import LaunchOptions, TritonLauncher


def test_local_topology_keeps_the_pools_and_lists_every_replica() -> None:
    source = yaml.safe_load(manifests.TOPOLOGY.read_text())
    port = iter(range(20000, 20100))
    replicas = {
        raw["name"]: [
            TritonLauncher(
                LaunchOptions(
                    models=raw["models"],
                    http_port=next(port),
                    grpc_port=next(port),
                    metrics_port=next(port),
                    health_port=next(port),
                )
            )
            for _ in range(LOCAL_REPLICAS.get(raw["name"], 1))
        ]
        for raw in source["pools"]
    }
    local = Topology.from_dict(local_topology(source, replicas))
    reference = Topology.load(manifests.TOPOLOGY)
    assert [p.name for p in local.pools] == [p.name for p in reference.pools]
    for pool, ref in zip(local.pools, reference.pools, strict=True):
        assert (pool.models, pool.strategy, pool.max_in_flight) == (
            ref.models,
            ref.strategy,
            ref.max_in_flight,
        )
        assert pool.dns is None
        launchers = replicas[pool.name]
        assert [r.url for r in pool.replicas] == [
            f"127.0.0.1:{x.options.grpc_port}" for x in launchers
        ]
        assert [r.health_url for r in pool.replicas] == [x.health_url for x in launchers]
    assert len(local.pool("small").replicas) == 2


def test_a_subset_of_pools_leaves_the_others_out_and_unknown_pools_are_refused(
    tmp_path: Path,
) -> None:
    source = yaml.safe_load(manifests.TOPOLOGY.read_text())
    launcher = TritonLauncher(LaunchOptions(models=["llm_small"], grpc_port=20001))
    local = Topology.from_dict(local_topology(source, {"small": [launcher, launcher]}))
    assert [p.name for p in local.pools] == ["small"]
    with pytest.raises(ValueError, match="unknown pool"):
        LocalCluster(pools=["front", "tiny"], workdir=tmp_path)
    cluster = LocalCluster(pools=["small", "front"], workdir=tmp_path)
    assert cluster.pool_names == ["front", "small"]  # the topology file's order
    assert cluster.params["llm_small"]["torch_threads"] == "1"
