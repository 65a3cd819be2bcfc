"""Compare client-side balancing strategies on the same load across local replicas.

Starts ``--replicas`` tritonservers through :mod:`serving.launcher`, each serving the
small tier's text ensemble (``llm_small_text``) from a copy of the model repository in
which the engine is cut down to share the machine fairly (``torch_threads`` 1 and
``--slots`` active sequences per replica). With ``--simulated`` the replicas serve the
``ticker`` test model as a miniature batching engine (slots, a shared token rate, no
compute), which isolates the balancing decision from the replicas' fight for 2 cores. Then the same closed-loop load, Dolly prompts
with a mix of short and long output caps (the seed workload, where long answers pile up
on one replica), is driven once per strategy through :class:`client.AsyncReplicaPool`,
and p50/p99 TTFT and ICL (inter-chunk latency) are reported per strategy.

Results: ``benchmarks/results/balancing[.simulated].{json,md}``. Run under the lock::

    flock /tmp/bench.lock .venv/bin/python benchmarks/balancing.py
    flock /tmp/bench.lock .venv/bin/python benchmarks/balancing.py --simulated --replicas 3 \\
        --users 24 --duration 40 --output-tokens 16,16,16,256

Prompts derived from the Databricks Dolly 15k sample (CC BY-SA 3.0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from client.balancing import AsyncReplicaPool, Strategy
from client.loadgen import LoadShape, Target, request_stream, run
from client.metrics import summarize
from client.workload import add_closed_loop_arguments, jobs, load_prompts
from serving.launcher import DEFAULT_REPOSITORY, LaunchOptions, TritonLauncher
from serving.repository import configured_copy

ROOT = Path(__file__).resolve().parents[1]
DOLLY = ROOT.parent / "shared" / "data" / "dolly_sample.jsonl"
RESULTS = ROOT / "benchmarks" / "results" / "balancing"
TICKER_REPO = ROOT / "tests" / "fixtures" / "ticker_repo"
MODEL = "llm_small_text"
ENGINE = "llm_small"
console = Console(stderr=True)


@dataclass(frozen=True)
class Setup:
    """What the replicas serve and how the load is shaped, per mode."""

    repository: Path
    model: str
    description: str


def real_setup(where: Path, args: argparse.Namespace) -> Setup:
    repo = configured_copy(
        DEFAULT_REPOSITORY,
        where,
        {ENGINE: {"torch_threads": "1", "max_active_sequences": str(args.slots)}},
    )
    return Setup(
        repo,
        MODEL,
        (
            f"each serving `{MODEL}` (SmolLM2-135M on CPU) with `torch_threads` 1 and "
            f"{args.slots} active sequences. All replicas share the machine's 2 cores."
        ),
    )


def simulated_setup(where: Path, args: argparse.Namespace) -> Setup:
    params = {
        "interval_ms": "5",
        "slots": str(args.slots),
        "capacity_tokens_per_s": f"{args.capacity:g}",
    }
    repo = configured_copy(TICKER_REPO, where, {"ticker": params})
    return Setup(
        repo,
        "ticker",
        (
            f"each serving the `ticker` model as a simulated in-flight batching engine: "
            f"{args.slots} slots (more requests wait: TTFT), {args.capacity:g} tokens/s shared "
            "by the running sequences, no real compute, so replicas do not compete for CPU."
        ),
    )


async def one_strategy(
    strategy: Strategy,
    servers: list[TritonLauncher],
    model: str,
    prompts: list[str],
    args: argparse.Namespace,
    duration: float,
) -> dict[str, Any]:
    pool = AsyncReplicaPool(
        [s.grpc_url for s in servers],
        health_urls=[s.health_url for s in servers],
        strategy=strategy,
        timeout=600,
    )
    shape = LoadShape(users=args.users, duration=duration, warmup=args.warmup, seed=args.seed)

    def send(job: Any) -> Any:
        return request_stream(pool, Target.LLM_SMALL, job, model=model, temperature=0.0)

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
        f"# Balancing strategies on the same load ({cfg['mode']})",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{cfg['replicas']} local tritonservers started by the launcher, {cfg['setup']} "
        f"Closed loop, {cfg['users']} users, {cfg['duration_s']:g} s per strategy after "
        f"{cfg['warmup']} warm-up requests; Dolly prompts, output caps drawn from "
        f"{cfg['output_tokens']} (short and long mixed), temperature 0; strategies run one "
        "after another against the same servers.",
        "",
        "| strategy | TTFT p50 | TTFT p90 | TTFT p99 | ICL p50 | ICL p99 | e2e p50 | e2e p99 | "
        "req/s | tok/s | requests per replica | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["strategies"]:
        t, i, e = s["ttft_ms"], s["inter_chunk_latency_ms"], s["e2e_ms"]
        lines.append(
            f"| {s['strategy']} | {t['p50']:.0f} | {t['p90']:.0f} | {t['p99']:.0f} | "
            f"{i['p50']:.0f} | {i['p99']:.0f} | {e['p50']:.0f} | {e['p99']:.0f} | "
            f"{s['requests_per_s']:.2f} | {s['output_tokens_per_s']:.1f} | "
            f"{s['requests_per_replica']} | {s['errors'] or 'none'} |"
        )
    lines += [
        "",
        "Latencies in ms. Prompts: Databricks Dolly 15k sample (CC BY-SA 3.0).",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--simulated",
        action="store_true",
        help="replicas serve the ticker as a simulated batching engine instead of SmolLM2",
    )
    parser.add_argument("--replicas", type=int, default=2, choices=[2, 3])
    parser.add_argument("--slots", type=int, default=4, help="active sequences per replica")
    parser.add_argument(
        "--capacity", type=float, default=100.0, help="simulated: tokens/s per replica"
    )
    add_closed_loop_arguments(
        parser, users=10, duration=75.0, output_tokens=[16, 16, 16, 160], per="strategy"
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="results prefix (default benchmarks/results/balancing[.simulated])",
    )
    args = parser.parse_args()
    mode = "simulated engine" if args.simulated else "SmolLM2 on CPU"
    prefix = args.output or Path(f"{RESULTS}{'.simulated' if args.simulated else ''}")

    prompts = load_prompts(DOLLY)
    with tempfile.TemporaryDirectory(prefix="balancing-") as tmp:
        setup = (simulated_setup if args.simulated else real_setup)(Path(tmp), args)
        launchers = [
            TritonLauncher(
                LaunchOptions.on_free_ports(
                    repository=setup.repository,
                    models=[setup.model],
                    log_path=Path(tmp) / f"replica{i}.log",
                )
            )
            for i in range(args.replicas)
        ]
        console.print(f"starting {args.replicas} replicas ...")
        try:
            with ThreadPoolExecutor(args.replicas) as pool:
                list(pool.map(lambda launcher: launcher.start(), launchers))
            if args.prewarm > 0:
                # Unrecorded load first: model warm-up and any early stub restart by the
                # launcher's supervisor happen here, not inside the first strategy's window.
                console.print(f"pre-warming for {args.prewarm:g} s (not recorded) ...")
                asyncio.run(
                    one_strategy(
                        Strategy.ROUND_ROBIN, launchers, setup.model, prompts, args, args.prewarm
                    )
                )
            results = []
            for strategy in Strategy:
                console.print(f"running {strategy.value} for {args.duration:g} s ...")
                results.append(
                    asyncio.run(
                        one_strategy(strategy, launchers, setup.model, prompts, args, args.duration)
                    )
                )
        finally:
            for launcher in launchers:
                launcher.stop()

    report = {
        "command": shlex.join(["python", *sys.argv]),
        "config": {
            "mode": mode,
            "setup": setup.description,
            "replicas": args.replicas,
            "slots": args.slots,
            "users": args.users,
            "duration_s": args.duration,
            "warmup": args.warmup,
            "prewarm_s": args.prewarm,
            "output_tokens": args.output_tokens,
            "model": setup.model,
            "capacity_tokens_per_s": args.capacity if args.simulated else None,
        },
        "strategies": results,
    }
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.json").write_text(json.dumps(report, indent=2) + "\n")
    Path(f"{prefix}.md").write_text(markdown(report))

    table = Table(title=f"balancing strategies, {mode} (ms)")
    for column in (
        "strategy",
        "TTFT p50",
        "TTFT p99",
        "ICL p50",
        "ICL p99",
        "req/s",
        "per replica",
    ):
        table.add_column(column)
    for s in results:
        table.add_row(
            s["strategy"],
            f"{s['ttft_ms']['p50']:.0f}",
            f"{s['ttft_ms']['p99']:.0f}",
            f"{s['inter_chunk_latency_ms']['p50']:.0f}",
            f"{s['inter_chunk_latency_ms']['p99']:.0f}",
            f"{s['requests_per_s']:.2f}",
            str(s["requests_per_replica"]),
        )
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
