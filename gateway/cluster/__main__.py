"""``python -m gateway.cluster`` (``make cluster``): see :mod:`gateway.cluster`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from gateway import manifests
from gateway.cluster import LocalCluster
from serving.launcher import LaunchError
from serving.runtime import run_foreground


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.cluster",
        description=(
            "Start the pools topology on this machine: a Triton per pool replica (two of "
            "the small tier) on free loopback ports and the gateway in front. Prints the "
            "OpenAI base URL; Ctrl-C or SIGTERM stops everything."
        ),
    )
    parser.add_argument("--topology", type=Path, default=manifests.TOPOLOGY)
    parser.add_argument(
        "--pools", nargs="+", metavar="POOL", help="start only these pools (default: all)"
    )
    parser.add_argument("--port", type=int, default=0, help="gateway port (default: a free one)")
    args = parser.parse_args(argv)
    cluster = LocalCluster(
        topology=args.topology,
        pools=args.pools,
        gateway_port=args.port,
        progress=lambda msg: print(msg, flush=True),
    )

    def serve() -> int:
        cluster.start()
        print(cluster.describe(), flush=True)
        print(f"\nOpenAI base URL: {cluster.base_url}", flush=True)
        print("Ctrl-C stops everything.", flush=True)
        while cluster.gateway is not None and cluster.gateway.poll() is None:
            time.sleep(0.5)
        code = cluster.gateway.returncode if cluster.gateway else None
        print(
            f"error: the gateway exited (code {code}); see {cluster.gateway_log}", file=sys.stderr
        )
        return 1

    return run_foreground(serve, cluster.stop, (LaunchError, RuntimeError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
