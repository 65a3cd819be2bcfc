"""Kubernetes manifests generated from the gateway's topology file (``python -m gateway.manifests``).

The topology file (``docker/k8s/base/topology.yaml``) is the one description of the pools:
the gateway reads it, and this module writes, from it and the engine specs,

- ``docker/k8s/base/pools.yaml``: per pool a Deployment (readiness on the launcher's deep
  health port, liveness on Triton's, a startup probe as long as engine loads, a preStop
  drain), a headless Service (the gateway's DNS discovery sees every ready pod), a
  PodDisruptionBudget, a PodMonitor, and for the tier pools a KEDA ScaledObject on the
  gateway's queue for that pool;
- ``docker/k8s/overlays/<profile>/pools-patch.yaml``: per pool what the profile changes
  (image, resources, GPUs from the specs' TP, rollout strategy, volumes).

``--check`` exits 1 when the committed files differ from what would be generated, which
is what the unit test asserts too. Nothing here needs a cluster.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gateway.config import REPO_ROOT, PoolSpec, Topology

K8S = REPO_ROOT / "docker" / "k8s"
BASE = K8S / "base"
TOPOLOGY = BASE / "topology.yaml"
PROFILES = ("cpu", "h100")

APP = "triton-llm"
HTTP_PORT, GRPC_PORT, METRICS_PORT, HEALTH_PORT = 8000, 8001, 8002, 8003
GATEWAY_PORT = 8080
#: The gateway re-resolves a pool's DNS every interval_s; a terminating pod leaves the
#: headless Service at once, so the preStop sleep covers one re-resolution plus margin
#: before Triton stops accepting.
PRESTOP_SLEEP_S = 15
#: The longest stream we let finish on shutdown: field reports put long responses at
#: 30-150 s on H100 tiers; the gateway's first-token timeout is 120 s.
DRAIN_S = 180
GRACE_S = PRESTOP_SLEEP_S + DRAIN_S + 15
PROMETHEUS = "http://prometheus-operated.monitoring.svc:9090"
#: Pools that may scale to zero. None: every tier is a target of model=auto, and a cold
#: tier pod needs minutes to load its engine, so every tier must answer at once.
SCALE_TO_ZERO: frozenset[str] = frozenset()
MAX_REPLICAS = {"front": 8, "small": 16, "medium": 8, "large": 4}
#: Per profile: the seconds a pod may take to load its models before the startup probe
#: gives up (CPU: a minute or two; H100: a 405B engine takes minutes to read and load).
STARTUP_S = {"cpu": 600, "h100": 1800}
IMAGES = {"cpu": "triton-llm-stack:cpu", "h100": "triton-llm-stack:h100"}


def deployment_name(pool: str) -> str:
    return f"triton-{pool}"


def labels(pool: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": APP, "app.kubernetes.io/component": "triton", "pool": pool}


def _dump(docs: list[dict[str, Any]], header: str) -> str:
    body = "---\n".join(yaml.safe_dump(d, sort_keys=False, width=100) for d in docs)
    return header + body


def _launcher_args(pool: PoolSpec, profile: str) -> list[str]:
    args = ["--profile", profile, "--host", "0.0.0.0", "--models", ",".join(pool.models)]
    args += ["--drain-timeout", str(DRAIN_S), "--ready-timeout", str(STARTUP_S[profile])]
    if profile == "h100":
        args += ["--tritonserver", "/opt/tritonserver/bin/tritonserver"]
        args += ["--model-repository", "/opt/triton-llm-stack/model_repository"]
        # The pod sees only its own GPUs, numbered from 0: the node-wide plan's ids in the
        # configs (llm_small on 6;7, embedding on 4) would name GPUs it does not have.
        for model, ids in pod_gpu_ids(pool).items():
            args += ["--gpu-device-ids", f"{model}={ids}"]
    return args


def pod_gpu_ids(pool: PoolSpec) -> dict[str, str]:
    """Per GPU model the pool loads, its GPUs inside one pod: a tier's TP group from 0.

    The pool's models are closed over ensemble steps first, as the launcher loads them:
    ``intent_classifier`` brings ``intent_encoder``, a GPU model of its own.
    """
    from build_engines.render import AUX_MODELS
    from serving.repository import load_order, load_repository

    repository = load_repository(REPO_ROOT / "model_repository", "h100")
    wanted = [m for m in pool.models if m in repository]
    loaded = [m for wave in load_order(repository, wanted) for m in sorted(wave)]
    tp = tier_tp()
    ids = {}
    for model in loaded:
        if model in tp:
            ids[model] = ",".join(str(g) for g in range(tp[model]))
        elif model in AUX_MODELS:
            ids[model] = "0"  # the encoders' KIND_GPU instances share the pod's first GPU
    return ids


def tier_tp() -> dict[str, int]:
    from build_engines.spec import tier_specs

    return {spec.tier: spec.tp * spec.pp for spec in tier_specs()}


def _probe(path: str, port: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def pool_deployment(pool: PoolSpec) -> dict[str, Any]:
    """The profile-neutral part of a pool's Deployment (the overlays patch the rest)."""
    sel = labels(pool.name)
    container = {
        "name": "triton",
        "image": "triton-llm-stack",  # set per overlay (kustomize images)
        "args": _launcher_args(pool, "cpu"),
        "ports": [
            {"name": "http", "containerPort": HTTP_PORT},
            {"name": "grpc", "containerPort": GRPC_PORT},
            {"name": "metrics", "containerPort": METRICS_PORT},
            {"name": "health", "containerPort": HEALTH_PORT},
        ],
        # The launcher's deep check answers 200 only once every model is loaded, so the
        # startup probe waits on it; Triton's own liveness takes over afterwards.
        "startupProbe": _probe("/health/ready", "health", 10, STARTUP_S["cpu"] // 10),
        "readinessProbe": _probe("/health/ready", "health", 5, 2),
        "livenessProbe": _probe("/v2/health/live", "http", 10, 6),
        # Leave the headless Service first (readiness is dropped at termination), wait for
        # the gateway to re-resolve, then SIGTERM: Triton drains streams for DRAIN_S.
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_S}}},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": deployment_name(pool.name), "labels": sel},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": sel},
            "template": {
                "metadata": {"labels": sel},
                "spec": {
                    "terminationGracePeriodSeconds": GRACE_S,
                    "containers": [container],
                    # Python backend stubs talk to Triton through shared memory.
                    "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
                },
            },
        },
    }


def pool_service(pool: PoolSpec) -> dict[str, Any]:
    assert pool.dns is not None
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": pool.dns.name, "labels": labels(pool.name)},
        "spec": {
            # Headless: the name resolves to every ready pod, which the gateway balances.
            "clusterIP": "None",
            "selector": labels(pool.name),
            "ports": [
                {"name": "grpc", "port": pool.dns.port, "targetPort": "grpc"},
                {"name": "health", "port": HEALTH_PORT, "targetPort": "health"},
                {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics"},
            ],
        },
    }


def pool_pdb(pool: PoolSpec) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": deployment_name(pool.name)},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels(pool.name)}},
    }


def queue_query(pool: PoolSpec) -> str:
    """Requests running plus waiting for the pool, as the gateway counts them."""
    return (
        f'sum(gateway_pool_in_flight{{pool="{pool.name}"}}) + '
        f'sum(gateway_pool_queued{{pool="{pool.name}"}})'
    )


def pool_scaledobject(pool: PoolSpec) -> dict[str, Any]:
    """KEDA: replicas = ceil((in flight + queued) / max_in_flight), within the bounds."""
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": deployment_name(pool.name)},
        "spec": {
            "scaleTargetRef": {"name": deployment_name(pool.name)},
            "minReplicaCount": 0 if pool.name in SCALE_TO_ZERO else 1,
            "maxReplicaCount": MAX_REPLICAS.get(pool.name, 4),
            "pollingInterval": 15,
            # A new tier pod takes minutes to load: do not give capacity back quickly.
            "cooldownPeriod": 600,
            "triggers": [
                {
                    "type": "prometheus",
                    "metricType": "AverageValue",
                    "metadata": {
                        "serverAddress": PROMETHEUS,
                        "query": queue_query(pool),
                        "threshold": str(pool.max_in_flight),
                    },
                }
            ],
        },
    }


def pool_podmonitor(pool: PoolSpec) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": deployment_name(pool.name), "labels": labels(pool.name)},
        "spec": {
            "selector": {"matchLabels": labels(pool.name)},
            "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}],
        },
    }


def is_tier(pool: PoolSpec) -> bool:
    return any(m.startswith("llm_") for m in pool.models)


def base_pools(topology: Topology) -> str:
    docs: list[dict[str, Any]] = []
    for pool in topology.pools:
        docs += [pool_deployment(pool), pool_service(pool), pool_pdb(pool), pool_podmonitor(pool)]
        if is_tier(pool):
            docs.append(pool_scaledobject(pool))
    return _dump(docs, _HEADER)


@dataclass(frozen=True)
class GpuShape:
    gpus: int
    whole_node: bool


def gpu_shapes(topology: Topology) -> dict[str, GpuShape]:
    """GPUs per pod of each pool on H100: a tier's TP from its spec; embedding and the
    classifier share one GPU. The 405B tier lives on nodes of its own (whole-node pods)."""
    tp = tier_tp()
    shapes = {}
    for pool in topology.pools:
        gpus = max((tp.get(m, 1) for m in pool.models), default=1)
        shapes[pool.name] = GpuShape(gpus, whole_node="llm_large" in pool.models)
    return shapes


def overlay_patch(topology: Topology, profile: str) -> str:
    shapes = gpu_shapes(topology)
    docs = []
    for pool in topology.pools:
        container: dict[str, Any] = {"name": "triton", "args": _launcher_args(pool, profile)}
        container["startupProbe"] = _probe("/health/ready", "health", 10, STARTUP_S[profile] // 10)
        spec: dict[str, Any] = {"template": {"spec": {"containers": [container]}}}
        if profile == "cpu":
            container["resources"] = {
                "requests": {"cpu": "2", "memory": "4Gi"},
                "limits": {"memory": "8Gi"},
            }
        else:
            shape = shapes[pool.name]
            gpus = str(shape.gpus)
            container["env"] = [{"name": "TRTLLM_ORCHESTRATOR", "value": "1"}]
            container["resources"] = {
                "requests": {"nvidia.com/gpu": gpus, "cpu": str(4 * shape.gpus)},
                "limits": {"nvidia.com/gpu": gpus},
            }
            container["volumeMounts"] = [
                {"name": "dshm", "mountPath": "/dev/shm"},
                {"name": "engines", "mountPath": "/engines", "readOnly": True},
                {"name": "models", "mountPath": "/models", "readOnly": True},
            ]
            pod = spec["template"]["spec"]
            pod["nodeSelector"] = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
            pod["volumes"] = [
                {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}},
                {"name": "engines", "persistentVolumeClaim": {"claimName": "trtllm-engines"}},
                {"name": "models", "persistentVolumeClaim": {"claimName": "llm-checkpoints"}},
            ]
            # A GPU pod never surges: a rollout must not need GPUs the node pool lacks.
            # Whole-node pods are replaced (Recreate); others one at a time.
            spec["strategy"] = (
                {"type": "Recreate"}
                if shape.whole_node
                else {
                    "type": "RollingUpdate",
                    "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
                }
            )
            if shape.whole_node:
                pod["tolerations"] = [
                    {
                        "key": "dedicated",
                        "operator": "Equal",
                        "value": pool.name,
                        "effect": "NoSchedule",
                    }
                ]
        docs.append(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": deployment_name(pool.name)},
                "spec": spec,
            }
        )
    return _dump(docs, _HEADER)


#: Replicas per pool in the compose file (two of one tier, as the issue's field layout).
COMPOSE_REPLICAS = {"small": 2}


def _compose_healthcheck(profile: str) -> dict[str, Any]:
    """The launcher's deep readiness, checked from inside the container."""
    probe = (
        "import urllib.request; urllib.request.urlopen("
        f"'http://127.0.0.1:{HEALTH_PORT}/health/ready', timeout=5)"
    )
    return {
        "test": ["CMD", "python3", "-c", probe],
        "interval": "15s",
        "timeout": "6s",
        "start_period": f"{STARTUP_S[profile]}s",
        "retries": 3,
    }


def _compose_gateway(topology: str, keys: str, depends_on: list[str]) -> dict[str, Any]:
    """The gateway service, reading the topology and key files mounted from the host."""
    return {
        "image": IMAGES["cpu"],
        "entrypoint": [".venv/bin/python", "-m", "gateway"],
        "command": ["--host", "0.0.0.0", "--port", str(GATEWAY_PORT),
                    "--topology", "/etc/gateway/topology.yaml",
                    "--api-keys", "/etc/gateway/keys.yaml", "--drain-timeout", str(DRAIN_S)],
        "volumes": [f"{topology}:/etc/gateway/topology.yaml:ro", f"{keys}:/etc/gateway/keys.yaml:ro"],
        "ports": [f"127.0.0.1:{GATEWAY_PORT}:{GATEWAY_PORT}"],
        "stop_grace_period": f"{GRACE_S}s",
        "depends_on": {name: {"condition": "service_healthy"} for name in depends_on},
    }  # fmt: skip


def compose_pools(topology: Topology) -> str:
    """docker/compose.pools.yaml: the same pools on one Docker host (CPU profile).

    Each pool is a service named like its headless Service, so Docker's DNS answers the
    gateway's lookups with every replica's address, exactly as Kubernetes does: the
    gateway reads the very same topology.yaml.
    """
    services: dict[str, Any] = {}
    for pool in topology.pools:
        assert pool.dns is not None, f"{pool.name}: compose pools are found through DNS"
        services[pool.dns.name] = {
            "image": IMAGES["cpu"],
            "build": {"context": "..", "dockerfile": "docker/Dockerfile.cpu"},
            "command": _launcher_args(pool, "cpu")[2:],  # the entrypoint sets --profile
            "shm_size": "1g",
            "stop_grace_period": f"{GRACE_S}s",
            "healthcheck": _compose_healthcheck("cpu"),
            "deploy": {"replicas": COMPOSE_REPLICAS.get(pool.name, 1)},
        }
    services["gateway"] = _compose_gateway(
        "./k8s/base/topology.yaml", "./k8s/overlays/cpu/keys.yaml", list(services)
    )
    header = _HEADER + (
        "# The `pools` topology on one Docker host: docker compose -f docker/compose.pools.yaml up\n"
        "# then the OpenAI API is at http://127.0.0.1:8080/v1 (key sk-local-demo).\n"
    )
    return header + yaml.safe_dump({"services": services}, sort_keys=False, width=100)


#: The field layout of issue 12: one tier, two replicas, each on an NVLink pair the planner
#: picks, behind the gateway (the seed case: 2x TP2 beat 1x TP4 on bridged H100 PCIe).
PAIRS_NODE = REPO_ROOT / "tests" / "fixtures" / "topologies" / "4x-h100-pcie-nvlink-bridge.txt"
PAIRS_TIER = "llm_medium"
PAIRS_POOLS = ("front", "medium")


def pairs_plan() -> Any:
    from build_engines.planner import PlanOptions, Target, plan
    from build_engines.spec import tier_specs
    from build_engines.topology import load_topology

    spec = next(s for s in tier_specs() if s.tier == PAIRS_TIER)
    return plan(load_topology(PAIRS_NODE), [Target.from_spec(spec)], PlanOptions(max_replicas=2))


def _gpu_devices(gpus: list[int]) -> dict[str, Any]:
    device = {"driver": "nvidia", "device_ids": [str(g) for g in gpus], "capabilities": ["gpu"]}
    return {"resources": {"reservations": {"devices": [device]}}}


def compose_h100_pairs(topology: Topology) -> str:
    """docker/compose.h100-pairs.yaml: the planner's NVLink pairs, one Triton each."""
    result = pairs_plan()
    tplan = result.for_target(PAIRS_TIER)
    pools = {p.name: p for p in topology.pools}
    common = {
        "image": IMAGES["h100"],
        "shm_size": "2g",
        "ulimits": {"memlock": -1, "stack": 67108864},
        "volumes": [
            "${MODELS_DIR:-/srv/models}:/models:ro",
            "${ENGINES_DIR:-/srv/engines}:/engines:ro",
        ],
        "stop_grace_period": f"{GRACE_S}s",
        "healthcheck": _compose_healthcheck("h100"),
    }
    medium, front = pools["medium"], pools["front"]
    assert medium.dns is not None and front.dns is not None
    # One Triton per NVLink pair, both answering the pool's DNS name (a network alias), as
    # a headless Service's pods do; each sees its pair as GPUs 0 and 1.
    placed = [(f"medium-{chr(97 + n)}", medium, r.gpus) for n, r in enumerate(tplan.replicas)]
    placed.append(("front", front, [result.aux_gpu]))
    services: dict[str, Any] = {
        name: {
            **common,
            "command": _launcher_args(pool, "h100")[2:],  # the entrypoint sets --profile
            "networks": {"default": {"aliases": [pool.dns.name]}},
            "deploy": _gpu_devices(gpus),
        }
        for name, pool, gpus in placed
        if pool.dns is not None
    }
    services["gateway"] = _compose_gateway(
        "./topology.h100-pairs.yaml", "${API_KEYS:-./k8s/overlays/cpu/keys.yaml}", list(services)
    )
    pairs = ", ".join("+".join(f"GPU{g}" for g in r.gpus) for r in tplan.replicas)
    header = _HEADER + (
        f"# The field layout: {PAIRS_TIER} TP{tplan.tp} x{len(tplan.replicas)} on the NVLink pairs\n"
        f"# the planner picks on {PAIRS_NODE.relative_to(REPO_ROOT)} ({pairs}), one Triton each,\n"
        f"# behind the gateway; embedding + the classifier share GPU{result.aux_gpu}.\n"
        "#   docker compose -f docker/compose.h100-pairs.yaml up -d\n"
    )
    return header + yaml.dump({"services": services}, Dumper=_NoAliases, sort_keys=False, width=100)


class _NoAliases(yaml.SafeDumper):
    """Shared sub-dicts written out in full (compose files read better without anchors)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def pairs_topology(topology: Topology) -> str:
    """The gateway's topology for compose.h100-pairs.yaml: the same pools, fewer of them."""
    raw = yaml.safe_load(TOPOLOGY.read_text())
    raw["pools"] = [p for p in raw["pools"] if p["name"] in PAIRS_POOLS]
    return _HEADER + yaml.safe_dump(raw, sort_keys=False, width=100)


_HEADER = (
    "# GENERATED by `python -m gateway.manifests` from docker/k8s/base/topology.yaml and\n"
    "# build_engines/specs: do not edit; edit those and regenerate.\n"
)


def outputs(topology_path: Path = TOPOLOGY) -> dict[Path, str]:
    topology = Topology.load(topology_path)
    files = {
        BASE / "pools.yaml": base_pools(topology),
        REPO_ROOT / "docker" / "compose.pools.yaml": compose_pools(topology),
        REPO_ROOT / "docker" / "compose.h100-pairs.yaml": compose_h100_pairs(topology),
        REPO_ROOT / "docker" / "topology.h100-pairs.yaml": pairs_topology(topology),
    }
    for profile in PROFILES:
        files[K8S / "overlays" / profile / "pools-patch.yaml"] = overlay_patch(topology, profile)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.manifests", description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the files are stale")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        sys.stderr.write(
            "stale: " + ", ".join(str(p.relative_to(REPO_ROOT)) for p in stale) + "\n"
            "run: python -m gateway.manifests\n"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
