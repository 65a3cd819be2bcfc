"""Sentences per second: ``embedding`` served by Triton vs the same model in-process.

Three measurements, side by side in one run on the same machine and the same sentences
(Dolly 15k instructions, CC BY-SA 3.0, cycled):

1. ``in-process PyTorch``: the reference (transformers BertModel, padding to the longest
   row, mean pooling) at batch ``--batch`` with every core; the DESIGN.md anchor.
2. ``in-process ONNX``: the runtime the model serves with (``serving.embedding``) at the
   same batch, to separate what the runtime buys from what the server adds.
3. ``served``: tritonserver started by ``serving.launcher`` with only ``embedding``,
   ``--concurrency`` gRPC clients in a closed loop, one sentence per request, the way an
   embedding service is used. Latency is per request, seen by the client.

The in-process runs finish, and free their model, before the server starts, so nothing
competes for the two cores but the server and the client itself. Results go to
``benchmarks/results/embedding.{json,md}``.

Run under the shared benchmark lock::

    flock /tmp/bench.lock .venv/bin/python benchmarks/embedding.py
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.launcher import LaunchOptions, TritonLauncher  # noqa: E402

DOLLY = ROOT.parent / "shared" / "data" / "dolly_sample.jsonl"
RESULTS = ROOT / "benchmarks" / "results"
console = Console(stderr=True)


def sentences(path: Path, count: int) -> list[str]:
    with open(path, encoding="utf-8") as f:
        texts = [json.loads(line)["instruction"].strip() for line in f if line.strip()]
    texts = [t for t in texts if t]
    return [texts[i % len(texts)] for i in range(count)]


def percentiles(latencies_s: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(latencies_s) * 1000.0
    return {f"p{q}": round(float(np.percentile(ms, q)), 2) for q in (50, 90, 99)}


def in_process(
    name: str, embed: Callable[[list[str]], Any], texts: list[str], batch: int
) -> dict[str, Any]:
    """Closed loop over ``texts`` in batches of ``batch``; latency is per batch."""
    embed(texts[:batch])  # warm up (first-call allocations, kernel selection)
    latencies = []
    start = time.perf_counter()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(name, total=len(texts))
        for i in range(0, len(texts), batch):
            t0 = time.perf_counter()
            embed(texts[i : i + batch])
            latencies.append(time.perf_counter() - t0)
            progress.advance(task, len(texts[i : i + batch]))
    elapsed = time.perf_counter() - start
    return {
        "name": name,
        "load_average_1m_after": round(os.getloadavg()[0], 2),
        "sentences": len(texts),
        "batch": batch,
        "seconds": round(elapsed, 3),
        "sentences_per_s": round(len(texts) / elapsed, 1),
        "latency_ms": percentiles(latencies),
        "latency_of": f"one batch of {batch}",
    }


def torch_reference(threads: int) -> Callable[[list[str]], Any]:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from serving.assets import minilm_dir

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model = AutoModel.from_pretrained(minilm_dir()).eval()

    def embed(batch: list[str]) -> Any:
        enc = tokenizer(batch, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(pooled, dim=1)

    return embed


def onnx_runtime(threads: int) -> Callable[[list[str]], Any]:
    from serving.embedding import Runtime, load_embedder

    return load_embedder(Runtime.ONNX, threads).embed


async def _served_load(url: str, texts: list[str], concurrency: int) -> tuple[float, list[float]]:
    import tritonclient.grpc.aio as grpc_aio
    from tritonclient.grpc import InferInput

    client = grpc_aio.InferenceServerClient(url)
    queue = list(reversed(texts))
    latencies: list[float] = []

    async def one(text: str) -> None:
        inp = InferInput("text", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[text.encode()]], dtype=object))
        t0 = time.perf_counter()
        result = await client.infer("embedding", [inp])
        latencies.append(time.perf_counter() - t0)
        if result.as_numpy("embedding").shape != (1, 384):
            raise RuntimeError("unexpected embedding shape from the server")

    async def worker() -> None:
        while queue:
            await one(queue.pop())

    for text in texts[: 2 * concurrency]:  # warm up both instances and the batcher
        await one(text)
    latencies.clear()
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    await client.close()
    return elapsed, latencies


def served(texts: list[str], concurrency: int, repository: Path, log_dir: Path) -> dict[str, Any]:
    options = LaunchOptions.on_free_ports(
        models=["embedding"], repository=repository, log_path=log_dir / "embedding-bench.log"
    )
    launcher = TritonLauncher(options)
    with console.status("starting tritonserver with only 'embedding'"):
        launcher.start()
    try:
        with console.status(f"{len(texts)} requests from {concurrency} concurrent gRPC clients"):
            elapsed, latencies = asyncio.run(_served_load(launcher.grpc_url, texts, concurrency))
        load_after = os.getloadavg()[0]
    finally:
        launcher.stop()
    return {
        "name": "served (Triton, gRPC)",
        "load_average_1m_after": round(load_after, 2),
        "sentences": len(texts),
        "concurrency": concurrency,
        "seconds": round(elapsed, 3),
        "sentences_per_s": round(len(texts) / elapsed, 1),
        "latency_ms": percentiles(latencies),
        "latency_of": "one request of one sentence, at the client",
    }


def config_summary(path: Path) -> str:
    from tritonclient.grpc import model_config_pb2

    from serving.repository import parse_config

    config = parse_config(path)
    groups = ", ".join(
        f"{g.count} x {model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)}"
        for g in config.instance_group
    )
    params = ", ".join(f"{k}={v.string_value}" for k, v in sorted(config.parameters.items()))
    return (
        f"max_batch_size {config.max_batch_size}, max_queue_delay "
        f"{config.dynamic_batching.max_queue_delay_microseconds} µs, instances {groups}, {params}"
    )


def markdown(result: dict[str, Any]) -> str:
    rows = result["runs"]
    lines = [
        "# Embedding: served through Triton vs in-process",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {result['machine']}. {result['sentences']} sentences (Databricks Dolly 15k "
        "instructions, CC BY-SA 3.0), all-MiniLM-L6-v2, fp32. Started "
        f"{result['date_utc']} with 1-minute load average {result['load_average_1m_before']} "
        "(the machine is shared; anything above 2 means other work competed for the cores).",
        "",
        "| run | sentences/s | p50 ms | p90 ms | p99 ms | latency of | load avg (1 min) after |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lat = r["latency_ms"]
        lines.append(
            f"| {r['name']} | {r['sentences_per_s']} | {lat['p50']} | {lat['p90']} | "
            f"{lat['p99']} | {r['latency_of']} | {r['load_average_1m_after']} |"
        )
    lines += [
        "",
        f"**Served / best in-process PyTorch at batch {result['batch']}: "
        f"{result['ratio_vs_torch']:.2f}x** (goal >= 1.0x, aim 1.5x).",
        f"Served / in-process ONNX Runtime at batch {result['batch']}: "
        f"{result['ratio_vs_onnx']:.2f}x (what the server costs or gains over the same runtime).",
        "",
        "Server config: " + result["server_config"],
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sentences", type=int, default=1024, help="sentences per run")
    parser.add_argument("--batch", type=int, default=32, help="in-process batch size")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent gRPC clients")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 2,
        help="in-process threads (default: every core)",
    )
    parser.add_argument(
        "--repository",
        type=Path,
        default=ROOT / "model_repository",
        help="model repository holding 'embedding' (default: %(default)s)",
    )
    parser.add_argument("--data", type=Path, default=DOLLY, help="sentences JSONL")
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS / "embedding",
        help="results path without suffix; .json and .md are written",
    )
    args = parser.parse_args(argv)
    if not args.data.is_file():
        parser.error(f"{args.data} not found")
    if min(args.sentences, args.batch, args.concurrency, args.threads) < 1:
        parser.error("--sentences, --batch, --concurrency and --threads must be >= 1")
    if not (args.repository / "embedding" / "config.pbtxt").is_file():
        parser.error(f"{args.repository} has no embedding/config.pbtxt")

    texts = sentences(args.data, args.sentences)
    load_before = os.getloadavg()[0]
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    runs = []
    # PyTorch twice: on every core (the DESIGN.md anchor) and on one thread, because on a
    # shared machine OpenMP's barriers make multi-threaded PyTorch collapse when another
    # process holds a core. The ratio is taken against the faster of the two.
    variants = [("in-process PyTorch", torch_reference, args.threads)]
    if args.threads > 1:
        variants.append(("in-process PyTorch", torch_reference, 1))
    variants.append(("in-process ONNX", onnx_runtime, args.threads))
    for name, factory, threads in variants:
        embed = factory(threads)
        label = f"{name} (batch {args.batch}, {threads} thread{'s' if threads > 1 else ''})"
        runs.append(in_process(label, embed, texts, args.batch))
        del embed
        gc.collect()
    with tempfile.TemporaryDirectory(prefix="embedding-bench-") as log_dir:
        runs.append(served(texts, args.concurrency, args.repository, Path(log_dir)))
    torch_rate = max(r["sentences_per_s"] for r in runs if "PyTorch" in r["name"])
    onnx_rate, served_rate = runs[-2]["sentences_per_s"], runs[-1]["sentences_per_s"]
    result = {
        "command": shlex.join(["python", *sys.argv]) if argv is None else shlex.join(argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "date_utc": started,
        "load_average_1m_before": round(load_before, 2),
        "sentences": args.sentences,
        "batch": args.batch,
        "runs": runs,
        "ratio_vs_torch": round(served_rate / torch_rate, 3),
        "ratio_vs_onnx": round(served_rate / onnx_rate, 3),
        "server_config": config_summary(args.repository / "embedding" / "config.pbtxt"),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(markdown(result))
    console.print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
