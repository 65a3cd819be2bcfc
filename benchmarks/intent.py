"""The intent classifier's own latency and throughput: in-process and served, side by side.

Prompts: the Dolly 15k sample's kept prompts (CC BY-SA 3.0, Databricks) as the router
sends them (instruction, blank line, context), cycled; the classifier encodes the
instruction alone.

1. ``in-process``: split, encode (the served ONNX graph, one thread: the served
   instance's setting) and the head, one prompt at a time (batch 1) and 32 at a time.
   Beside it, the MiniLM encoder the classifier used before, alone, on the same
   instructions: what the switch to SmolLM2's first layers costs.
2. ``served``: tritonserver with only ``intent_classifier`` (and its steps), one gRPC
   client sending one prompt at a time (batch 1, as a router sees it), then 32 prompts
   per request. Then each step of the ensemble alone at batch 1, fed what the step
   before it gives, so the table shows what the ensemble's hops cost on top of them.

Results go to ``benchmarks/results/intent.{json,md}``. Run under the shared lock::

    flock /tmp/bench.lock .venv/bin/python benchmarks/intent.py
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llm import cpu_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from client.metrics import distribution  # noqa: E402
from serving.intent_training import build_dataset, read_jsonl  # noqa: E402
from serving.launcher import LaunchOptions, TritonLauncher  # noqa: E402

DOLLY = ROOT.parent / "shared" / "data" / "dolly_sample.jsonl"
OWN = ROOT / "serving" / "data" / "intent_extra.jsonl"
RESULTS = ROOT / "benchmarks" / "results"


def prompts(count: int) -> list[str]:
    data = build_dataset(read_jsonl(DOLLY), read_jsonl(OWN), 0.0, 0)
    texts = [e.text for e in data.train if e.source == "dolly"]
    return [texts[i % len(texts)] for i in range(count)]


def measure(call: Callable[[list[str]], Any], texts: list[str], batch: int) -> dict[str, Any]:
    latencies = []
    start = time.perf_counter()
    for i in range(0, len(texts) - batch + 1, batch):
        t0 = time.perf_counter()
        call(texts[i : i + batch])
        latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    return {
        "batch": batch,
        "latency_ms": distribution(latencies),
        "prompts_per_s": len(latencies) * batch / wall,
    }


def in_process_calls() -> dict[str, Callable[[list[str]], Any]]:
    from serving.embedding import MINILM, Runtime, load_embedder
    from serving.intent import ENCODER, IntentHead, prompt_features, split_prompts

    encoder = load_embedder(Runtime.ONNX, threads=1, spec=ENCODER)
    head = IntentHead.load()
    minilm = load_embedder(Runtime.ONNX, threads=1, spec=MINILM)

    def classify(texts: list[str]) -> None:
        head.predict(prompt_features(texts, lambda t: encoder.embed(t).vectors))

    def minilm_alone(texts: list[str]) -> None:
        minilm.embed(split_prompts(texts)[0])

    return {
        f"in-process classifier ({ENCODER.describe}, ONNX, 1 thread)": classify,
        f"in-process encoder before ({MINILM.describe}, alone)": minilm_alone,
    }


def served_calls(url: str) -> dict[str, Callable[[list[str]], Any]]:
    """``intent_classifier`` and each of its steps, by the model's name, on whole prompts."""
    import tritonclient.grpc as grpcclient

    from serving.intent import DIM, split_prompts

    client = grpcclient.InferenceServerClient(url)

    def tensor(name: str, data: np.ndarray, dtype: str) -> Any:
        t = grpcclient.InferInput(name, list(data.shape), dtype)
        t.set_data_from_numpy(data)
        return t

    def strings(texts: list[str]) -> np.ndarray:
        return np.array([[t.encode()] for t in texts], dtype=object)

    def whole(model: str) -> Callable[[list[str]], Any]:
        return lambda texts: client.infer(model, [tensor("text", strings(texts), "BYTES")])

    def encoder(texts: list[str]) -> None:
        data = strings(split_prompts(texts)[0])
        client.infer("intent_encoder", [tensor("text", data, "BYTES")])

    def head(texts: list[str]) -> None:
        # The head's cost does not depend on the vector's values.
        flags = split_prompts(texts)[1].reshape(-1, 1)
        vectors = np.ones((len(texts), DIM), dtype=np.float32)
        inputs = [tensor("embedding", vectors, "FP32"), tensor("has_context", flags, "BOOL")]
        client.infer("intent_head", inputs)

    return {
        "intent_classifier": whole("intent_classifier"),
        "intent_split": whole("intent_split"),
        "intent_encoder": encoder,
        "intent_head": head,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Intent classifier: latency and throughput",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{report['machine']}. Dolly 15k sample prompts (CC BY-SA 3.0, Databricks), "
        "instruction + context as the router sends them; the encoder reads the instruction. "
        "Latencies in ms.",
        "",
        "| where | batch | p50 | p90 | p99 | prompts/s |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lat = row["latency_ms"]
        lines.append(
            f"| {row['where']} | {row['batch']} | {lat['p50']:.1f} | {lat['p90']:.1f} | "
            f"{lat['p99']:.1f} | {row['prompts_per_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="batch-1 requests per run")
    parser.add_argument("--batches", type=int, default=20, help="batch-32 requests per run")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.requests < 10 or args.batches < 2:
        parser.error("--requests must be >= 10 and --batches >= 2")
    single, batched = prompts(args.requests), prompts(32 * args.batches)
    rows = []

    for where, call in in_process_calls().items():
        call(single[:10])  # warm-up
        for texts, batch in ((single, 1), (batched, 32)):
            rows.append({"where": where, **measure(call, texts, batch)})

    log_path = Path(tempfile.mkdtemp(prefix="bench-intent-")) / "server.log"
    launcher = TritonLauncher(
        LaunchOptions.on_free_ports(
            models=["intent_classifier"], log_path=log_path, ready_timeout=600
        )
    )
    launcher.start()
    try:
        calls = served_calls(launcher.grpc_url)
        for model, call in calls.items():
            call(single[:10])
            sizes = ((single, 1), (batched, 32)) if model == "intent_classifier" else ((single, 1),)
            where = (
                "served (gRPC, intent_classifier)"
                if model == "intent_classifier"
                else f"served step alone (gRPC, {model})"
            )
            for texts, batch in sizes:
                rows.append({"where": where, **measure(call, texts, batch)})
    finally:
        launcher.stop()

    report = {
        "command": shlex.join(["python", "benchmarks/intent.py", *(argv or sys.argv[1:])]),
        "machine": f"{cpu_model()}, {platform.machine()}, Python {platform.python_version()}",
        "rows": rows,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "intent.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output_dir / "intent.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
