"""Does tritonserver's own memory grow per request, and does it settle? (issue 13, item 4)

The soak (``benchmarks/soak.py``) once saw the busiest tritonserver end 10.9 % above its
warm-up sample while ``/dev/shm`` stayed flat, and a rerun with jemalloc preloaded grew
more. This asks whether requests are the cause (they are not: the heap settles, by
kilobytes; what moves it by megabytes is the widest burst and a stub dying mid-stream,
``benchmarks/triton_heap_peak.py``): one server with only ``llm_small`` (no gateway, no
faults), rounds of requests at a fixed concurrency, and after each round (load stopped,
1 s idle) tritonserver's resident memory split into anonymous (its heap), file and shared
pages (``/proc/<pid>/status``).

Variants, one after another on the same server: gRPC streams and HTTP
``generate_stream``, with short and longer answers, so that growth per request and per
streamed response can be told apart; the first variant runs again at the end to show
whether the slope settles.

Then the soak's two events that touch the model, each repeated on the same server with
the heap read after every cycle: a reload through model control (unload, load), and a
SIGKILLed stub that the supervisor brings back. Each cycle ends with ``--warmup``
requests, so the new stub is serving when the heap is read. A leak per event grows the
heap by the same amount every cycle; a one-time step does not repeat.

    python benchmarks/triton_memory.py                  # the committed run
    python benchmarks/triton_memory.py --rounds 3 --requests 30 --cycles 3   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/gateway.py would shadow the gateway package

import numpy as np  # noqa: E402

from benchmarks.soak_probe import cpu_name, status_kib  # noqa: E402
from client.sdk import AsyncClient  # noqa: E402
from client.transport import Protocol  # noqa: E402
from gateway.config import DEFAULT_ROUTER_CONFIG, RoutingSettings  # noqa: E402
from gateway.service import tier_inputs  # noqa: E402
from gateway.tokenizer import load as load_tokenizer  # noqa: E402
from serving.launcher import DEFAULT_REPOSITORY, LaunchOptions, TritonLauncher  # noqa: E402
from serving.repository import configured_copy  # noqa: E402
from serving.stubs import find_stubs  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "triton_memory"
MODEL = "llm_small"
PROMPT = "Write one sentence about lighthouses."


@dataclass(frozen=True)
class Variant:
    protocol: str
    tokens: int

    @property
    def name(self) -> str:
        return f"{self.protocol}, {self.tokens} tokens"


def slope_kib_per_request(points: list[tuple[int, int]]) -> float:
    """Least-squares KiB of growth per request over ``(requests so far, KiB)`` points."""
    if len(points) < 2:
        return float("nan")
    x = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    return float(np.polyfit(x, y, 1)[0])


def heap_summary(samples: list[dict[str, int]], x: str, per: str) -> dict[str, float]:
    """First and last ``RssAnon`` and ``VmRSS`` of ``samples`` (rows of :func:`status_kib`
    plus an ``x`` count), and ``anon_kib_per_<per>`` over all of them and over their first
    and second halves (the middle sample in both): settling growth against steady growth."""
    points = [(sample[x], sample["RssAnon"]) for sample in samples]
    half = len(points) // 2
    key = f"anon_kib_per_{per}"
    return {
        "anon_start_kib": samples[0]["RssAnon"],
        "anon_end_kib": samples[-1]["RssAnon"],
        "rss_start_kib": samples[0]["VmRSS"],
        "rss_end_kib": samples[-1]["VmRSS"],
        key: slope_kib_per_request(points),
        f"{key}_first_half": slope_kib_per_request(points[: half + 1]),
        f"{key}_second_half": slope_kib_per_request(points[half:]),
    }


def print_heap(label: str, row: dict[str, Any], per: str, digits: int) -> None:
    key = f"anon_kib_per_{per}"
    print(
        f"{label}: RssAnon {row['anon_start_kib']} -> {row['anon_end_kib']} KiB, "
        f"{row[key]:.{digits}f} KiB/{per} (halves {row[key + '_first_half']:.{digits}f}, "
        f"{row[key + '_second_half']:.{digits}f})",
        file=sys.stderr,
    )


async def run_requests(
    client: AsyncClient, inputs: dict[str, np.ndarray], count: int, concurrency: int
) -> int:
    """Send ``count`` streamed requests, ``concurrency`` at a time; the responses read."""
    todo = iter(range(count))
    responses = 0

    async def worker() -> None:
        nonlocal responses
        for _ in todo:
            async for _tensors in client.stream_tensors(MODEL, inputs):
                responses += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return responses


def kill_stub_and_revive(server: TritonLauncher) -> None:
    """SIGKILL the model's stub, as the soak does, and let the supervisor reload it."""
    assert server.pid is not None and server.supervisor is not None
    victim = next(s for s in find_stubs(server.pid) if s.model == MODEL)
    os.kill(victim.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while victim in find_stubs(server.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if server.supervisor.check() != [MODEL]:
        raise RuntimeError(f"the supervisor did not reload {MODEL} after its stub died")


def reload_through_model_control(server: TritonLauncher) -> None:
    server.unload(MODEL)
    server.load(MODEL)


EVENTS = {"reload": reload_through_model_control, "stub kill": kill_stub_and_revive}


async def measure_events(
    args: argparse.Namespace, server: TritonLauncher, inputs: dict[str, np.ndarray]
) -> list[dict[str, Any]]:
    """``args.cycles`` of each event, the heap read after each cycle's requests."""
    assert server.pid is not None
    client = AsyncClient(server.grpc_url, Protocol.GRPC)
    out = []
    try:
        for name, event in EVENTS.items():
            await asyncio.sleep(1.0)
            cycles = [{"cycle": 0, **status_kib(server.pid)}]
            for cycle in range(1, args.cycles + 1):
                await asyncio.to_thread(event, server)
                await run_requests(client, inputs, args.warmup, args.concurrency)
                await asyncio.sleep(1.0)
                cycles.append({"cycle": cycle, **status_kib(server.pid)})
            row = {
                "event": name,
                "cycles": args.cycles,
                **heap_summary(cycles, "cycle", "cycle"),
                "samples": cycles,
            }
            print_heap(name, row, "cycle", 0)
            out.append(row)
    finally:
        await client.close()
    return out


async def measure(
    args: argparse.Namespace, server: TritonLauncher
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    tokenizer = load_tokenizer(None, RoutingSettings.from_file(DEFAULT_ROUTER_CONFIG).tokenizer_dir)
    ids = tokenizer.encode(tokenizer.render([{"role": "user", "content": PROMPT}]))
    pid = server.pid
    assert pid is not None
    variants = [Variant(p, t) for p, t in args.variants]
    variants.append(variants[0])  # again at the end: does its slope settle?
    clients = {
        "grpc": AsyncClient(server.grpc_url, Protocol.GRPC),
        "http": AsyncClient(server.http_url, Protocol.HTTP),
    }
    out = []
    total = 0
    try:
        for variant in variants:
            client = clients[variant.protocol]
            inputs = tier_inputs(ids, variant.tokens, tokenizer.end_id, tokenizer.pad_id)
            await run_requests(client, inputs, args.warmup, args.concurrency)
            total += args.warmup
            await asyncio.sleep(1.0)
            rounds = [{"requests": total, "responses": 0, **status_kib(pid)}]
            started = time.monotonic()
            for _ in range(args.rounds):
                responses = await run_requests(client, inputs, args.requests, args.concurrency)
                total += args.requests
                await asyncio.sleep(1.0)
                rounds.append({"requests": total, "responses": responses, **status_kib(pid)})
            seconds = time.monotonic() - started
            row = {
                "variant": variant.name,
                "protocol": variant.protocol,
                "tokens": variant.tokens,
                "requests": args.rounds * args.requests,
                "responses_per_request": sum(r["responses"] for r in rounds)
                / (args.rounds * args.requests),
                "seconds": seconds,
                **heap_summary(rounds, "requests", "request"),
                "rounds": rounds,
            }
            print_heap(variant.name, row, "request", 3)
            out.append(row)
    finally:
        for client in clients.values():
            await client.close()
    events = []
    if args.cycles:
        inputs = tier_inputs(ids, variants[0].tokens, tokenizer.end_id, tokenizer.pad_id)
        events = await measure_events(args, server, inputs)
    return out, events


def write_report(
    rows: list[dict[str, Any]], events: list[dict[str, Any]], args: argparse.Namespace, cpu: str
) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join(sys.argv),
        "cpu": cpu,
        "args": vars(args) | {"variants": [asdict(Variant(*v)) for v in args.variants]},
    }
    report = {**meta, "variants": rows, "events": events}
    (RESULTS.with_suffix(".json")).write_text(json.dumps(report, indent=2))
    lines = [
        "# tritonserver's own memory per request (issue 13)",
        "",
        f"Command: `python benchmarks/triton_memory.py {' '.join(sys.argv[1:])}`  ",
        f"CPU: {cpu}",
        "",
        f"One tritonserver with only `{MODEL}` (SmolLM2-135M, CPU), {args.concurrency} streams "
        f"at a time, {args.rounds} rounds of {args.requests} requests per variant after "
        f"{args.warmup} warm-up requests; tritonserver's `/proc/<pid>/status` read after each "
        "round with the load stopped. The first variant runs again at the end.",
        "",
        "| variant | requests | responses/request | RssAnon start → end (KiB) | KiB/request | first half | second half | VmRSS start → end (KiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['requests']} | {r['responses_per_request']:.1f} | "
            f"{r['anon_start_kib']} → {r['anon_end_kib']} | {r['anon_kib_per_request']:.3f} | "
            f"{r['anon_kib_per_request_first_half']:.3f} | "
            f"{r['anon_kib_per_request_second_half']:.3f} | "
            f"{r['rss_start_kib']} → {r['rss_end_kib']} |"
        )
    if events:
        lines += [
            "",
            f"Then {args.cycles} cycles of each event on the same server, each cycle followed "
            f"by {args.warmup} gRPC requests, the heap read 1 s later:",
            "",
            "| event | cycles | RssAnon start → end (KiB) | KiB/cycle | first half | second half "
            "| RssAnon after each cycle (KiB) |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in events:
            lines.append(
                f"| {e['event']} | {e['cycles']} | {e['anon_start_kib']} → {e['anon_end_kib']} | "
                f"{e['anon_kib_per_cycle']:.0f} | {e['anon_kib_per_cycle_first_half']:.0f} | "
                f"{e['anon_kib_per_cycle_second_half']:.0f} | "
                + ", ".join(str(c["RssAnon"]) for c in e["samples"][1:])
                + " |"
            )
    (RESULTS.with_suffix(".md")).write_text("\n".join(lines) + "\n")


@contextlib.contextmanager
def one_server(max_active: int) -> Iterator[TritonLauncher]:
    """A tritonserver serving only :data:`MODEL` (one torch thread, ``max_active`` slots).

    Its supervisor acts when an event asks (:func:`kill_stub_and_revive`), not by itself.
    """
    with tempfile.TemporaryDirectory(prefix="triton-memory-") as tmp:
        where = Path(tmp)
        repo = configured_copy(
            DEFAULT_REPOSITORY,
            where,
            {MODEL: {"torch_threads": "1", "max_active_sequences": str(max_active)}},
            models=[MODEL],
        )
        options = LaunchOptions.on_free_ports(
            repository=repo, log_path=where / "server.log", supervise_interval=3600
        )
        with TritonLauncher(options) as server:
            yield server


def _variant(text: str) -> tuple[str, int]:
    protocol, _, tokens = text.partition(":")
    if protocol not in ("grpc", "http") or not tokens.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: want grpc:N or http:N")
    return protocol, int(tokens)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=60, help="per round")
    parser.add_argument("--warmup", type=int, default=40, help="per variant, not counted")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--cycles", type=int, default=8, help="of each event (0: none)")
    parser.add_argument(
        "--variants",
        type=_variant,
        nargs="+",
        default=[("grpc", 4), ("http", 4)],
        help="protocol:answer tokens, in order",
    )
    args = parser.parse_args(argv)
    cpu = cpu_name()
    with one_server(args.concurrency) as server:
        rows, events = asyncio.run(measure(args, server))
    write_report(rows, events, args, cpu)
    print(f"wrote {RESULTS.with_suffix('.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
