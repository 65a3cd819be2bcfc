"""The seed experiment: two replicas of the small tier behind nginx, Envoy and the gateway.

Two tritonservers (started by the launcher, from a copy of the repository with
``torch_threads`` 1 and ``--slots`` active sequences per replica) serve ``llm_small_text``
(which loads ``llm_small``). The same closed-loop load (``--users`` users, Dolly prompts,
output caps drawn from ``--output-tokens``: short and long mixed, the case where long
answers pile up on one replica) runs for ``--duration`` seconds against each of:

- nginx round robin and nginx ``least_conn``, and Envoy ``LEAST_REQUEST``, balancing
  Triton's HTTP ``generate_stream`` (``llm_small_text``), driven by the project's client
  SDK over HTTP (:mod:`serving.proxies` says why HTTP);
- the gateway with each strategy (``round_robin``, ``least_requests``, ``power_of_two``),
  driven over the OpenAI API (streamed chat completions, the same chat template) with the
  official SDK (:mod:`client.openai_load`).

Both paths are timed by :func:`client.metrics.measure` and summarised by
:func:`client.metrics.summarize`. Requests per replica come from each Triton's own
``nv_inference_request_success`` counter for ``llm_small``, read before and after each
configuration.

Results: ``benchmarks/results/replicas.{json,md}`` and ``replicas_*.png``. The full run is
``make bench-replicas`` (600 s per configuration); a short one::

    flock /tmp/bench.lock .venv/bin/python benchmarks/replicas.py --duration 60

Prompts derived from the Databricks Dolly 15k sample (CC BY-SA 3.0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

# benchmarks/gateway.py would shadow the gateway package: the repository root goes first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console
from rich.table import Table

from client.balancing import Strategy
from client.loadgen import LoadShape, Target, request_stream, run
from client.metrics import summarize
from client.openai_load import Api, openai_load
from client.sdk import AsyncClient
from client.transport import Protocol
from client.workload import add_closed_loop_arguments, jobs, load_prompts
from gateway import process as gateway_process
from serving.launcher import DEFAULT_REPOSITORY, LaunchOptions, TritonLauncher, free_port
from serving.proxies import Balancer, Proxy, ProxyError
from serving.repository import configured_copy

ROOT = Path(__file__).resolve().parents[1]
DOLLY = ROOT.parent / "shared" / "data" / "dolly_sample.jsonl"
RESULTS = ROOT / "benchmarks" / "results" / "replicas"
MODEL = "llm_small_text"
ENGINE = "llm_small"
console = Console(stderr=True)

#: Every configuration, in the order they run.
CONFIGS = [b.value for b in Balancer] + [f"gateway_{s.value}" for s in Strategy]


def gateway_topology(replicas: list[TritonLauncher], strategy: Strategy, slots: int) -> dict:
    """One ``small`` pool over the replicas. ``max_in_flight`` = the engine's slots: what
    does not fit waits in the gateway's one queue and goes to the first replica with a
    free slot, instead of in one replica's engine queue chosen on arrival."""
    return {
        "pools": [
            {
                "name": "small",
                "models": [ENGINE],
                "replicas": [{"url": r.grpc_url, "health_url": r.health_url} for r in replicas],
                "strategy": strategy.value,
                "max_in_flight": slots,
                "max_queue": 1024,
                "max_wait_s": 900,
            }
        ]
    }


def run_load(send: Callable[[Any], Any], prompts: list[str], args: argparse.Namespace, secs: float):
    shape = LoadShape(users=args.users, duration=secs, warmup=args.warmup, seed=args.seed)
    return run(send, jobs(prompts, args.output_tokens, args.seed), shape)


async def through_proxy(proxy: Proxy, prompts: list[str], args: argparse.Namespace, secs: float):
    client = AsyncClient(proxy.url, protocol=Protocol.HTTP, timeout=900)
    try:
        return await run_load(
            lambda job: request_stream(client, Target.LLM_SMALL, job, model=MODEL, temperature=0.0),
            prompts,
            args,
            secs,
        )
    finally:
        await client.close()


async def through_gateway(base_url: str, prompts: list[str], args: argparse.Namespace, secs: float):
    shape = LoadShape(users=args.users, duration=secs, warmup=args.warmup, seed=args.seed)
    return await openai_load(
        base_url,
        jobs(prompts, args.output_tokens, args.seed),
        shape,
        model=ENGINE,
        endpoint=Api.CHAT,
        timeout=900,
    )


def gateway_ejections(metrics_url: str) -> dict[str, int]:
    """Replica url -> how often the gateway ejected it (its ``gateway_ejections_total``)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    out: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("gateway_ejections_total{"):
            replica = line.split('replica="', 1)[1].split('"', 1)[0]
            out[replica] = out.get(replica, 0) + int(float(line.rsplit(" ", 1)[1]))
    return out


def one_config(
    name: str,
    replicas: list[TritonLauncher],
    prompts: list[str],
    args: argparse.Namespace,
    where: Path,
    secs: float,
) -> dict[str, Any]:
    """Start the balancer for ``name``, drive the load, stop it; the summary."""
    before = [r.requests_succeeded(ENGINE) for r in replicas]
    if name.startswith("gateway_"):
        strategy = Strategy(name.removeprefix("gateway_"))
        topology = where / f"{name}.topology.json"
        topology.write_text(json.dumps(gateway_topology(replicas, strategy, args.slots)))
        port = free_port()
        log = (where / f"{name}.log").open("ab")
        gateway = gateway_process.start(
            ["--port", str(port), "--topology", str(topology), "--first-token-timeout", "900"],
            f"http://127.0.0.1:{port}/health/ready",
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            result = asyncio.run(
                through_gateway(f"http://127.0.0.1:{port}/v1", prompts, args, secs)
            )
            ejections = gateway_ejections(f"http://127.0.0.1:{port}/metrics")
        finally:
            gateway_process.stop(gateway)
            log.close()
        protocol = "OpenAI chat (SSE) -> gateway -> Triton gRPC"
        ejected = {r.grpc_url: ejections.get(r.grpc_url, 0) for r in replicas}
    else:
        proxy = Proxy(Balancer(name), [r.http_url for r in replicas], free_port(), where / name)
        with proxy:
            result = asyncio.run(through_proxy(proxy, prompts, args, secs))
        protocol = "Triton HTTP generate_stream (SSE)"
        ejected = None  # nginx max_fails=0 and Envoy without health checks never eject
    after = [r.requests_succeeded(ENGINE) for r in replicas]
    summary = summarize(result.records, result.wall_time)
    summary["config"] = name
    summary["protocol"] = protocol
    summary["ejections_per_replica"] = list(ejected.values()) if ejected else None
    summary["requests_per_replica"] = [round(a - b) for a, b in zip(after, before, strict=True)]
    summary["error_examples"] = sorted(
        {f"{r.error}: {r.error_message}"[:200] for r in result.records if not r.ok}
    )[:5]
    summary["ttft_s_by_start"] = [
        [round(r.start, 2), round(r.ttft, 3)] for r in result.records if r.ok and r.ttft
    ]
    return summary


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    rows = {s["config"]: s for s in report["results"]}
    lines = [
        "# Two replicas of the small tier behind nginx, Envoy and the gateway",
        "",
        f"Command: `{report['command']}`",
        "",
        f"2 tritonservers started by the launcher, each serving `{MODEL}` (SmolLM2-135M on "
        f"CPU) with `torch_threads` 1 and {cfg['slots']} active sequences (engine slots), on a "
        f"machine with {cfg['cpus']} cores shared with other work. Closed loop, {cfg['users']} "
        f"users, {cfg['duration_s']:g} s per configuration after {cfg['warmup']} warm-up "
        f"requests and a {cfg['prewarm_s']:g} s unrecorded pre-warm; Dolly prompts, output caps "
        f"drawn from {cfg['output_tokens']}, temperature 0. Configurations ran one after "
        "another against the same two servers.",
        "",
        "| configuration | TTFT p50 | TTFT p90 | TTFT p99 | ITL p50 | ITL p90 | ITL p99 | "
        "tok/s per user p50 | req/s | tok/s | requests per replica | gateway ejections | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in cfg["configs"]:
        s = rows[name]
        t, i, u = s["ttft_ms"], s["inter_token_latency_ms"], s["output_tokens_per_s_per_user"]
        per_user = "-" if u["p50"] is None else f"{u['p50']:.1f}"
        lines.append(
            f"| {name} | {_ms(t['p50'])} | {_ms(t['p90'])} | {_ms(t['p99'])} | "
            f"{_ms(i['p50'])} | {_ms(i['p90'])} | {_ms(i['p99'])} | {per_user} | "
            f"{s['requests_per_s']:.2f} | {s['output_tokens_per_s']:.1f} | "
            f"{s['requests_per_replica']} | {s.get('ejections_per_replica') or '-'} | "
            f"{s['errors'] or 'none'} |"
        )
    lines += ["", "Latencies in ms. " + report["goal"], ""]
    lines += ["![latency](replicas_latency.png)", "", "![ttft](replicas_ttft.png)", ""]
    lines += [
        "What the numbers mean, the sizing and the field report: "
        "[docs/kubernetes.md](../../docs/kubernetes.md#the-replica-experiment-benchmarksreplicaspy).",
        "",
        "Prompts: Databricks Dolly 15k sample (CC BY-SA 3.0).",
        "",
    ]
    return "\n".join(lines)


def goal_line(results: list[dict[str, Any]]) -> tuple[str, float | None]:
    by = {s["config"]: s for s in results}
    p2c = by.get("gateway_power_of_two", {}).get("ttft_ms", {}).get("p99")
    rr = by.get("nginx_round_robin", {}).get("ttft_ms", {}).get("p99")
    if not p2c or not rr:
        return (
            "Goal (gateway power_of_two TTFT p99 <= 0.8x nginx round robin's): not measured.",
            None,
        )
    ratio = p2c / rr
    verdict = "met" if ratio <= 0.8 else "not met"
    return (
        f"Goal: gateway power_of_two TTFT p99 / nginx round robin TTFT p99 = "
        f"{p2c:.0f} / {rr:.0f} ms = **{ratio:.2f}x** (target <= 0.8x: {verdict}).",
        ratio,
    )


def plots(report: dict[str, Any], prefix: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    results = {s["config"]: s for s in report["results"]}
    names = [n for n in report["config"]["configs"] if n in results]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.27
    x = np.arange(len(names))
    for ax, key, title in (
        (axes[0], "ttft_ms", "TTFT"),
        (axes[1], "inter_token_latency_ms", "inter-token latency (aiperf's ITL)"),
    ):
        for k, p in enumerate(("p50", "p90", "p99")):
            values = [(results[n][key][p] or 0) / 1000 for n in names]
            ax.bar(x + (k - 1) * width, values, width, label=p)
        ax.set_xticks(x, [n.replace("_", "\n", 1) for n in names], fontsize=8)
        ax.set_ylabel("seconds")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(
        f"2 replicas, {report['config']['users']} users, caps {report['config']['output_tokens']}"
    )
    fig.tight_layout()
    fig.savefig(f"{prefix}_latency.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for n in names:
        ttfts = np.sort([t for _, t in results[n]["ttft_s_by_start"]])
        if len(ttfts):
            ax.plot(ttfts, np.arange(1, len(ttfts) + 1) / len(ttfts), label=n)
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT distribution per configuration")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{prefix}_ttft.png", dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_closed_loop_arguments(
        parser, users=30, duration=600.0, output_tokens=[16, 16, 16, 256], per="configuration"
    )
    parser.add_argument("--slots", type=int, default=4, help="engine slots per replica")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=CONFIGS)
    parser.add_argument("--output", type=Path, default=RESULTS, help="results prefix")
    args = parser.parse_args()

    # Every balancer binary before anything starts: a missing Envoy must not end a
    # 70-minute run after its first two configurations.
    # (The pre-warm goes through nginx round robin.)
    balancers = {Balancer(n) for n in args.configs if n in set(Balancer)}
    if args.prewarm > 0:
        balancers.add(Balancer.NGINX_ROUND_ROBIN)
    try:
        for balancer in balancers:
            balancer.binary()
    except ProxyError as exc:
        console.print(str(exc), style="red", markup=False)
        return 2
    prompts = load_prompts(DOLLY)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="replicas-") as tmp:
        where = Path(tmp)
        repo = configured_copy(
            DEFAULT_REPOSITORY,
            where,
            {ENGINE: {"torch_threads": "1", "max_active_sequences": str(args.slots)}},
            models=[MODEL, ENGINE, "preprocessing", "postprocessing"],
        )
        replicas = [
            TritonLauncher(
                LaunchOptions.on_free_ports(
                    repository=repo, models=[MODEL], log_path=where / f"replica{i}.log"
                )
            )
            for i in range(2)
        ]
        try:
            for i, launcher in enumerate(replicas):  # from the main thread: dies with us
                console.print(f"starting replica {i} ...")
                launcher.start()
            if args.prewarm > 0:
                console.print(f"pre-warming for {args.prewarm:g} s through nginx (not recorded)")
                one_config("nginx_round_robin", replicas, prompts, args, where, args.prewarm)
            for name in args.configs:
                console.print(f"running {name} for {args.duration:g} s ...")
                started = time.monotonic()
                results.append(one_config(name, replicas, prompts, args, where, args.duration))
                console.print(f"  done in {time.monotonic() - started:.0f} s")
        finally:
            for launcher in replicas:
                launcher.stop()

    goal, ratio = goal_line(results)
    report = {
        "command": shlex.join(["python", *sys.argv]),
        "config": {
            "users": args.users,
            "slots": args.slots,
            "duration_s": args.duration,
            "warmup": args.warmup,
            "prewarm_s": args.prewarm,
            "output_tokens": args.output_tokens,
            "configs": args.configs,
            "cpus": os.cpu_count(),
            "model": MODEL,
            "seed": args.seed,
        },
        "prefix_name": args.output.name,
        "goal": goal,
        "p2c_over_nginx_rr_ttft_p99": ratio,
        "results": results,
    }
    prefix = args.output
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.json").write_text(json.dumps(report, indent=1) + "\n")
    Path(f"{prefix}.md").write_text(markdown(report))
    plots(report, prefix)

    table = Table(title="two replicas, TTFT / ITL (ms)")
    for column in ("config", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "per replica", "errors"):
        table.add_column(column)
    for s in results:
        table.add_row(
            s["config"],
            _ms(s["ttft_ms"]["p50"]),
            _ms(s["ttft_ms"]["p99"]),
            _ms(s["inter_token_latency_ms"]["p50"]),
            _ms(s["inter_token_latency_ms"]["p99"]),
            str(s["requests_per_replica"]),
            str(s["errors"] or ""),
        )
    Console().print(table)
    console.print(goal)
    return 0


if __name__ == "__main__":
    sys.exit(main())
