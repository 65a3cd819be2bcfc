"""``python -m gateway``: the OpenAI-compatible gateway in front of Triton."""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import logging
import sys
from pathlib import Path

from gateway.http import DEFAULT_CLIENT_TIMEOUT, DEFAULT_MAX_HEADER_BYTES
from serving.errors import ConfigError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gateway",
        description=(
            "Serve the OpenAI API (/v1/chat/completions, /v1/completions, /v1/embeddings, "
            "/v1/models) in front of Triton. Without --topology it fronts the one local "
            "server `make serve` starts and sends model=auto to its router model; with a "
            "topology file it balances pools of Triton replicas and routes auto requests "
            "itself with the router's policy. See docs/gateway.md."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind; a non-loopback address requires --api-keys",
    )
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--topology",
        type=Path,
        help="YAML file of pools (name, models, replicas or dns, strategy, max_in_flight, "
        "...); without it: single placement over --triton-grpc",
    )
    parser.add_argument(
        "--triton-grpc",
        default="127.0.0.1:8001",
        help="single placement: the local Triton's gRPC host:port",
    )
    parser.add_argument(
        "--triton-health",
        default="http://127.0.0.1:8003/health/ready",
        help="single placement: the launcher's deep readiness URL ('' to probe Triton itself)",
    )
    parser.add_argument(
        "--api-keys",
        type=Path,
        help="YAML file of sha256-hashed API keys with per-key limits (see --hash-key); "
        "without it the gateway is open and refuses to bind a non-loopback address",
    )
    parser.add_argument(
        "--routing-config",
        type=Path,
        help="the router model's config.pbtxt to read the routing policy from "
        "(default: the topology's routing_config, else model_repository/router/config.pbtxt)",
    )
    parser.add_argument(
        "--tokenizer-dir",
        type=Path,
        help="folder with the tiers' tokenizer.json and chat template (default: exported "
        "once from the servers' tokenizer into ~/.cache/triton-llm-stack)",
    )
    parser.add_argument(
        "--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413"
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        help="cap on max_tokens per request (default and ceiling: the tiers' max_output_len)",
    )
    parser.add_argument(
        "--first-token-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for an upstream's first (or next) response before a 504",
    )
    parser.add_argument(
        "--classify-timeout",
        type=float,
        default=10.0,
        help="seconds for the intent classifier's answer; after it (or when the classifier "
        "is down) 'auto' routes as for low confidence",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM/Ctrl-C, seconds to let streams in flight finish",
    )
    parser.add_argument(
        "--client-timeout",
        type=float,
        default=DEFAULT_CLIENT_TIMEOUT,
        help="seconds a client has to send a request's headers, and again its body; "
        "a client that stalls gets 408 and its connection is closed",
    )
    parser.add_argument(
        "--max-header-bytes",
        type=int,
        default=DEFAULT_MAX_HEADER_BYTES,
        help="larger request headers get 431 and the connection is closed",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    parser.add_argument(
        "--hash-key",
        action="store_true",
        help="read an API key from stdin, print its key-file entry, and exit",
    )
    return parser.parse_args(argv)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.hash_key:
        key = sys.stdin.readline().strip()
        if not key:
            print("error: no key on stdin", file=sys.stderr)
            return 2
        print(f"  - name: CHANGE-ME\n    sha256: {hashlib.sha256(key.encode()).hexdigest()}")
        return 0
    if args.api_keys is None and not is_loopback(args.host):
        print(
            f"error: refusing to bind {args.host} without --api-keys: an open gateway is "
            "only allowed on a loopback address",
            file=sys.stderr,
        )
        return 2

    import uvicorn

    from gateway.app import JsonFormatter, create_app
    from gateway.auth import KeyStore
    from gateway.config import RoutingSettings, Topology
    from gateway.http import GuardedHttpToolsProtocol
    from gateway.service import Gateway
    from gateway.tokenizer import load

    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler], force=True)
    log = logging.getLogger("gateway")
    try:
        if args.topology is not None:
            topology = Topology.load(args.topology)
        else:
            topology = Topology.single(args.triton_grpc, args.triton_health or None)
        routing = RoutingSettings.from_file(args.routing_config or topology.routing_config)
        tokenizer = load(args.tokenizer_dir or topology.tokenizer_dir, routing.tokenizer_dir)
        keys = KeyStore.load(args.api_keys) if args.api_keys is not None else None
        gateway = Gateway(
            topology,
            routing,
            tokenizer,
            first_token_timeout=args.first_token_timeout,
            classify_timeout=args.classify_timeout,
            max_tokens_cap=args.max_tokens,
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if keys is None:
        log.warning(
            "no --api-keys: the gateway is OPEN (no authentication) on loopback %s:%d",
            args.host,
            args.port,
        )
    log.info(
        "gateway starting",
        extra={
            "fields": {
                "url": f"http://{args.host}:{args.port}/v1",
                "placement": topology.placement.value,
                "pools": {p.name: [r.url for r in p.replicas] or p.dns for p in topology.pools},
                "routing_config": str(routing.source),
                "api_keys": len(keys) if keys is not None else 0,
            }
        },
    )
    app = create_app(
        gateway, keys, max_body_bytes=args.max_body_bytes, client_timeout=args.client_timeout
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        http=GuardedHttpToolsProtocol.with_limits(args.client_timeout, args.max_header_bytes),
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=args.drain_timeout,
        timeout_keep_alive=30,
    )
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
