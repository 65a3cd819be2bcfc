"""``python -m serving``: start Triton on the model repository and print where to send requests."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

from serving.launcher import (
    DEFAULT_REPOSITORY,
    PROFILES,
    LaunchError,
    LaunchOptions,
    TritonLauncher,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m serving",
        description=(
            "Start the bundled tritonserver on the model repository with explicit model "
            "control, load the models, supervise their Python stubs (a dead stub's model is "
            "reloaded) and serve a deep readiness check on --health-port."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--profile",
        choices=PROFILES,
        default=PROFILES[0],
        help="cpu: config.pbtxt everywhere; h100: configs/h100.pbtxt "
        "(Triton's --model-config-name) with TensorRT-LLM engines",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address every endpoint binds to (Triton's own default is 0.0.0.0)",
    )
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument(
        "--health-port",
        type=int,
        default=8003,
        help="deep readiness (/health/ready) and liveness (/health/live) endpoint",
    )
    parser.add_argument(
        "--models",
        type=lambda s: [m for m in s.split(",") if m],
        help="comma-separated subset to load (ensembles bring their steps); default all",
    )
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--log-file", type=Path, help="server log (default: a file in $TMPDIR)")
    parser.add_argument(
        "--tritonserver",
        type=Path,
        help="use this tritonserver binary (e.g. /opt/tritonserver/bin/tritonserver "
        "in the NGC container) instead of the one bundled in nvidia-pytriton",
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for the server and the models",
    )
    parser.add_argument("--log-verbose", type=int, default=0, help="Triton's --log-verbose level")
    return parser.parse_args(argv)


def banner(launcher: TritonLauncher) -> str:
    o = launcher.options
    lines = [
        f"Triton is serving {len(launcher.wanted)} models ({o.profile} profile): "
        + ", ".join(launcher.wanted),
        f"  HTTP     http://{launcher.http_url}",
        f"  gRPC     {launcher.grpc_url}",
        f"  metrics  {launcher.metrics_url}",
        f"  health   {launcher.health_url}  (deep: fails while any model is broken)",
        f"  log      {launcher.log_path}",
        "",
        "Try:",
    ]
    if "router" in launcher.wanted:
        lines.append(
            f"  curl -sN -X POST http://{launcher.http_url}/v2/models/router/generate_stream "
            '-d \'{"text_input": "Summarize the following text in one sentence.\\n\\nThe city '
            'council voted on Tuesday to expand the bike lane network by 40 km.", '
            '"max_tokens": 48, "stream": true}\''
        )
    if "embedding" in launcher.wanted:
        lines.append(
            f"  curl -s -X POST http://{launcher.http_url}/v2/models/embedding/infer "
            '-d \'{"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", '
            '"data": ["hello world"]}]}\''
        )
    lines.append("Ctrl-C stops the server and its stubs.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    options = LaunchOptions(
        profile=args.profile,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        models=args.models,
        repository=args.model_repository,
        log_path=args.log_file,
        tritonserver=args.tritonserver,
        ready_timeout=args.ready_timeout,
        log_verbose=args.log_verbose,
    )
    # SIGTERM (docker stop, Kubernetes) shuts down like Ctrl-C, also while models load.
    signal.signal(signal.SIGTERM, _interrupt)
    launcher = TritonLauncher(options)
    try:
        launcher.start(on_progress=lambda msg: print(msg, flush=True))
        print(banner(launcher), flush=True)
        while launcher.process is not None and launcher.process.poll() is None:
            time.sleep(0.5)
        print("error: tritonserver exited unexpectedly:\n" + launcher.log_tail(), file=sys.stderr)
        return 1
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping tritonserver ...", flush=True)
        return 0
    finally:
        launcher.stop()


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
