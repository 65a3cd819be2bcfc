"""``python -m client``: chat, generate, embed, classify, models and bench from the shell.

Every failure the user can cause (server down, wrong address, missing model, bad input,
malformed prompts file, impossible options) ends with one line on stderr and a non-zero
exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from client.balancing import AsyncReplicaPool, Strategy
from client.errors import ClientError
from client.loadgen import LoadShape, Target, request_stream, run
from client.metrics import RequestRecord, summarize
from client.report import summary_table, write_json, write_plots
from client.sdk import (
    DEFAULT_CLASSIFIER,
    DEFAULT_EMBEDDING,
    DEFAULT_ROUTER,
    DEFAULT_TIER_MODEL,
    AsyncClient,
    BaseAsyncClient,
    Generation,
)
from client.transport import DEFAULT_URLS, Protocol
from client.workload import WorkloadError, jobs, load_prompts, synthetic_prompts

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

err = Console(stderr=True, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _int_list(text: str) -> list[int]:
    return [_positive_int(part) for part in text.split(",") if part.strip()]


def _str_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _connection_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--url",
        help=f"server host:port (default {DEFAULT_URLS[Protocol.GRPC]} for grpc, "
        f"{DEFAULT_URLS[Protocol.HTTP]} for http)",
    )
    group.add_argument(
        "--protocol",
        choices=[p.value for p in Protocol],
        default=Protocol.GRPC.value,
        help="wire protocol (default: %(default)s)",
    )
    group.add_argument(
        "--timeout",
        type=_positive_float,
        default=300.0,
        help="client-side deadline per request in seconds (default: %(default)s)",
    )


def _generation_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt text")
    parser.add_argument("--max-tokens", type=_positive_int, help="cap on new tokens")
    parser.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy)")
    parser.add_argument("--no-stream", action="store_true", help="wait for the whole answer")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m client",
        description="Talk to the Triton LLM stack: routed chat, generation, embeddings, "
        "intent classification, model status, and load generation.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    chat = sub.add_parser(
        "chat",
        help="routed chat: the server picks the tier; streams tokens",
        description="Send a prompt through the router, which classifies it and streams it "
        "through the chosen tier. Prints the answer, then the intent and tier.",
    )
    _generation_args(chat)
    chat.add_argument("--intent", help="override the classifier's intent")
    chat.add_argument("--tier", help="override the tier (for example llm_large)")
    chat.add_argument("--model", default=DEFAULT_ROUTER, help="router model (default: %(default)s)")
    _connection_args(chat)

    generate = sub.add_parser(
        "generate",
        help="generate with one tier's ensemble (no routing)",
        description="Stream a prompt through one tier's text ensemble directly.",
    )
    _generation_args(generate)
    generate.add_argument(
        "--model", default=DEFAULT_TIER_MODEL, help="tier ensemble (default: %(default)s)"
    )
    _connection_args(generate)

    embed = sub.add_parser("embed", help="embed texts (384-dim, L2-normalised)")
    embed.add_argument("texts", nargs="+", help="one or more texts")
    embed.add_argument("--model", default=DEFAULT_EMBEDDING, help="(default: %(default)s)")
    embed.add_argument("--json", action="store_true", help="print the full vectors as JSON")
    _connection_args(embed)

    classify = sub.add_parser("classify", help="intent of a prompt")
    classify.add_argument("text", help="the prompt text")
    classify.add_argument("--model", default=DEFAULT_CLASSIFIER, help="(default: %(default)s)")
    classify.add_argument("--json", action="store_true", help="print the result as JSON")
    _connection_args(classify)

    models = sub.add_parser("models", help="what the server has loaded, and what failed")
    models.add_argument("--json", action="store_true", help="print the index as JSON")
    _connection_args(models)

    _bench_parser(sub)
    return parser


def _bench_parser(sub: Any) -> None:
    bench = sub.add_parser(
        "bench",
        help="load generator: TTFT, ITL, ICL, e2e, throughput, goodput (aiperf's names)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Closed loop (--users) or open loop (--rate) load against the router, a "
        "tier ensemble or the embedding model. Warm-up requests are not counted. Writes "
        "bench.json, latency_cdf.png and ttft_over_time.png to --output-dir.",
    )
    load = bench.add_argument_group("load shape")
    mode = load.add_mutually_exclusive_group()
    mode.add_argument("--users", type=_positive_int, help="closed loop: concurrent users")
    mode.add_argument("--rate", type=_positive_float, help="open loop: mean requests/s")
    load.add_argument(
        "--burstiness",
        type=_positive_float,
        default=1.0,
        help="open loop: gamma shape of inter-arrivals (1 = Poisson, <1 burstier)",
    )
    load.add_argument("--max-concurrency", type=_positive_int, help="open loop: in-flight cap")
    load.add_argument("--duration", type=_positive_float, help="seconds to run")
    load.add_argument("--requests", type=_positive_int, help="requests to send")
    load.add_argument("--warmup", type=int, default=4, help="uncounted warm-up requests")
    load.add_argument("--seed", type=int, default=0, help="seed for prompts/lengths/arrivals")

    work = bench.add_argument_group("workload")
    work.add_argument("--target", choices=[t.value for t in Target], default=Target.ROUTER.value)
    work.add_argument("--model", help="model name if it differs from the target's default")
    source = work.add_mutually_exclusive_group()
    source.add_argument(
        "--prompts",
        type=Path,
        help="JSONL prompts (fields prompt/text, or Dolly instruction+context), e.g. "
        "../shared/data/dolly_sample.jsonl",
    )
    source.add_argument(
        "--synthetic-words", type=_positive_int, default=32, help="synthetic prompt length"
    )
    work.add_argument(
        "--output-tokens",
        type=_int_list,
        help="max_tokens per request: one value (fixed) or a comma list drawn at random "
        "(mixed, e.g. 16,256); omit for the natural length",
    )
    work.add_argument("--temperature", type=float, help="sampling temperature")

    sla = bench.add_argument_group("SLA (goodput)")
    sla.add_argument("--sla-ttft-ms", type=_positive_float, help="TTFT limit per request")
    sla.add_argument(
        "--sla-itl-ms",
        type=_positive_float,
        help="inter-token latency limit per request (aiperf's ITL: decode time per token)",
    )

    replicas = bench.add_argument_group("replicas")
    replicas.add_argument("--replicas", type=_str_list, help="comma list of host:port")
    replicas.add_argument(
        "--health-urls",
        type=_str_list,
        help="comma list of deep readiness URLs, one per replica "
        "(http://host:HEALTH_PORT/health/ready)",
    )
    replicas.add_argument(
        "--strategy", choices=[s.value for s in Strategy], default=Strategy.ROUND_ROBIN.value
    )

    output = bench.add_argument_group("output")
    output.add_argument("--output-dir", type=Path, default=Path("bench-results"))
    output.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    output.add_argument("--json", action="store_true", help="print the summary JSON to stdout")
    _connection_args(bench)


def _client(args: argparse.Namespace) -> BaseAsyncClient:
    protocol = Protocol(args.protocol)
    replicas = getattr(args, "replicas", None)
    if replicas:
        return AsyncReplicaPool(
            replicas,
            protocol=protocol,
            strategy=args.strategy,
            health_urls=args.health_urls,
            timeout=args.timeout,
        )
    return AsyncClient(args.url, protocol, timeout=args.timeout)


def _routing_line(result: Generation) -> str:
    parts = []
    if result.intent:
        conf = f" ({result.confidence:.2f})" if result.confidence is not None else ""
        parts.append(f"intent: {result.intent}{conf}")
    if result.model:
        parts.append(f"tier: {result.model}")
    tokens = result.num_output_tokens if result.num_output_tokens is not None else result.chunks
    parts.append(f"{tokens} tokens")
    return " · ".join(parts)


async def _generation(client: BaseAsyncClient, args: argparse.Namespace) -> None:
    options: dict[str, Any] = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "model": args.model,
    }
    call = client.generate
    if args.command == "chat":
        call = client.chat
        options.update(intent=args.intent, tier=args.tier)
    if args.json or args.no_stream:
        result = await call(args.prompt, **options)
        if args.json:
            out.print_json(data=vars(result))
            return
        out.print(result.text, markup=False)
    else:
        result = Generation()
        async for chunk in call(args.prompt, stream=True, **options):
            result.add(chunk)
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    err.print(f"[dim]{_routing_line(result)}[/dim]")


async def _embed(client: BaseAsyncClient, args: argparse.Namespace) -> None:
    vectors = await client.embed(args.texts, model=args.model)
    if args.json:
        out.print_json(data={"embeddings": vectors.tolist()})
        return
    for text, vector in zip(args.texts, vectors, strict=True):
        head = ", ".join(f"{v:+.4f}" for v in vector[:6])
        out.print(f"[{head}, …] dim={vector.shape[0]}  {text[:60]!r}", markup=False)


async def _classify(client: BaseAsyncClient, args: argparse.Namespace) -> None:
    result = await client.classify(args.text, model=args.model)
    if args.json:
        out.print_json(data=vars(result))
        return
    probs = ", ".join(f"{p:.3f}" for p in result.probabilities)
    out.print(f"{result.intent} (confidence {result.confidence:.3f}; probabilities {probs})")


async def _models(client: BaseAsyncClient, args: argparse.Namespace) -> None:
    rows = await client.models()
    if args.json:
        out.print_json(data=[vars(r) for r in rows])
        return
    table = Table(title="models")
    for column in ("name", "version", "state", "reason"):
        table.add_column(column)
    for row in rows:
        style = "green" if row.ready else "red"
        table.add_row(row.name, row.version, f"[{style}]{row.state}[/{style}]", row.reason)
    out.print(table)


async def _bench(client: BaseAsyncClient, args: argparse.Namespace) -> None:
    shape = LoadShape(
        users=args.users if args.users or args.rate else 8,
        rate=args.rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        duration=args.duration if args.duration or args.requests else 60.0,
        requests=args.requests,
        warmup=args.warmup,
        seed=args.seed,
    )
    shape.validate()
    target = Target(args.target)
    prompts = (
        load_prompts(args.prompts)
        if args.prompts
        else synthetic_prompts(args.synthetic_words, 1000, args.seed)
    )
    stream_of_jobs = jobs(prompts, args.output_tokens, args.seed)

    def send(job: Any) -> Any:
        return request_stream(client, target, job, model=args.model, temperature=args.temperature)

    title = f"{args.model or target.value}, " + (
        f"{shape.users} users"
        if shape.users
        else f"{shape.rate} req/s (burstiness {shape.burstiness})"
    )
    counts = {"done": 0, "errors": 0}
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    ) as progress:
        task = progress.add_task(f"warm-up ({shape.warmup} requests)", total=None, status="")
        started = {"at": 0.0}

        def on_start() -> None:
            started["at"] = time.perf_counter()
            total = shape.duration if shape.duration is not None else shape.requests
            progress.update(task, description=f"bench {title}", total=total, completed=0)

        def on_record(record: RequestRecord) -> None:
            counts["done"] += 1
            counts["errors"] += 0 if record.ok else 1
            status = f"{counts['done']} done, {counts['errors']} errors"
            progress.update(task, status=status)
            if shape.duration is None:
                progress.update(task, completed=counts["done"])

        async def ticker() -> None:
            while True:
                await asyncio.sleep(0.25)
                if started["at"] and shape.duration is not None:
                    elapsed = min(time.perf_counter() - started["at"], shape.duration)
                    progress.update(task, completed=elapsed)

        tick = asyncio.get_running_loop().create_task(ticker())
        try:
            result = await run(send, stream_of_jobs, shape, on_record=on_record, on_start=on_start)
        finally:
            tick.cancel()

    summary = summarize(result.records, result.wall_time, args.sla_ttft_ms, args.sla_itl_ms)
    if isinstance(client, AsyncReplicaPool):
        summary["replicas"] = {
            r.url: {"sent": r.sent, "healthy": r.healthy} for r in client.replicas
        }
    config = {
        "command": shlex.join(["python", "-m", "client", *args.argv]),
        "target": target.value,
        "model": args.model or target.value,
        "protocol": args.protocol,
        "url": args.url,
        "replicas": args.replicas,
        "strategy": args.strategy if args.replicas else None,
        "load": vars(shape),
        "prompts": str(args.prompts) if args.prompts else f"synthetic {args.synthetic_words} words",
        "output_tokens": args.output_tokens,
    }
    json_path = args.output_dir / "bench.json"
    write_json(json_path, summary, config, result.records)
    paths = [] if args.no_plots else write_plots(args.output_dir, result.records, title)
    if args.json:
        out.print_json(data=summary)
    else:
        out.print(summary_table(summary, title))
    err.print(f"wrote {json_path}" + "".join(f", {p}" for p in paths))


COMMANDS = {
    "chat": _generation,
    "generate": _generation,
    "embed": _embed,
    "classify": _classify,
    "models": _models,
    "bench": _bench,
}


async def _main(args: argparse.Namespace) -> None:
    async with _client(args) as client:
        await COMMANDS[args.command](client, args)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        asyncio.run(_main(args))
    except (ClientError, WorkloadError, ValueError) as exc:
        target = (
            args.replicas
            if getattr(args, "replicas", None)
            else (args.url or DEFAULT_URLS[Protocol(args.protocol)])
        )
        kind = type(exc).__name__
        err.print(f"[red]error[/red] ({kind}, {target}): {exc}", markup=True, highlight=False)
        return EXIT_ERROR
    except OSError as exc:
        err.print(f"[red]error[/red]: {exc}", highlight=False)
        return EXIT_ERROR
    except KeyboardInterrupt:
        err.print("interrupted")
        return EXIT_INTERRUPTED
    return 0
