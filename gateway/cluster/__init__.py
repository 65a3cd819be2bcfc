"""``make cluster`` (``python -m gateway.cluster``): the ``pools`` topology on this machine.

One Triton process per pool replica (each loading only its pool's models, on loopback
free ports), two replicas of the small tier, and the gateway in front of them with the
same pools as ``docker/k8s/base/topology.yaml``: only the addresses change (replicas
listed by port instead of a headless Service's DNS name). Prints the OpenAI base URL;
Ctrl-C (or SIGTERM) stops the gateway first, then every Triton. Every child dies with
this process (PR_SET_PDEATHSIG), also if it is killed with SIGKILL.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from serving.launcher import LaunchOptions, TritonLauncher

#: Replicas per pool on one machine: two of the small tier (the balancing case).
LOCAL_REPLICAS = {"small": 2}


def local_topology(
    source: dict[str, Any], replicas: dict[str, list[TritonLauncher]]
) -> dict[str, Any]:
    """``source`` (the topology file's content) with each pool's replicas on this machine."""
    out = dict(source)
    pools = []
    for raw in source["pools"]:
        pool = {k: v for k, v in raw.items() if k not in ("dns", "health_port")}
        pool["replicas"] = [
            {"url": launcher.grpc_url, "health_url": launcher.health_url}
            for launcher in replicas[raw["name"]]
        ]
        pools.append(pool)
    out["pools"] = pools
    return out


def start_replicas(
    source: dict[str, Any],
    workdir: Path,
    progress: Callable[[str], None],
    started: dict[str, list[TritonLauncher]],
) -> None:
    """Start every pool's replicas into ``started``, one after the other (two cores are
    shared). Each launcher is recorded before it starts, so the caller stops whatever did
    start when a later one fails."""
    for raw in source["pools"]:
        name = raw["name"]
        started[name] = []
        for n in range(LOCAL_REPLICAS.get(name, 1)):
            options = LaunchOptions.on_free_ports(
                models=list(raw["models"]), log_path=workdir / f"triton-{name}-{n}.log"
            )
            launcher = TritonLauncher(options)
            started[name].append(launcher)  # stopped by the caller even if start fails
            progress(f"pool {name} replica {n}: starting ({', '.join(raw['models'])})")
            launcher.start()
            progress(f"pool {name} replica {n}: ready, gRPC {launcher.grpc_url}")


def stop_all(replicas: dict[str, list[TritonLauncher]]) -> None:
    for launchers in replicas.values():
        for launcher in launchers:
            launcher.stop()
