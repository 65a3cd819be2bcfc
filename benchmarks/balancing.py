"""Compare client-side balancing strategies on the same load across local replicas.

Starts ``--replicas`` tritonservers through :mod:`serving.launcher`, each serving the
small tier's text ensemble (``llm_small_text``) from a copy of the model repository in
which the engine is cut down to share the machine fairly (``torch_threads`` 1 and
``--slots`` active sequences per replica). Then the same closed-loop load, Dolly prompts
with a mix of short and long output caps (the seed workload, where long answers pile up
on one replica), is driven once per strategy through :class:`client.AsyncReplicaPool`,
and p50/p99 TTFT and ITL are reported per strategy.

Results: ``benchmarks/results/balancing.{json,md}``. Run under the shared lock::

    flock /tmp/bench.lock .venv/bin/python benchmarks/balancing.py

Prompts derived from the Databricks Dolly 15k sample (CC BY-SA 3.0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shlex
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from client.balancing import AsyncReplicaPool, Strategy
from client.loadgen import LoadShape, Target, request_stream, run
from client.metrics import summarize
from client.workload import jobs, load_prompts
from serving.launcher import DEFAULT_REPOSITORY, LaunchOptions, TritonLauncher

ROOT = Path(__file__).resolve().parents[1]
DOLLY = ROOT.parent / "shared" / "data" / "dolly_sample.jsonl"
RESULTS = ROOT / "benchmarks" / "results" / "balancing"
MODEL = "llm_small_text"
ENGINE = "llm_small"
console = Console(stderr=True)


def _set_param(config: str, key: str, value: str) -> str:
    pattern = rf'(parameters \{{ key: "{key}" value: \{{ string_value: ")[^"]*(")'
    updated, count = re.subn(pattern, rf"\g<1>{value}\g<2>", config)
    if count != 1:
        raise SystemExit(
            f"cannot set parameter {key} in {ENGINE}'s config; has its format changed?"
        )
    return updated


def replica_repository(where: Path, slots: int) -> Path:
    """A copy of the repository whose engine uses one thread and ``slots`` sequences."""
    repo = where / "repo"
    shutil.copytree(DEFAULT_REPOSITORY, repo, ignore=shutil.ignore_patterns("__pycache__"))
    config = repo / ENGINE / "config.pbtxt"
    text = _set_param(config.read_text(), "torch_threads", "1")
    config.write_text(_set_param(text, "max_active_sequences", str(slots)))
    return repo


async def one_strategy(
    strategy: Strategy, servers: list[TritonLauncher], prompts: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    pool = AsyncReplicaPool(
        [s.grpc_url for s in servers],
        health_urls=[s.health_url for s in servers],
        strategy=strategy,
        timeout=600,
    )
    shape = LoadShape(users=args.users, duration=args.duration, warmup=args.warmup, seed=args.seed)

    def send(job: Any) -> Any:
        return request_stream(pool, Target.LLM_SMALL, job, model=MODEL, temperature=0.0)

    try:
        result = await run(send, jobs(prompts, args.output_tokens, args.seed), shape)
    finally:
        await pool.close()
    summary = summarize(result.records, result.wall_time)
    ok = [r for r in result.records if r.ok]
    summary["strategy"] = strategy.value
    summary["requests_per_replica"] = [r.sent for r in pool.replicas]
    summary["mean_output_tokens"] = sum(r.output_tokens for r in ok) / max(len(ok), 1)
    return summary


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        "# Balancing strategies on the same load",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{cfg['replicas']} local tritonservers (launcher), each serving `{MODEL}` with "
        f"`torch_threads` 1 and {cfg['slots']} active sequences; closed loop, {cfg['users']} "
        f"users, {cfg['duration_s']:g} s per strategy after {cfg['warmup']} warm-up requests; "
        f"Dolly prompts, output caps drawn from {cfg['output_tokens']} (short and long mixed), "
        "temperature 0. All on one 2-core machine, so the replicas also share CPU.",
        "",
        "| strategy | TTFT p50 | TTFT p90 | TTFT p99 | ITL p50 | ITL p99 | e2e p50 | e2e p99 | "
        "req/s | tok/s | requests per replica |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["strategies"]:
        t, i, e = s["ttft_ms"], s["itl_ms"], s["e2e_ms"]
        lines.append(
            f"| {s['strategy']} | {t['p50']:.0f} | {t['p90']:.0f} | {t['p99']:.0f} | "
            f"{i['p50']:.0f} | {i['p99']:.0f} | {e['p50']:.0f} | {e['p99']:.0f} | "
            f"{s['requests_per_s']:.2f} | {s['output_tokens_per_s']:.1f} | "
            f"{s['requests_per_replica']} |"
        )
    lines += [
        "",
        "Latencies in ms. Errors: "
        + ", ".join(f"{s['strategy']}={s['errors'] or 'none'}" for s in report["strategies"]),
        "",
        "Prompts: Databricks Dolly 15k sample (CC BY-SA 3.0).",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--replicas", type=int, default=2, choices=[2, 3])
    parser.add_argument("--slots", type=int, default=4, help="active sequences per replica")
    parser.add_argument("--users", type=int, default=10, help="closed-loop users")
    parser.add_argument("--duration", type=float, default=75.0, help="seconds per strategy")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument(
        "--output-tokens",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[16, 16, 16, 160],
        help="output caps drawn at random per request",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    prompts = load_prompts(DOLLY)
    strategies = list(Strategy)
    with tempfile.TemporaryDirectory(prefix="balancing-") as tmp:
        repo = replica_repository(Path(tmp), args.slots)
        launchers = [
            TritonLauncher(
                LaunchOptions.on_free_ports(
                    repository=repo, models=[MODEL], log_path=Path(tmp) / f"replica{i}.log"
                )
            )
            for i in range(args.replicas)
        ]
        console.print(f"starting {args.replicas} replicas ...")
        try:
            with ThreadPoolExecutor(args.replicas) as pool:
                list(pool.map(lambda launcher: launcher.start(), launchers))
            results = []
            for strategy in strategies:
                console.print(f"running {strategy.value} for {args.duration:g} s ...")
                results.append(asyncio.run(one_strategy(strategy, launchers, prompts, args)))
        finally:
            for launcher in launchers:
                launcher.stop()

    report = {
        "command": shlex.join(["python", *sys.argv]),
        "config": {
            "replicas": args.replicas,
            "slots": args.slots,
            "users": args.users,
            "duration_s": args.duration,
            "warmup": args.warmup,
            "output_tokens": args.output_tokens,
            "model": MODEL,
        },
        "strategies": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(markdown(report))

    table = Table(title="balancing strategies (ms)")
    for column in (
        "strategy",
        "TTFT p50",
        "TTFT p99",
        "ITL p50",
        "ITL p99",
        "req/s",
        "per replica",
    ):
        table.add_column(column)
    for s in results:
        table.add_row(
            s["strategy"],
            f"{s['ttft_ms']['p50']:.0f}",
            f"{s['ttft_ms']['p99']:.0f}",
            f"{s['itl_ms']['p50']:.0f}",
            f"{s['itl_ms']['p99']:.0f}",
            f"{s['requests_per_s']:.2f}",
            str(s["requests_per_replica"]),
        )
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
