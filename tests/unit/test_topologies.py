"""The two topologies are described once, and the compose files follow that description.

`single`: one Triton with every model (compose.cpu.yaml, compose.h100.yaml's `triton`), the
gateway's built-in topology. `pools`: docker/k8s/base/topology.yaml, which the gateway
reads on Kubernetes (tests/unit/test_kubernetes.py) and in docker/compose.pools.yaml.
"""

from __future__ import annotations

import re

import pytest
import yaml

from gateway import manifests
from gateway.config import Topology
from serving.launcher import LaunchOptions

DOCKER = manifests.REPO_ROOT / "docker"
TOPOLOGY = Topology.load(manifests.TOPOLOGY)
DEFAULTS = LaunchOptions()


def compose(name: str) -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


def health_url(service: dict) -> str:
    (url,) = re.findall(r"http://[^']+", service["healthcheck"]["test"][-1])
    return url


def test_compose_pools_follow_the_topology_file() -> None:
    services = compose("compose.pools.yaml")["services"]
    for pool in TOPOLOGY.pools:
        assert pool.dns is not None
        service = services[pool.dns.name]  # Docker's DNS name == the headless Service's
        args = service["command"]
        assert args[args.index("--models") + 1].split(",") == list(pool.models)
        assert "--grpc-port" not in args and pool.dns.port == DEFAULTS.grpc_port
        assert health_url(service) == f"http://127.0.0.1:{pool.dns.health_port}/health/ready"
        assert pool.dns.health_port == DEFAULTS.health_port
    assert max(s["deploy"]["replicas"] for s in services.values() if "deploy" in s) >= 2
    gateway = services["gateway"]
    args = gateway["command"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in gateway["volumes"]}
    source = (DOCKER / mounted[args[args.index("--topology") + 1]]).resolve()
    assert source == manifests.TOPOLOGY.resolve()
    assert set(gateway["depends_on"]) == {p.dns.name for p in TOPOLOGY.pools if p.dns}


@pytest.mark.parametrize("name", ["compose.cpu.yaml", "compose.h100.yaml"])
def test_single_topology_compose_files_use_the_launcher_ports_and_deep_health(name: str) -> None:
    triton = compose(name)["services"]["triton"]
    assert health_url(triton) == f"http://127.0.0.1:{DEFAULTS.health_port}/health/ready"
    published = {int(p.split(":")[-1].split()[0]) for p in triton["ports"]}
    ports = (DEFAULTS.http_port, DEFAULTS.grpc_port, DEFAULTS.metrics_port, DEFAULTS.health_port)
    assert published == set(ports)


def test_h100_pairs_compose_is_the_planners_nvlink_pairs_behind_the_gateway() -> None:
    result = manifests.pairs_plan()
    tplan = result.for_target(manifests.PAIRS_TIER)
    assert len(tplan.replicas) == 2 and all(r.nvlink for r in tplan.replicas)
    services = compose("compose.h100-pairs.yaml")["services"]
    replicas = [s for name, s in services.items() if name.startswith("medium-")]
    assert len(replicas) == 2
    pairs = Topology.load(DOCKER / "topology.h100-pairs.yaml")
    medium = pairs.pool("medium")
    for service, replica in zip(replicas, tplan.replicas, strict=True):
        devices = service["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
        assert devices == [str(g) for g in replica.gpus]
        args = service["command"]
        local = args[args.index("--gpu-device-ids") + 1]
        assert local == f"{manifests.PAIRS_TIER}=0,1"  # the pair as the container sees it
        assert args[args.index("--models") + 1].split(",") == list(medium.models)
        assert service["networks"]["default"]["aliases"] == [medium.dns.name]
    gateway = services["gateway"]
    assert "./topology.h100-pairs.yaml:/etc/gateway/topology.yaml:ro" in gateway["volumes"]
    assert set(gateway["depends_on"]) == set(services) - {"gateway"}
    # the pools it keeps are the Kubernetes topology's, unchanged
    for pool in pairs.pools:
        assert pool == TOPOLOGY.pool(pool.name)
