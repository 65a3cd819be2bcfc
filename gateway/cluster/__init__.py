"""The ``pools`` topology on this machine: ``make cluster``, the integration test, the soak.

:class:`LocalCluster` starts one Triton process per pool replica (each loading only its
pool's models, on loopback free ports) and the gateway in front of them with the same
pools as ``docker/k8s/base/topology.yaml``: only the addresses change (replicas listed by
port instead of a headless Service's DNS name). Two replicas of the small tier by default.

Every replica serves a configured copy of the model repository (:data:`LOCAL_PARAMS`,
:data:`LOCAL_INSTANCES`): one torch thread per LLM tier and one embedding instance, so the
four or five servers share the machine's cores instead of each sizing itself for all of
them.

Lifetime: call :meth:`LocalCluster.start` (or enter it as a context manager) from the
**main thread**. Each tritonserver then gets SIGKILL when this process dies (parent-death
signal plus the launcher's group reaper, which also takes the stubs), and the gateway gets
SIGTERM; a child started from a worker thread would instead die with that thread.
:meth:`LocalCluster.stop` stops the gateway first (it drains its streams), then every
Triton.

Faults for tests and the soak: :meth:`LocalCluster.kill` SIGKILLs one replica's
tritonserver only (its stubs share its process group; :meth:`LocalCluster.restart` and
:meth:`LocalCluster.stop` SIGKILL that group and remove the stubs' shared memory), and
:meth:`LocalCluster.restart` starts that replica again on the same ports, so the
gateway's static topology sees it come back when its deep health answers 200 again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import yaml

from gateway import manifests
from gateway import process as gateway_process
from serving.launcher import DEFAULT_REPOSITORY, LaunchOptions, TritonLauncher, free_port
from serving.repository import configured_copy

#: Replicas per pool on one machine: two of the small tier (the balancing case).
LOCAL_REPLICAS = {"small": 2}

#: Config parameters of the local copy: one torch thread per tier process (five servers
#: on two cores; the default two threads each would oversubscribe them).
LOCAL_PARAMS: dict[str, dict[str, str]] = {
    tier: {"torch_threads": "1"} for tier in ("llm_small", "llm_medium", "llm_large")
}

#: Instance counts of the local copy: one embedding stub instead of two (the front pool
#: shares the cores with four tier processes).
LOCAL_INSTANCES = {"embedding": 1}


def local_topology(
    source: dict[str, Any], replicas: dict[str, Sequence[TritonLauncher]]
) -> dict[str, Any]:
    """``source`` (the topology file's content) with each pool's replicas on this machine.

    Pools absent from ``replicas`` (not started) are left out.
    """
    out = dict(source)
    pools = []
    for raw in source["pools"]:
        if raw["name"] not in replicas:
            continue
        pool = {k: v for k, v in raw.items() if k not in ("dns", "health_port")}
        pool["replicas"] = [
            {"url": launcher.grpc_url, "health_url": launcher.health_url}
            for launcher in replicas[raw["name"]]
        ]
        pools.append(pool)
    out["pools"] = pools
    return out


@dataclasses.dataclass
class Replica:
    """One Triton process of a pool. ``launcher`` is replaced by :meth:`LocalCluster.restart`."""

    pool: str
    index: int
    launcher: TritonLauncher

    @property
    def pid(self) -> int | None:
        """tritonserver's pid (None while stopped)."""
        return self.launcher.pid

    @property
    def grpc_url(self) -> str:
        """``host:port`` of its gRPC endpoint: the replica's name in the gateway."""
        return self.launcher.grpc_url

    @property
    def http_url(self) -> str:
        return self.launcher.http_url

    @property
    def health_url(self) -> str:
        return self.launcher.health_url

    @property
    def metrics_url(self) -> str:
        return self.launcher.metrics_url


class LocalCluster:
    """The pools topology on loopback: Triton replicas per pool, the gateway in front.

    ``pools`` starts only those pools (default: all of the topology's); ``replicas`` says
    how many replicas a pool gets (default :data:`LOCAL_REPLICAS`, others one);
    ``params`` / ``instances`` configure the repository copy every replica serves.
    ``gateway_args`` are extra ``python -m gateway`` arguments. Logs go to ``workdir``
    (a temporary folder, kept after :meth:`stop` so a failure can be read).

    Use as ``with LocalCluster(pools=["front", "small"]) as cluster: ...`` or call
    :meth:`start` / :meth:`stop`; start from the main thread (see the module's doc).
    """

    def __init__(
        self,
        *,
        topology: Path = manifests.TOPOLOGY,
        pools: Sequence[str] | None = None,
        replicas: dict[str, int] | None = None,
        repository: Path = DEFAULT_REPOSITORY,
        params: dict[str, dict[str, str]] | None = None,
        instances: dict[str, int] | None = None,
        workdir: Path | None = None,
        gateway_port: int = 0,
        gateway_args: Sequence[str] = (),
        ready_timeout: float = 900.0,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.source: dict[str, Any] = yaml.safe_load(Path(topology).read_text())
        names = [p["name"] for p in self.source["pools"]]
        unknown = sorted(set(pools or ()) - set(names))
        if unknown:
            raise ValueError(f"unknown pool(s) {unknown}; the topology has {names}")
        self.pool_names = [n for n in names if pools is None or n in pools]
        self.replica_counts = {**LOCAL_REPLICAS, **(replicas or {})}
        self.repository = repository
        self.params = LOCAL_PARAMS if params is None else params
        self.instances = LOCAL_INSTANCES if instances is None else instances
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="triton-cluster-"))
        self.gateway_port = gateway_port
        self.gateway_args = list(gateway_args)
        self.ready_timeout = ready_timeout
        self.progress = progress or (lambda _msg: None)
        #: Pool name -> its replicas, in the order the gateway's topology lists them.
        self.replicas: dict[str, list[Replica]] = {}
        self.gateway: subprocess.Popen[bytes] | None = None
        self._gateway_log: IO[bytes] | None = None
        self._restarts = 0

    # ---------------------------------------------------------------- addresses
    @property
    def gateway_url(self) -> str:
        """The gateway's root (``/health/ready``, ``/metrics``)."""
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL (what ``openai.OpenAI(base_url=...)`` takes)."""
        return f"{self.gateway_url}/v1"

    @property
    def gateway_pid(self) -> int | None:
        return self.gateway.pid if self.gateway else None

    @property
    def gateway_log(self) -> Path:
        return self.workdir / "gateway.log"

    def replica(self, pool: str, index: int) -> Replica:
        try:
            return self.replicas[pool][index]
        except (KeyError, IndexError):
            raise KeyError(f"no replica {index} in pool '{pool}'") from None

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> LocalCluster:
        """Start every replica (one after the other: the cores are shared), then the gateway.

        Returns once the gateway's ``/health/ready`` answers 200. On failure everything
        already started is stopped and the error (the launcher's, quoting the server log)
        is raised.
        """
        try:
            repo = configured_copy(
                self.repository, self.workdir, self.params, instances=self.instances
            )
            for raw in self.source["pools"]:
                name = raw["name"]
                if name not in self.pool_names:
                    continue
                self.replicas[name] = []
                for index in range(self.replica_counts.get(name, 1)):
                    options = LaunchOptions.on_free_ports(
                        models=list(raw["models"]),
                        repository=repo,
                        log_path=self.workdir / f"triton-{name}-{index}.log",
                        ready_timeout=self.ready_timeout,
                    )
                    replica = Replica(name, index, TritonLauncher(options))
                    self.replicas[name].append(replica)  # stopped by stop() even if start fails
                    self.progress(
                        f"pool {name} replica {index}: starting ({', '.join(raw['models'])})"
                    )
                    replica.launcher.start()
                    self.progress(f"pool {name} replica {index}: ready, gRPC {replica.grpc_url}")
            self._start_gateway()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_gateway(self) -> None:
        launchers = {n: [r.launcher for r in rs] for n, rs in self.replicas.items()}
        topology = self.workdir / "topology.yaml"
        topology.write_text(yaml.safe_dump(local_topology(self.source, launchers), sort_keys=False))
        self.gateway_port = self.gateway_port or free_port()
        self.progress(f"starting the gateway (topology: {topology}) ...")
        self._gateway_log = self.gateway_log.open("ab")
        self.gateway = gateway_process.start(
            ["--port", str(self.gateway_port), "--topology", str(topology), *self.gateway_args],
            f"{self.gateway_url}/health/ready",
            stdout=self._gateway_log,
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        """Stop the gateway (draining its streams), then every Triton. Safe to call twice."""
        gateway, self.gateway = self.gateway, None
        if gateway is not None:
            gateway_process.stop(gateway)
        if self._gateway_log is not None:
            self._gateway_log.close()
            self._gateway_log = None
        for replicas in self.replicas.values():
            for replica in replicas:
                replica.launcher.stop()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- faults
    def kill(self, pool: str, index: int) -> int:
        """SIGKILL replica ``index`` of ``pool``'s tritonserver (a crash); return its pid.

        The launcher is left as it is: its deep health answers 503 from now on, which is
        how the gateway (besides the failed requests) notices. :meth:`restart` brings it back.
        """
        replica = self.replica(pool, index)
        pid = replica.pid
        if pid is None:
            raise RuntimeError(f"replica {index} of pool '{pool}' is not running")
        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, subprocess.TimeoutExpired):
            replica.launcher.process.wait(timeout=10)  # type: ignore[union-attr]
        return pid

    def restart(self, pool: str, index: int) -> Replica:
        """Stop replica ``index`` of ``pool`` (if still running; reaping what a kill left),
        then start it again on the same ports and return it. Blocks until its models are
        loaded; the gateway's health probe lets it back in within a second or two."""
        replica = self.replica(pool, index)
        replica.launcher.stop()
        self._restarts += 1
        options = dataclasses.replace(
            replica.launcher.options,
            log_path=self.workdir / f"triton-{pool}-{index}.restart{self._restarts}.log",
        )
        replica.launcher = TritonLauncher(options)
        self.progress(f"pool {pool} replica {index}: restarting on {replica.grpc_url}")
        replica.launcher.start()
        self.progress(f"pool {pool} replica {index}: ready again")
        return replica

    # ---------------------------------------------------------------- observation
    def gateway_health(self) -> dict[str, Any]:
        """The gateway's ``/health/ready`` body (healthy and ejected replicas per pool)."""
        try:
            with urllib.request.urlopen(f"{self.gateway_url}/health/ready", timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:  # 503 still carries the report
            return json.loads(exc.read())

    def healthy(self, pool: str) -> list[str]:
        """The gRPC URLs of ``pool``'s replicas the gateway has in rotation right now."""
        return list(self.gateway_health()["pools"][pool]["healthy"])

    def describe(self) -> str:
        """Human-readable lines: every replica with its pid and ports, the gateway, logs."""
        lines = []
        for name, replicas in self.replicas.items():
            for r in replicas:
                lines.append(
                    f"  {name}[{r.index}]: pid {r.pid}, gRPC {r.grpc_url}, "
                    f"HTTP {r.http_url}, health {r.health_url}"
                )
        lines.append(f"  gateway: pid {self.gateway_pid}, {self.gateway_url}")
        lines.append(f"  logs: {self.workdir}")
        return "\n".join(lines)

    def remove_workdir(self) -> None:
        """Delete the logs and the repository copy (after :meth:`stop`)."""
        shutil.rmtree(self.workdir, ignore_errors=True)
