"""``python -m gateway.cluster`` (``make cluster``): see :mod:`gateway.cluster`."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from gateway import manifests
from gateway import process as gateway_process
from gateway.cluster import local_topology, start_replicas, stop_all
from serving.launcher import LaunchError, TritonLauncher, free_port
from serving.runtime import run_foreground


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.cluster", description="Start the pools topology on this machine."
    )
    parser.add_argument("--topology", type=Path, default=manifests.TOPOLOGY)
    parser.add_argument("--port", type=int, default=0, help="gateway port (default: a free one)")
    args = parser.parse_args(argv)
    source = yaml.safe_load(args.topology.read_text())
    workdir = Path(tempfile.mkdtemp(prefix="triton-cluster-"))
    replicas: dict[str, list[TritonLauncher]] = {}
    gateway: subprocess.Popen[bytes] | None = None

    def serve() -> int:
        nonlocal gateway
        start_replicas(source, workdir, lambda msg: print(msg, flush=True), replicas)
        topology = workdir / "topology.yaml"
        topology.write_text(yaml.safe_dump(local_topology(source, replicas), sort_keys=False))
        port = args.port or free_port()
        print(f"starting the gateway (topology: {topology}) ...", flush=True)
        gateway = gateway_process.start(
            ["--port", str(port), "--topology", str(topology)],
            f"http://127.0.0.1:{port}/health/ready",
        )
        print(f"\nOpenAI base URL: http://127.0.0.1:{port}/v1", flush=True)
        print(f"logs: {workdir}; Ctrl-C stops everything.", flush=True)
        while gateway.poll() is None:
            time.sleep(0.5)
        print(f"error: the gateway exited (code {gateway.returncode})", file=sys.stderr)
        return 1

    def stop() -> None:
        if gateway is not None:
            gateway_process.stop(gateway)
        stop_all(replicas)

    return run_foreground(serve, stop, (LaunchError, RuntimeError))


if __name__ == "__main__":
    sys.exit(main())
