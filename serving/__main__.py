"""``python -m serving``: start Triton on the model repository and print where to send requests."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
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
from serving.runtime import process_group, run_foreground


def _model_ids(text: str) -> tuple[str, str]:
    model, sep, ids = text.partition("=")
    if not sep or not model or not ids:
        raise argparse.ArgumentTypeError(f"expected MODEL=IDS (e.g. llm_medium=0,1), got {text!r}")
    return model, ids


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
        "--log-stdout",
        action="store_true",
        help="also copy the server log to stdout (containers: docker/kubectl logs show it)",
    )
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
    parser.add_argument(
        "--gpu-device-ids",
        action="append",
        default=[],
        type=_model_ids,
        metavar="MODEL=IDS",
        help="place a TensorRT-LLM tier's instances on these GPUs as this container sees "
        "them (e.g. llm_medium=0,1), replacing its config's gpu_device_ids; repeatable",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM/Ctrl-C, seconds Triton lets requests in flight finish "
        "(its --exit-timeout-secs)",
    )
    parser.add_argument(
        "--gateway",
        action="store_true",
        help="also start the OpenAI-compatible gateway (python -m gateway) on --gateway-port, "
        "in front of this server; it stops with this process",
    )
    parser.add_argument("--gateway-port", type=int, default=8080)
    parser.add_argument(
        "--gateway-args",
        default="",
        help="more options for python -m gateway, as one shell-quoted string",
    )
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


#: The prompt format the classifier is trained on (instruction, blank line, text). The
#: shorter "Summarize: Triton batches requests so GPUs stay busy." makes SmolLM2-135M loop
#: "SmolLM: SmolLM: ..." under greedy decoding, in transformers' own float32 too.
EXAMPLE_PROMPT = (
    "Summarize the following text in one sentence.\n\n"
    "The city council voted on Tuesday to expand the bike lane network by 40 km."
)


def gateway_banner(base_url: str) -> str:
    """The OpenAI endpoint, a curl and a five-line openai SDK example, each runnable as is."""
    body = json.dumps(
        {
            "model": "auto",
            "messages": [{"role": "user", "content": EXAMPLE_PROMPT}],
            "max_tokens": 48,
            "stream": True,
        }
    )
    root = base_url.removesuffix("/v1")
    return "\n".join(
        [
            "",
            f"OpenAI-compatible gateway: {base_url}",
            "  models   auto, llm_small, llm_medium, llm_large, their aliases, embedding",
            f"  metrics  {root}/metrics    ready  {root}/health/ready",
            "",
            "Try (curl):",
            f"curl -sN {base_url}/chat/completions -H 'Content-Type: application/json' -d '{body}'",
            "",
            "Or the openai SDK (paste into a shell):",
            f"{sys.executable} - <<'EOF'",
            "from openai import OpenAI",
            f'client = OpenAI(base_url="{base_url}", api_key="unused-on-loopback")',
            f'messages = [{{"role": "user", "content": {json.dumps(EXAMPLE_PROMPT)}}}]',
            'for chunk in client.chat.completions.create(model="auto", messages=messages, max_tokens=48, stream=True):',
            '    print(chunk.choices[0].delta.content or "", end="", flush=True)',
            "EOF",
            "",
            "Ctrl-C stops the gateway (streams in flight may finish), then Triton.",
        ]
    )


def start_gateway(launcher: TritonLauncher, port: int, extra: str) -> subprocess.Popen[bytes]:
    """``python -m gateway`` in front of ``launcher``'s server; returns once it is ready."""
    from gateway import process as gateway_process  # only with --gateway (images may lack it)

    host = launcher.options.host
    args = ["--host", host, "--port", str(port), "--triton-grpc", launcher.grpc_url]
    args += ["--triton-health", launcher.health_url, *shlex.split(extra)]
    try:
        # Its own process group, as tritonserver has: a SIGINT to the terminal's group
        # reaches only this process, which stops the gateway first, then Triton. In that
        # group the gateway (uvicorn handles SIGINT itself) left on its own: where this
        # process ignores SIGINT (started in the background by a script) serve() then
        # reported "the gateway exited (code 0)" as an error and stopped Triton.
        return gateway_process.start(args, f"http://{host}:{port}/health/ready", **process_group())
    except RuntimeError as exc:
        raise LaunchError(str(exc)) from None


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
        drain_timeout=args.drain_timeout,
        echo_log=args.log_stdout,
        gpu_device_ids=dict(args.gpu_device_ids),
    )
    launcher = TritonLauncher(options)
    gateway: subprocess.Popen[bytes] | None = None

    def serve() -> int:
        nonlocal gateway
        launcher.start(on_progress=lambda msg: print(msg, flush=True))
        print(banner(launcher), flush=True)
        if args.gateway:
            print("starting the gateway ...", flush=True)
            gateway = start_gateway(launcher, args.gateway_port, args.gateway_args)
            print(gateway_banner(f"http://{args.host}:{args.gateway_port}/v1"), flush=True)
        while launcher.process is not None and launcher.process.poll() is None:
            if gateway is not None and gateway.poll() is not None:
                print(f"error: the gateway exited (code {gateway.returncode})", file=sys.stderr)
                return 1
            time.sleep(0.5)
        print("error: tritonserver exited unexpectedly:\n" + launcher.log_tail(), file=sys.stderr)
        return 1

    def stop() -> None:
        # The gateway first: it stops accepting and lets streams finish while Triton
        # still serves them.
        if gateway is not None:
            from gateway import process as gateway_process

            gateway_process.stop(gateway)
        launcher.stop()

    return run_foreground(serve, stop, (LaunchError,))


if __name__ == "__main__":
    sys.exit(main())
