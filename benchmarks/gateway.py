"""Gateway benchmarks: latency it adds over calling Triton directly, and its relay ceiling.

1. ``latency``: a Triton server (``llm_small`` only, started here through the launcher)
   and a gateway in front of it. At each concurrency, every worker alternates the two
   paths with the same prompt: the gateway (``POST /v1/chat/completions``, streamed,
   ``model: llm_small``) and Triton directly (gRPC stream to ``llm_small`` with the same
   token ids, what the gateway sends). Both run in one load, side by side; TTFT is the
   time to the first response carrying text. ``--upstream ticker`` serves a paced
   stand-in for ``llm_small`` instead (``tests/fixtures/tier_ticker_repo``: the tier's
   tensor interface, one token every 20 ms, no CPU work), so the gateway's cost can be
   read at concurrency 32, which the CPU model cannot serve without queueing.
2. ``relay``: the gateway process pinned to one core, its Triton replaced in process by
   an instant backend (every token ready at once), and a load generator pinned to the
   other core counting streamed SSE chunks per second. It measures the gateway's own
   work per chunk: HTTP, routing, detokenization, stop scanning, JSON and SSE framing
   (not the gRPC decoding of a real upstream; see the results file).

Usage::

    python benchmarks/gateway.py latency --requests 40 --max-tokens 8
    python benchmarks/gateway.py latency --upstream ticker --isolate --requests 256
    python benchmarks/gateway.py relay --duration 20 --streams 64 --tokens 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from client.sdk import AsyncClient  # noqa: E402
from gateway import process as gateway_process  # noqa: E402
from gateway.config import DEFAULT_ROUTER_CONFIG, RoutingSettings  # noqa: E402
from gateway.service import tier_inputs  # noqa: E402
from gateway.tokenizer import load as load_tokenizer  # noqa: E402
from serving.launcher import DEFAULT_REPOSITORY, LaunchOptions, TritonLauncher, free_port  # noqa: E402
from serving.repository import configured_copy  # noqa: E402
from serving.runtime import child_command  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
TIER_TICKER_REPO = REPO / "tests" / "fixtures" / "tier_ticker_repo"
PROMPTS = [
    "What is the capital of France?",
    "Summarize: the city council voted to add 40 km of bike lanes.",
    "Write a sentence about the sea.",
    "Explain what a GPU does in one line.",
]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------ latency
async def via_gateway(
    session: aiohttp.ClientSession, base: str, prompt: str, max_tokens: int
) -> float:
    body = {
        "model": "llm_small",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
    }
    start = time.perf_counter()
    ttft = None
    async with session.post(f"{base}/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if (
                ttft is None
                and line.startswith(b"data: {")
                and b'"content":"' in line
                and b'"content":""' not in line
            ):
                ttft = time.perf_counter() - start
    if ttft is None:
        raise RuntimeError("the gateway streamed no text")
    return ttft


async def direct(client: AsyncClient, inputs: dict[str, np.ndarray]) -> float:
    start = time.perf_counter()
    ttft = None
    async for tensors in client.stream_tensors("llm_small", inputs):
        if ttft is None and tensors["output_ids"].size:
            ttft = time.perf_counter() - start
    if ttft is None:
        raise RuntimeError("Triton streamed no tokens")
    return ttft


async def latency_level(
    base: str,
    grpc_url: str,
    concurrency: int,
    requests: int,
    max_tokens: int,
    stagger: float = 0.0,
) -> dict[str, Any]:
    """One concurrency level; worker ``w`` starts ``w * stagger / concurrency`` seconds
    late, so a jitter-free upstream does not keep every worker's requests in lockstep."""
    routing = RoutingSettings.from_file(DEFAULT_ROUTER_CONFIG)
    tok = load_tokenizer(None, routing.tokenizer_dir)
    client = AsyncClient(grpc_url)
    gateway_ttft: list[float] = []
    direct_ttft: list[float] = []
    paired: list[float] = []
    counter = iter(range(requests))

    def prompt_inputs(prompt: str) -> dict[str, np.ndarray]:
        ids = tok.encode_chat([{"role": "user", "content": prompt}])
        return tier_inputs(ids, max_tokens, tok.end_id, tok.pad_id)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def worker(w: int) -> None:
            await asyncio.sleep(w * stagger / concurrency)
            for i in counter:
                prompt = PROMPTS[i % len(PROMPTS)]
                order = ("g", "d") if (i + w) % 2 == 0 else ("d", "g")
                got = {}
                for path in order:
                    if path == "g":
                        got[path] = await via_gateway(session, base, prompt, max_tokens)
                    else:
                        got[path] = await direct(client, prompt_inputs(prompt))
                gateway_ttft.append(got["g"])
                direct_ttft.append(got["d"])
                paired.append(got["g"] - got["d"])

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    await client.close()
    row: dict[str, Any] = {"concurrency": concurrency, "pairs": len(gateway_ttft)}
    for name, values in (("gateway", gateway_ttft), ("direct", direct_ttft)):
        for q in (50, 90, 99):
            row[f"{name}_p{q}_ms"] = round(pct(values, q) * 1000, 1)
    for q in (50, 90, 99):
        row[f"added_p{q}_ms"] = round(row[f"gateway_p{q}_ms"] - row[f"direct_p{q}_ms"], 1)
    row["paired_added_p50_ms"] = round(statistics.median(paired) * 1000, 1)
    return row


def latency_key(isolate: bool, upstream: str, stagger: float = 0.0) -> str:
    """Where one ``latency`` configuration's results live in gateway.json."""
    key = "latency" + ("_isolated" if isolate else "")
    if upstream == "ticker":
        key += "_ticker" + ("_staggered" if stagger else "")
    return key


def run_latency(args: argparse.Namespace) -> dict[str, Any]:
    """``--isolate``: Triton (``torch_threads`` 1) on core 1, the gateway and the load on
    core 0, as in a cluster where the gateway does not share the model's CPU; affinity is
    inherited, so it is set before each process starts."""
    with tempfile.TemporaryDirectory(prefix="gateway-latency-") as tmp:
        options: dict[str, Any] = {"models": ["llm_small"], "ready_timeout": 900}
        if args.upstream == "ticker":
            options["repository"] = TIER_TICKER_REPO
        elif args.isolate:
            options["repository"] = configured_copy(
                DEFAULT_REPOSITORY,
                Path(tmp),
                {"llm_small": {"torch_threads": "1"}},
                models=["llm_small"],
            )
        if args.isolate:
            os.sched_setaffinity(0, {1})
        launcher = TritonLauncher(LaunchOptions.on_free_ports(**options))
        print("starting Triton with llm_small ...", flush=True)
        launcher.start()
        if args.isolate:
            os.sched_setaffinity(0, {0})
        result = _measure_latency(args, launcher)
        return {
            **result,
            "isolated": args.isolate,
            "upstream": args.upstream,
            "max_tokens": args.max_tokens,
            "stagger_s": args.stagger_s,
        }


def _measure_latency(args: argparse.Namespace, launcher: TritonLauncher) -> dict[str, Any]:
    port = free_port()
    proc = None
    try:
        proc = gateway_process.start(
            [
                "--port",
                str(port),
                "--triton-grpc",
                launcher.grpc_url,
                "--triton-health",
                launcher.health_url,
                "--log-level",
                "warning",
            ],
            f"http://127.0.0.1:{port}/health/ready",
        )
        base = f"http://127.0.0.1:{port}/v1"
        rows = []
        for concurrency in args.concurrency:
            for requests in (args.warmup, args.requests):
                row = asyncio.run(
                    latency_level(
                        base,
                        launcher.grpc_url,
                        concurrency,
                        requests,
                        args.max_tokens,
                        args.stagger_s,
                    )
                )
            print(json.dumps(row), flush=True)
            rows.append(row)
        return {"rows": rows}
    finally:
        if proc is not None:
            gateway_process.stop(proc)
        launcher.stop()


# ------------------------------------------------------------------------ relay
def serve_instant(port: int, tokens: int) -> None:
    """The gateway app over an instant in-process backend (run in the pinned child)."""
    import uvicorn

    from client.sdk import BaseAsyncClient
    from gateway.app import create_app
    from gateway.config import Topology
    from gateway.service import Gateway

    routing = RoutingSettings.from_file(DEFAULT_ROUTER_CONFIG)
    tok = load_tokenizer(None, routing.tokenizer_dir)
    answer = tok.encode(" the quick brown fox jumps over the lazy dog" * 64)

    class Instant(BaseAsyncClient):
        async def infer_tensors(self, model, inputs, outputs, request_id=""):  # type: ignore[no-untyped-def]
            raise NotImplementedError

        async def stream_tensors(self, model, inputs, request_id=""):  # type: ignore[no-untyped-def]
            limit = int(inputs["request_output_len"].reshape(-1)[0])
            for i in range(limit):
                yield {
                    "output_ids": np.array([[[answer[i % len(answer)]]]], dtype=np.int32),
                    "sequence_length": np.array([[1]], dtype=np.int32),
                }
                if i % 16 == 15:
                    await asyncio.sleep(0)  # let other streams and the HTTP writes run

        async def models(self):  # type: ignore[no-untyped-def]
            return []

        async def close(self) -> None:
            pass

    backend = Instant(None)
    gateway = Gateway(
        Topology.single("instant:1", None, max_in_flight=4096),
        routing,
        tok,
        client_factory=lambda url: backend,
    )
    uvicorn.run(
        create_app(gateway), host="127.0.0.1", port=port, log_level="warning", access_log=False
    )


def serve_grpc_instant(port: int) -> None:
    """A fake Triton over real gRPC that answers every stream at once (``--backend grpc``).

    It speaks just enough of KServe v2 for the gateway's tier path: ModelConfig (the
    batch dimension lookup), ServerReady and ModelStreamInfer (``request_output_len``
    one-token responses, then the flags-only final response). The gateway then pays the
    real per-token cost of tritonclient's gRPC decoding.
    """
    import grpc
    from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

    token = np.array([[[1000]]], dtype=np.int32).tobytes()

    class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
        async def ServerReady(self, request, context):  # type: ignore[no-untyped-def]
            return service_pb2.ServerReadyResponse(ready=True)

        async def ModelConfig(self, request, context):  # type: ignore[no-untyped-def]
            config = model_config_pb2.ModelConfig(name=request.name, max_batch_size=8)
            return service_pb2.ModelConfigResponse(config=config)

        async def ModelStreamInfer(self, request_iterator, context):  # type: ignore[no-untyped-def]
            async for request in request_iterator:
                names = [t.name for t in request.inputs]
                raw = request.raw_input_contents[names.index("request_output_len")]
                count = int(np.frombuffer(raw, dtype=np.int32)[0])
                for _ in range(count):
                    out = service_pb2.ModelInferResponse.InferOutputTensor(
                        name="output_ids", datatype="INT32", shape=[1, 1, 1]
                    )
                    response = service_pb2.ModelInferResponse(
                        model_name=request.model_name, id=request.id, outputs=[out]
                    )
                    response.raw_output_contents.append(token)
                    yield service_pb2.ModelStreamInferResponse(infer_response=response)
                final = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
                final.parameters["triton_final_response"].bool_param = True
                yield service_pb2.ModelStreamInferResponse(infer_response=final)

    async def run() -> None:
        server = grpc.aio.server()
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(run())


async def read_streams(kind: str, url: str, streams: int, tokens: int, duration: float) -> dict:
    """Stream messages/s one bare reader takes from the fake Triton (no gateway around it).

    ``tritonclient``: ``tritonclient.grpc.aio``'s ``stream_infer`` and ``as_numpy``, what
    the transport used before; ``transport``: ``client.AsyncClient.stream_tensors``, the
    transport the SDK and the gateway use now; ``minimal``: the least any grpc.aio reader
    does (``call.read()``, decode ``output_ids`` only), the floor of grpc.aio itself.
    """
    import grpc
    import tritonclient.grpc as grpcclient
    import tritonclient.grpc.aio as grpc_aio
    from tritonclient.grpc import service_pb2_grpc

    from client.transport import infer_request

    inputs = {
        "input_ids": np.array([1, 2, 3], dtype=np.int32),
        "request_output_len": np.array([tokens], dtype=np.int32),
    }
    count = 0
    stop_at = time.perf_counter() + duration

    async def with_tritonclient(client: Any) -> None:
        nonlocal count
        while time.perf_counter() < stop_at:
            tensors = []
            for name, array in inputs.items():
                item = grpcclient.InferInput(name, [1, *array.shape], "INT32")
                item.set_data_from_numpy(array[np.newaxis])
                tensors.append(item)

            async def requests(tensors: list = tensors) -> Any:
                yield {
                    "model_name": "llm_small",
                    "inputs": tensors,
                    "parameters": {"triton_enable_empty_final_response": True},
                }

            async for result, _ in client.stream_infer(requests()):
                response = result.get_response()
                if response.outputs:
                    result.as_numpy("output_ids")
                    count += 1
                if response.parameters["triton_final_response"].bool_param:
                    break

    async def with_transport(client: Any) -> None:
        nonlocal count
        while time.perf_counter() < stop_at:
            async for _ in client.stream_tensors("llm_small", inputs):
                count += 1

    async def minimal(stub: Any) -> None:
        nonlocal count
        batched = {name: array[np.newaxis] for name, array in inputs.items()}
        while time.perf_counter() < stop_at:
            request = infer_request("llm_small", batched)
            request.parameters["triton_enable_empty_final_response"].bool_param = True
            call = stub.ModelStreamInfer(iter((request,)))
            while True:
                message = await call.read()
                response = message.infer_response
                if response.outputs:
                    np.frombuffer(response.raw_output_contents[0], dtype=np.int32)
                    count += 1
                elif response.parameters["triton_final_response"].bool_param:
                    break

    client: Any
    if kind == "tritonclient":
        client = grpc_aio.InferenceServerClient(url)
        worker, target = with_tritonclient, client
    elif kind == "minimal":
        client = grpc.aio.insecure_channel(url)
        worker, target = minimal, service_pb2_grpc.GRPCInferenceServiceStub(client)
    else:
        client = AsyncClient(url)
        worker, target = with_transport, client
    start, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(target) for _ in range(streams)))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
    await client.close()
    return {
        "reader": kind,
        "messages_per_s": round(count / elapsed),
        "cpu_share": round(cpu / elapsed, 2),
        "us_per_message": round(1e6 * cpu / count, 1),
    }


async def relay_load(base: str, streams: int, tokens: int, duration: float) -> dict[str, Any]:
    body = json.dumps(
        {
            "model": "llm_small",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": tokens,
            "stream": True,
        }
    ).encode()
    chunks = 0
    requests = 0
    stop_at = time.perf_counter() + duration

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def worker() -> None:
            nonlocal chunks, requests
            while time.perf_counter() < stop_at:
                async with session.post(
                    f"{base}/chat/completions",
                    data=body,
                    headers={"Content-Type": "application/json"},
                ) as response:
                    response.raise_for_status()
                    async for data in response.content.iter_any():
                        chunks += data.count(b"\n\n")
                requests += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(streams)))
        elapsed = time.perf_counter() - start
    return {"chunks": chunks, "requests": requests, "elapsed_s": elapsed}


def baseline_tree(rev: str, where: Path) -> Path:
    """The project's packages as of git ``rev``, extracted under ``where`` (for before/after)."""
    import subprocess
    import tarfile

    archive = where / "baseline.tar"
    with archive.open("wb") as out:
        subprocess.run(
            [
                "git",
                "-C",
                str(REPO),
                "archive",
                rev,
                "client",
                "gateway",
                "serving",
                "model_repository",
            ],
            stdout=out,
            check=True,
        )
    tree = where / "baseline"
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    return tree


def relay_once(
    args: argparse.Namespace, cores: tuple[int, int], grpc_port: int | None, code: Path | None
) -> dict[str, Any]:
    """One relay measurement; ``code`` runs the gateway from another tree (a baseline)."""
    import subprocess

    gateway_core = cores[0]
    port = free_port()
    env = None
    if grpc_port is not None:
        command = [sys.executable, "-m", "gateway", "--port", str(port), "--log-level", "warning"]
        command += ["--triton-grpc", f"127.0.0.1:{grpc_port}", "--triton-health", ""]
        if code is not None:
            env = {**os.environ, "PYTHONPATH": str(code)}
    else:
        command = [sys.executable, __file__, "_serve_instant", "--port", str(port)]
        command += ["--tokens", str(args.tokens)]
    child = subprocess.Popen(
        child_command(command, cpus={gateway_core}),
        cwd=str(code) if code is not None else None,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        import urllib.request

        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/live", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or child.poll() is not None:
                    raise RuntimeError("the instant gateway did not start") from None
                time.sleep(0.3)
        base = f"http://127.0.0.1:{port}/v1"
        asyncio.run(relay_load(base, args.streams, args.tokens, 3.0))  # warm-up
        cpu0 = cpu_seconds(child.pid)
        result = asyncio.run(relay_load(base, args.streams, args.tokens, args.duration))
        cpu = cpu_seconds(child.pid) - cpu0
    finally:
        gateway_process.stop(child, drain=5)
    # Each stream's chunks: a role chunk, one per token, the finish chunk, [DONE].
    per_request_overhead = 3
    token_chunks = result["chunks"] - per_request_overhead * result["requests"]
    return {
        "duration_s": round(result["elapsed_s"], 1),
        "requests": result["requests"],
        "sse_events_per_s": round(result["chunks"] / result["elapsed_s"]),
        "token_chunks_per_s": round(token_chunks / result["elapsed_s"]),
        "gateway_cpu_s": round(cpu, 1),
        "gateway_cpu_share": round(cpu / result["elapsed_s"], 2),
        "token_chunks_per_cpu_s": round(token_chunks / cpu) if cpu else None,
    }


#: The bare readers a gRPC relay run measures beside the gateway: (kind, event loop).
READERS = [
    ("tritonclient", "asyncio"),
    ("transport", "asyncio"),
    ("transport", "uvloop"),
    ("minimal", "uvloop"),
]


def mean_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The headline of several runs of one variant: their means (not the best run)."""
    keys = ("duration_s", "requests", "sse_events_per_s", "token_chunks_per_s", "gateway_cpu_s")
    out: dict[str, Any] = {k: round(statistics.mean(r[k] for r in runs), 1) for k in keys}
    out["gateway_cpu_share"] = round(out["gateway_cpu_s"] / out["duration_s"], 2)
    out["token_chunks_per_cpu_s"] = round(
        statistics.mean(r["token_chunks_per_cpu_s"] for r in runs if r["token_chunks_per_cpu_s"])
    )
    out["token_chunks_per_s"] = round(out["token_chunks_per_s"])
    out["sse_events_per_s"] = round(out["sse_events_per_s"])
    return out


def run_relay(args: argparse.Namespace) -> dict[str, Any]:
    """The relay ceiling; with ``--compare REV``, the gateway of REV and of this tree
    alternately, ``--rounds`` times each, in one run (same fake upstream, same load)."""
    import subprocess
    import tempfile

    cores = sorted(os.sched_getaffinity(0))
    gateway_core, load_core = cores[0], cores[-1]
    load_average = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    fake = None
    grpc_port = None
    with tempfile.TemporaryDirectory(prefix="relay-") as tmp:
        variants: list[tuple[str, Path | None]] = [("this tree", None)]
        if args.compare:
            if args.backend != "grpc":
                raise SystemExit("--compare needs --backend grpc (the gateway runs as -m gateway)")
            variants.insert(0, (args.compare, baseline_tree(args.compare, Path(tmp))))
        try:
            if args.backend == "grpc":
                grpc_port = free_port()
                fake = subprocess.Popen(
                    child_command(
                        [sys.executable, __file__, "_serve_grpc", "--port", str(grpc_port)],
                        cpus={load_core},
                    )
                )
            os.sched_setaffinity(0, {load_core})
            runs = []
            readers = []
            if grpc_port is not None:
                for kind, loop in READERS:
                    out = subprocess.run(
                        child_command(
                            [
                                sys.executable,
                                __file__,
                                "_read",
                                "--kind",
                                kind,
                                "--port",
                                str(grpc_port),
                                "--streams",
                                str(args.streams),
                                "--tokens",
                                str(args.tokens),
                                *(["--uvloop"] if loop == "uvloop" else []),
                            ],
                            cpus={gateway_core},
                        ),
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    readers.append(json.loads(out.stdout.strip().splitlines()[-1]))
                    print(json.dumps(readers[-1]), flush=True)
            for round_ in range(args.rounds):
                for label, code in variants:
                    run = relay_once(args, (gateway_core, load_core), grpc_port, code)
                    run = {"variant": label, "round": round_ + 1, **run}
                    print(json.dumps(run), flush=True)
                    runs.append(run)
        finally:
            if fake is not None:
                gateway_process.stop(fake, drain=5)
    return {
        "backend": args.backend,
        "streams": args.streams,
        "tokens_per_request": args.tokens,
        **mean_run([r for r in runs if r["variant"] == "this tree"]),
        "runs": runs,
        "readers": readers,
        "load_average": load_average,
        "cores": {"gateway": gateway_core, "load": load_core},
    }


# ------------------------------------------------------------------------ report
def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Gateway benchmarks",
        "",
        f"{report['machine']}; {report['when']}.",
        "",
    ]
    keys = [latency_key(i, "llm_small") for i in (False, True)]
    keys += [latency_key(i, "ticker", s) for i in (False, True) for s in (0.0, 1.0)]
    for key in keys:
        if key not in report:
            continue
        lat = report[key]
        ticker = lat.get("upstream") == "ticker"
        triton = "Triton on core 1" + ("" if ticker else " with one torch thread")
        where = (
            f"{triton}, the gateway and the load generator on "
            "core 0 (`--isolate`: the gateway does not share the model's CPU, as in a cluster)"
            if lat.get("isolated")
            else "gateway and Triton share the machine's 2 cores"
        )
        model = (
            "the paced stand-in `tests/fixtures/tier_ticker_repo` (the tier's tensor "
            "interface, one token every 20 ms, the first after 20 ms; no model work), "
            f"{lat['max_tokens']} tokens per answer"
            if ticker
            else "`llm_small` only (CPU, SmolLM2-135M)"
        )
        if lat.get("stagger_s"):
            model += (
                f"; the workers' first requests spread over {lat['stagger_s']:g} s "
                "(`--stagger-s`, about one pair's duration)"
            )
        elif ticker:
            model += "; workers start together, and the jitter-free upstream keeps them in lockstep"
        lines += [
            "## Added latency: gateway vs Triton directly (TTFT, ms)"
            + (", paced upstream" if ticker else "")
            + (", staggered" if lat.get("stagger_s") else ", lockstep" if ticker else "")
            + (", gateway on its own core" if lat.get("isolated") else ""),
            "",
            f"Command: `{lat['command']}`",
            "",
            "Each worker alternates the two paths with the same prompt in one load: the gateway "
            "(`/v1/chat/completions`, streamed, `model: llm_small`) and a gRPC stream to "
            f"`llm_small` with the same token ids. One Triton with {model}; {where}.",
            "",
            "| concurrency | pairs | gateway p50 | direct p50 | added p50 | paired added p50 | gateway p90 | direct p90 | added p90 | gateway p99 | direct p99 | added p99 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in lat["rows"]:
            lines.append(
                f"| {r['concurrency']} | {r['pairs']} | {r['gateway_p50_ms']} | {r['direct_p50_ms']} | **{r['added_p50_ms']:+}** | {r.get('paired_added_p50_ms', float('nan')):+} | "
                f"{r['gateway_p90_ms']} | {r['direct_p90_ms']} | {r['added_p90_ms']:+} | {r['gateway_p99_ms']} | {r['direct_p99_ms']} | {r['added_p99_ms']:+} |"
            )
        lines += ["", lat.get("note", ""), ""]
    for key, title in (
        ("relay", "instant backend inside the gateway process"),
        ("relay_grpc", "a fake Triton answering at once over real gRPC"),
    ):
        if key not in report:
            continue
        r = report[key]
        lines += [
            f"## Relay ceiling: one gateway process on one core, {title}",
            "",
            f"Command: `{r['command']}`",
            "",
            f"- {r['streams']} concurrent streams of {r['tokens_per_request']} tokens, {r['duration_s']} s, {r['requests']} requests",
            ("- mean of this tree's runs: " if len(r.get("runs", [])) > 1 else "- ")
            + f"**{r['token_chunks_per_s']:,} token chunks/s** relayed ({r['sse_events_per_s']:,} SSE events/s including role, finish and [DONE])",
            f"- gateway CPU: {r['gateway_cpu_s']} s in {r['duration_s']} s ({r['gateway_cpu_share']:.0%} of its core); {r['token_chunks_per_cpu_s']:,} chunks per CPU-second",
            f"- gateway pinned to core {r['cores']['gateway']}, load generator to core {r['cores']['load']}"
            + (f"; load average at the start: {r['load_average']}" if "load_average" in r else ""),
            "",
        ]
        if len(r.get("runs", [])) > 1:
            lines += [
                "| variant | round | token chunks/s | gateway CPU share | chunks per CPU-second |",
                "|---|---|---|---|---|",
            ]
            for run in r["runs"]:
                lines.append(
                    f"| {run['variant']} | {run['round']} | {run['token_chunks_per_s']:,} | "
                    f"{run['gateway_cpu_share']:.0%} | {run['token_chunks_per_cpu_s']:,} |"
                )
            for variant in dict.fromkeys(run["variant"] for run in r["runs"]):
                m = mean_run([run for run in r["runs"] if run["variant"] == variant])
                lines.append(
                    f"| **{variant}, mean** | | **{m['token_chunks_per_s']:,}** | "
                    f"{m['gateway_cpu_share']:.0%} | {m['token_chunks_per_cpu_s']:,} |"
                )
            lines.append("")
        if r.get("readers"):
            lines += [
                "Bare readers on the gateway's core, same fake and streams (no HTTP, no gateway):",
                "",
                "| reader | loop | stream messages/s | CPU share | CPU µs per message |",
                "|---|---|---|---|---|",
            ]
            for reader in r["readers"]:
                lines.append(
                    f"| {reader['reader']} | {reader.get('loop', 'asyncio')} | {reader['messages_per_s']:,} | "
                    f"{reader['cpu_share']:.0%} | {reader['us_per_message']} |"
                )
            lines.append("")
        lines += [r.get("note", ""), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    lat = sub.add_parser("latency", help="TTFT added by the gateway vs Triton directly")
    lat.add_argument("--requests", type=int, default=40, help="pairs per concurrency level")
    lat.add_argument("--warmup", type=int, default=4)
    lat.add_argument("--max-tokens", type=int, default=8)
    lat.add_argument(
        "--isolate",
        action="store_true",
        help="Triton on core 1 with one torch thread; the gateway and the load on core 0",
    )
    lat.add_argument(
        "--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32]
    )
    lat.add_argument(
        "--upstream",
        choices=["llm_small", "ticker"],
        default="llm_small",
        help="llm_small: the CPU model; ticker: a paced stand-in with the tier's interface "
        "(one token every 20 ms, no CPU work)",
    )
    lat.add_argument(
        "--stagger-s",
        type=float,
        default=0.0,
        help="spread the workers' first requests over this many seconds (about one pair's "
        "duration), so a jitter-free upstream does not keep them in lockstep",
    )
    relay = sub.add_parser("relay", help="streamed chunks/s one gateway core relays")
    relay.add_argument("--duration", type=float, default=20.0)
    relay.add_argument("--streams", type=int, default=64)
    relay.add_argument("--tokens", type=int, default=256)
    relay.add_argument(
        "--backend",
        choices=["inprocess", "grpc"],
        default="inprocess",
        help="inprocess: the upstream replaced inside the gateway (its own work only); "
        "grpc: a fake Triton over real gRPC on the load generator's core",
    )
    relay.add_argument(
        "--compare",
        metavar="REV",
        help="also run the gateway of git revision REV (before/after in one run; grpc only)",
    )
    relay.add_argument("--rounds", type=int, default=1, help="runs of each variant, alternated")
    sub.add_parser("_markdown")  # gateway.md again from gateway.json (after editing a note)
    read = sub.add_parser("_read")  # a bare reader of `relay --backend grpc`, pinned
    read.add_argument("--kind", choices=["tritonclient", "transport", "minimal"], required=True)
    read.add_argument("--uvloop", action="store_true", help="run on uvloop (the gateway's loop)")
    read.add_argument("--port", type=int, required=True)
    read.add_argument("--streams", type=int, default=64)
    read.add_argument("--tokens", type=int, default=256)
    read.add_argument("--duration", type=float, default=8.0)
    grpc_fake = sub.add_parser("_serve_grpc")  # the fake Triton of `relay --backend grpc`
    grpc_fake.add_argument("--port", type=int, required=True)
    serve = sub.add_parser("_serve_instant")  # the pinned child of `relay`
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args(argv)
    if args.what == "_serve_instant":
        serve_instant(args.port, args.tokens)
        return 0
    if args.what == "_markdown":  # rewrite gateway.md from gateway.json
        (RESULTS / "gateway.md").write_text(
            markdown(json.loads((RESULTS / "gateway.json").read_text()))
        )
        return 0
    if args.what == "_read":
        url = f"127.0.0.1:{args.port}"
        if args.uvloop:
            import uvloop

            uvloop.install()
        result = asyncio.run(read_streams(args.kind, url, args.streams, args.tokens, args.duration))
        print(json.dumps({**result, "loop": "uvloop" if args.uvloop else "asyncio"}))
        return 0
    if args.what == "_serve_grpc":
        serve_grpc_instant(args.port)
        return 0
    path = RESULTS / "gateway.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report["machine"] = (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    report["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = "python benchmarks/gateway.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.what == "latency":
        key = latency_key(args.isolate, args.upstream, args.stagger_s)
        report[key] = {"command": command, **run_latency(args)}
    else:
        key = "relay" if args.backend == "inprocess" else "relay_grpc"
        report[key] = {"command": command, **run_relay(args)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "gateway.md").write_text(markdown(report))
    print(f"wrote {path} and gateway.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
