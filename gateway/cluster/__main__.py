"""``python -m gateway.cluster`` (``make cluster``): see :mod:`gateway.cluster`."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import tempfile
import time
from pathlib import Path

import yaml

from gateway import manifests
from gateway import process as gateway_process
from gateway.cluster import local_topology, start_replicas, stop_all
from serving.launcher import LaunchError, TritonLauncher, free_port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.cluster", description="Start the pools topology on this machine."
    )
    parser.add_argument("--topology", type=Path, default=manifests.TOPOLOGY)
    parser.add_argument("--port", type=int, default=0, help="gateway port (default: a free one)")
    args = parser.parse_args(argv)
    source = yaml.safe_load(args.topology.read_text())
    signal.signal(signal.SIGTERM, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="triton-cluster-"))
    replicas: dict[str, list[TritonLauncher]] = {}
    gateway = None
    try:
        replicas = start_replicas(source, workdir, lambda msg: print(msg, flush=True))
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
    except (LaunchError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping ...", flush=True)
        return 0
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            if gateway is not None:
                gateway_process.stop(gateway)
            stop_all(replicas)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
