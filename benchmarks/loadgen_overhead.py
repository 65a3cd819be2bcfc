"""Is ``python -m client bench`` ever the bottleneck? Its overhead at 64 concurrent streams.

A trivial decoupled model (``tests/fixtures/ticker_repo/ticker``) streams N responses
exactly ``--interval-ms`` apart and does nothing else. The same closed-loop load (64
streams) is driven twice against the same server, back to back, in one process:

1. ``raw``: the thinnest possible client, ``tritonclient.grpc.aio.stream_infer`` with a
   bare timestamp per response, no SDK, no decoding, no bookkeeping;
2. ``loadgen``: the load generator's own path (SDK chunks, UTF-8 decoding, deadline,
   ``client.metrics.measure``), over gRPC and over HTTP.

The difference between the runs' TTFT/ICL (inter-chunk latency) percentiles is what the load generator adds,
and the client CPU seconds per streamed response show how far it is from saturating a
core. Results go to ``benchmarks/results/loadgen_overhead.{json,md}``.

Run under the shared benchmark lock::

    flock /tmp/bench.lock .venv/bin/python benchmarks/loadgen_overhead.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpc_aio
from rich.console import Console
from rich.table import Table

from client.loadgen import LoadShape, Target, request_stream, run
from client.metrics import RequestRecord, distribution, summarize
from client.sdk import AsyncClient
from client.transport import Protocol
from client.workload import jobs
from serving.launcher import LaunchOptions, TritonLauncher
from serving.repository import configured_copy

ROOT = Path(__file__).resolve().parents[1]
TICKER = ROOT / "tests" / "fixtures" / "ticker_repo" / "ticker"
RESULTS = ROOT / "benchmarks" / "results"
console = Console(stderr=True)


def ticker_repository(where: Path, interval_ms: float) -> Path:
    """A copy of the ticker model with the requested interval."""
    return configured_copy(TICKER.parent, where, {"ticker": {"interval_ms": f"{interval_ms:g}"}})


async def raw_run(url: str, streams: int, requests: int, tokens: int) -> list[RequestRecord]:
    """The baseline: bare tritonclient streaming with one timestamp per response."""
    client = grpc_aio.InferenceServerClient(url)
    text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"go"]], dtype=object))
    length = grpcclient.InferInput("max_tokens", [1, 1], "INT32")
    length.set_data_from_numpy(np.array([[tokens]], dtype=np.int32))
    request = {
        "model_name": "ticker",
        "inputs": [text, length],
        "parameters": {"triton_enable_empty_final_response": True},
    }
    left = [requests]
    records: list[RequestRecord] = []
    origin = time.perf_counter()

    async def one() -> RequestRecord:
        async def requests_iter() -> AsyncIterator[dict[str, Any]]:
            yield request

        started = time.perf_counter()
        record = RequestRecord(start=started - origin)
        call = client.stream_infer(requests_iter())
        async for result, error in call:
            if error is not None:
                record.error = "server_error"
                break
            response = result.get_response()
            if response.outputs:
                record.token_times.append(time.perf_counter() - started)
            if response.parameters["triton_final_response"].bool_param:
                break
        call.cancel()
        record.e2e = time.perf_counter() - started
        record.output_tokens = len(record.token_times)
        record.ttft = record.token_times[0] if record.token_times else None
        return record

    async def user() -> None:
        while left[0] > 0:
            left[0] -= 1
            records.append(await one())

    await asyncio.gather(*(user() for _ in range(streams)))
    await client.close()
    return records


async def loadgen_run(
    url: str, protocol: Protocol, streams: int, requests: int, tokens: int
) -> list[RequestRecord]:
    """The load generator's own path, exactly as ``python -m client bench`` drives it."""
    client = AsyncClient(url, protocol, timeout=120)
    shape = LoadShape(users=streams, requests=requests)

    def send(job: Any) -> Any:
        return request_stream(client, Target.LLM_SMALL, job, model="ticker")

    result = await run(send, jobs(["go"], [tokens], seed=0), shape)
    await client.close()
    return result.records


def measured(name: str, body: Callable[[], Any]) -> dict[str, Any]:
    """Run one variant, with the client process's CPU time and wall time around it."""
    console.print(f"running {name} ...")
    cpu, wall = time.process_time(), time.perf_counter()
    records = asyncio.run(body())
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    responses = sum(len(r.token_times) for r in records)
    summary = summarize(records, wall)
    return {
        "name": name,
        "requests": len(records),
        "errors": summary["errors"],
        "responses": responses,
        "wall_s": wall,
        "client_cpu_s": cpu,
        "client_cpu_us_per_response": 1e6 * cpu / max(responses, 1),
        "client_cpu_share_of_one_core": cpu / wall,
        "ttft_ms": summary["ttft_ms"],
        "inter_chunk_latency_ms": distribution(
            [gap for r in records for gap in r.inter_chunk_latencies]
        ),
        "e2e_ms": summary["e2e_ms"],
    }


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        "# Load generator overhead at 64 concurrent streams",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Trivial decoupled model `ticker`: {cfg['tokens']} responses exactly "
        f"{cfg['interval_ms']:g} ms apart per request; {cfg['streams']} concurrent streams "
        f"(closed loop), {cfg['requests']} requests per variant, one tritonserver on "
        f"{cfg['machine']}. The model's own inter-chunk gap is {cfg['interval_ms']:g} ms; anything above "
        "it is server + client.",
        "",
        "| variant | TTFT p50 | TTFT p99 | ICL p50 | ICL p90 | ICL p99 | e2e p50 | "
        "client CPU µs/response | client CPU (share of a core) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in report["variants"]:
        lines.append(
            f"| {v['name']} | {v['ttft_ms']['p50']:.1f} | {v['ttft_ms']['p99']:.1f} | "
            f"{v['inter_chunk_latency_ms']['p50']:.2f} | {v['inter_chunk_latency_ms']['p90']:.2f} | {v['inter_chunk_latency_ms']['p99']:.2f} | "
            f"{v['e2e_ms']['p50']:.0f} | {v['client_cpu_us_per_response']:.0f} | "
            f"{100 * v['client_cpu_share_of_one_core']:.0f}% |"
        )
    d = report["overhead_vs_raw_grpc"]
    lines += [
        "",
        "All latencies in ms.",
        "",
        f"Load generator (gRPC) minus raw client: ICL p50 {d['icl_p50_ms']:+.2f} ms, "
        f"ICL p99 {d['icl_p99_ms']:+.2f} ms, TTFT p50 {d['ttft_p50_ms']:+.2f} ms "
        f"(ICL p50 ratio {d['icl_p50_ratio']:.3f}).",
        "",
        report["verdict"],
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams")
    parser.add_argument("--requests", type=int, default=256, help="requests per variant")
    parser.add_argument("--tokens", type=int, default=32, help="responses per request")
    parser.add_argument("--interval-ms", type=float, default=50.0, help="model's response gap")
    parser.add_argument("--output", type=Path, default=RESULTS / "loadgen_overhead")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="loadgen-overhead-") as tmp:
        repo = ticker_repository(Path(tmp), args.interval_ms)
        options = LaunchOptions.on_free_ports(repository=repo, log_path=Path(tmp) / "server.log")
        with TritonLauncher(options) as server:
            n, req, tok = args.streams, args.requests, args.tokens
            # Warm the model and the channel once; not recorded.
            asyncio.run(raw_run(server.grpc_url, 4, 8, 4))
            variants = [
                measured("raw tritonclient gRPC", lambda: raw_run(server.grpc_url, n, req, tok)),
                measured(
                    "loadgen gRPC",
                    lambda: loadgen_run(server.grpc_url, Protocol.GRPC, n, req, tok),
                ),
                measured(
                    "loadgen HTTP (SSE)",
                    lambda: loadgen_run(server.http_url, Protocol.HTTP, n, req, tok),
                ),
                measured(
                    "raw tritonclient gRPC (again)", lambda: raw_run(server.grpc_url, n, req, tok)
                ),
            ]

    raw = [v for v in variants if v["name"].startswith("raw")]
    gen = variants[1]

    def raw_mean(metric: str, p: str) -> float:
        return sum(v[metric][p] for v in raw) / len(raw)

    overhead = {
        "icl_p50_ms": gen["inter_chunk_latency_ms"]["p50"]
        - raw_mean("inter_chunk_latency_ms", "p50"),
        "icl_p99_ms": gen["inter_chunk_latency_ms"]["p99"]
        - raw_mean("inter_chunk_latency_ms", "p99"),
        "ttft_p50_ms": gen["ttft_ms"]["p50"] - raw_mean("ttft_ms", "p50"),
        "icl_p50_ratio": gen["inter_chunk_latency_ms"]["p50"]
        / raw_mean("inter_chunk_latency_ms", "p50"),
    }
    noise = abs(raw[0]["inter_chunk_latency_ms"]["p99"] - raw[1]["inter_chunk_latency_ms"]["p99"])
    verdict = (
        f"Verdict: the load generator adds {overhead['icl_p50_ms']:+.2f} ms to the median "
        f"inter-chunk gap ({100 * (overhead['icl_p50_ratio'] - 1):+.1f}%) at {n} streams; "
        f"the two raw runs differ by {noise:.2f} ms at ICL p99, which is the noise floor. "
        f"It spends {gen['client_cpu_us_per_response']:.0f} µs of client CPU per streamed "
        f"response ({100 * gen['client_cpu_share_of_one_core']:.0f}% of one core at this rate)."
    )
    report = {
        "command": shlex.join(["python", *sys.argv]),
        "config": {
            "streams": n,
            "requests": req,
            "tokens": tok,
            "interval_ms": args.interval_ms,
            "machine": f"{platform.machine()}, {platform.python_version()}",
        },
        "variants": variants,
        "overhead_vs_raw_grpc": overhead,
        "verdict": verdict,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(markdown(report))

    table = Table(title="load generator overhead (ms)")
    for column in ("variant", "TTFT p50", "ICL p50", "ICL p99", "CPU µs/resp"):
        table.add_column(column)
    for v in variants:
        table.add_row(
            v["name"],
            f"{v['ttft_ms']['p50']:.1f}",
            f"{v['inter_chunk_latency_ms']['p50']:.2f}",
            f"{v['inter_chunk_latency_ms']['p99']:.2f}",
            f"{v['client_cpu_us_per_response']:.0f}",
        )
    Console().print(table)
    Console().print(verdict)
    return 0


if __name__ == "__main__":
    sys.exit(main())
