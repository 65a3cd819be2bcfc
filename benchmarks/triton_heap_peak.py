"""tritonserver's heap: a high-water mark of answers streamed at once, and what faults add (issue 13).

``benchmarks/triton_memory.py`` showed the heap settling per request with 8 short answers
at a time. The soak still saw a tritonserver end 15 % above its after-warm-up sample, in
steps. This measures the two things that could make such steps, on one server with only
``llm_small`` (no gateway):

1. **Width.** Bursts of ``--width`` answers of ``--tokens`` tokens at once (an ``end_id``
   that matches no token, so every answer runs to its cap), the heap (``RssAnon``) read
   1 s after each burst. If the heap keeps the high-water mark of a burst, the first
   burst raises it and the next ones barely move it.
2. **Faults, above that mark.** Then each of the soak's model faults once, each followed
   by ``--after`` bursts: a SIGKILLed stub that the supervisor reloads and a model-control
   reload (unload, load), each once with the model idle and once with a burst streaming
   (the fault lands ``--mid`` seconds into it; the cut streams are cancelled by the
   client, as the gateway does when the stub is gone). What a fault adds above the
   plateau is its cost; a per-request leak would show instead as growth in every burst.

    python benchmarks/triton_heap_peak.py                       # the committed run
    python benchmarks/triton_heap_peak.py --plateau 2 --after 1 --tokens 64   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/gateway.py would shadow the gateway package

from benchmarks.soak_probe import cpu_name, status_kib  # noqa: E402
from benchmarks.triton_memory import (  # noqa: E402
    EVENTS,
    MODEL,
    PROMPT,
    one_server,
)
from client.sdk import AsyncClient  # noqa: E402
from client.transport import Protocol, Tensors  # noqa: E402
from gateway.config import DEFAULT_ROUTER_CONFIG, RoutingSettings  # noqa: E402
from gateway.service import tier_inputs  # noqa: E402
from gateway.tokenizer import load as load_tokenizer  # noqa: E402
from serving.launcher import TritonLauncher  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "triton_heap_peak"
#: The faults, in order: (name, event of triton_memory.EVENTS, while a burst streams).
FAULTS = [
    ("stub kill, idle", "stub kill", False),
    ("reload, idle", "reload", False),
    ("stub kill, mid-stream", "stub kill", True),
    ("reload, mid-stream", "reload", True),
]


async def burst(client: AsyncClient, inputs: Tensors, width: int) -> int:
    """``width`` streams at once, each read to its end; the responses they gave."""

    async def one() -> int:
        return len([r async for r in client.stream_tensors(MODEL, inputs)])

    return sum(await asyncio.gather(*(one() for _ in range(width))))


async def cut_burst(
    client: AsyncClient,
    inputs: Tensors,
    width: int,
    mid: float,
    fault: Callable[[], None],
) -> int:
    """A burst with ``fault`` landing ``mid`` seconds into it; the streams that are still
    open 2 s after the fault returns are cancelled. The responses read before that."""
    got = 0

    async def one() -> None:
        nonlocal got
        async for _ in client.stream_tensors(MODEL, inputs):
            got += 1

    streams = [asyncio.create_task(one()) for _ in range(width)]
    await asyncio.sleep(mid)
    await asyncio.to_thread(fault)
    await asyncio.sleep(2.0)
    for task in streams:
        task.cancel()
    await asyncio.gather(*streams, return_exceptions=True)
    return got


async def measure(args: argparse.Namespace, server: TritonLauncher) -> list[dict[str, Any]]:
    tokenizer = load_tokenizer(None, RoutingSettings.from_file(DEFAULT_ROUTER_CONFIG).tokenizer_dir)
    ids = tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    inputs = tier_inputs(ids, args.tokens, -1, tokenizer.pad_id)
    pid = server.pid
    assert pid is not None
    steps: list[dict[str, Any]] = []

    def record(step: str, responses: int | None, began: float) -> None:
        row = {
            "step": step,
            "responses": responses,
            "seconds": time.monotonic() - began,
            **status_kib(pid),
        }
        steps.append(row)
        print(f"{step}: RssAnon {row['RssAnon']} KiB ({responses} responses)", file=sys.stderr)

    async def bursts(label: str, count: int) -> None:
        for i in range(1, count + 1):
            began = time.monotonic()
            responses = await burst(client, inputs, args.width)
            await asyncio.sleep(1.0)
            record(f"{label}, burst {i}", responses, began)

    record("idle, before any request", None, time.monotonic())
    client = AsyncClient(server.grpc_url, Protocol.GRPC)
    try:
        await bursts("plateau", args.plateau)
        for name, event, streaming in FAULTS:
            began = time.monotonic()
            fault = functools.partial(EVENTS[event], server)
            if streaming:
                responses: int | None = await cut_burst(client, inputs, args.width, args.mid, fault)
            else:
                await asyncio.to_thread(fault)
                responses = None
            await asyncio.sleep(1.0)
            record(name, responses, began)
            await bursts(f"after {name}", args.after)
    finally:
        await client.close()
    return steps


def costs(steps: list[dict[str, Any]]) -> dict[str, int]:
    """KiB of heap each fault left above the heap before it, read after its bursts; and
    what the plateau's bursts after the first added (``plateau``)."""
    out: dict[str, int] = {}
    plateau = [s for s in steps if s["step"].startswith("plateau, ")]
    out["plateau"] = plateau[-1]["RssAnon"] - plateau[0]["RssAnon"]
    before = plateau[-1]["RssAnon"]
    for name, _event, _streaming in FAULTS:
        after = [s for s in steps if s["step"].startswith(f"after {name}, ")]
        if after:
            out[name] = after[-1]["RssAnon"] - before
            before = after[-1]["RssAnon"]
    return out


def write_report(steps: list[dict[str, Any]], args: argparse.Namespace, cpu: str) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    summary = costs(steps)
    report = {"command": " ".join(sys.argv), "cpu": cpu, "args": vars(args), "costs_kib": summary}
    RESULTS.with_suffix(".json").write_text(json.dumps({**report, "steps": steps}, indent=2))
    mib = 1024.0
    lines = [
        "# tritonserver's heap: the high-water mark of a burst, and what faults add (issue 13)",
        "",
        f"Command: `python benchmarks/triton_heap_peak.py {' '.join(sys.argv[1:])}`  ",
        f"CPU: {cpu}",
        "",
        f"One tritonserver with only `{MODEL}` (SmolLM2-135M, CPU, one torch thread, "
        f"{args.width} slots). A burst is {args.width} gRPC streams at once, each "
        f"{args.tokens} tokens long; the heap (`RssAnon` of `/proc/<pid>/status`) is read "
        f"1 s after each step. Faults landing mid-stream hit {args.mid:g} s into a burst.",
        "",
        "| step | responses | seconds | heap (MiB) | change (KiB) | VmRSS (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    previous = steps[0]["RssAnon"]
    for s in steps:
        lines.append(
            f"| {s['step']} | {'-' if s['responses'] is None else s['responses']} | "
            f"{s['seconds']:.0f} | {s['RssAnon'] / mib:.1f} | {s['RssAnon'] - previous:+d} | "
            f"{s['VmRSS'] / mib:.1f} |"
        )
        previous = s["RssAnon"]
    lines += [
        "",
        "A fault's `responses` are those its burst gave before the fault and the client's "
        "cancel: a stub killed mid-stream cuts its burst; a reload mid-stream lets the "
        "answers in flight finish first (Triton unloads a model once its requests are "
        "released).",
        "",
        "What each left behind, read after its bursts (KiB of heap):",
        "",
        "| | KiB |",
        "|---|---|",
        f"| plateau bursts after the first | {summary['plateau']:+d} |",
    ]
    lines += [f"| {name} | {kib:+d} |" for name, kib in summary.items() if name != "plateau"]
    RESULTS.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=16, help="answers at once (the slots)")
    parser.add_argument("--tokens", type=int, default=256, help="per answer")
    parser.add_argument("--plateau", type=int, default=3, help="bursts before the faults")
    parser.add_argument("--after", type=int, default=2, help="bursts after each fault")
    parser.add_argument("--mid", type=float, default=8.0, help="seconds into a cut burst")
    args = parser.parse_args(argv)
    cpu = cpu_name()
    with one_server(args.width) as server:
        steps = asyncio.run(measure(args, server))
    write_report(steps, args, cpu)
    print(f"wrote {RESULTS.with_suffix('.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
