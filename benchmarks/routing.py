"""What routing costs: ``router`` vs the chosen tier's ensemble, same client, same server.

For each Dolly 15k prompt (CC BY-SA 3.0, Databricks; ``../shared/data/dolly_sample.jsonl``)
the client sends three streams, in an order that rotates from prompt to prompt so drift
in the machine's speed falls on every arm alike:

- **routed**: ``router``, which classifies (``intent_classifier``), picks a tier and
  streams it;
- **given**: ``router`` with the ``intent`` and ``model`` overrides set to what the
  classifier answers for that prompt (asked once beforehand, unmeasured): the same BLS
  path and tier, without the classifier call;
- **direct**: the ensemble of that tier, ``llm_<tier>_text``.

All three are gRPC streams from the same ``tritonclient`` code, with the same
``max_tokens`` and greedy decoding, so they generate the same tokens. routed - given is
what the classifier adds; given - direct is what the router's path adds (the BLS hops,
the router tokenizing and detokenizing itself instead of ``preprocessing`` and
``postprocessing``); routed - direct is both.

Measured at concurrency 1 and 8 (N clients each sending prompt triples in a closed loop):
time to first token (first non-empty text) and total latency, p50/p90/p99, the added
latency at p50 and p99, and the median of the per-prompt differences. Goal: the
classifier adds <= 15 ms to TTFT at p50, concurrency 1 (the per-prompt median of routed -
given, which does not depend on which prompts a percentile lands on).

Before starting the server it also sweeps the router's confidence threshold over the
intent head's held-out Dolly prompts (in-process, the committed head and policy): how
often each intent lands on the tier the policy means for it, and how often a cheap task
lands on the biggest tier. Results go to ``benchmarks/results/routing.{json,md}``.

Run under the shared benchmark lock::

    flock /tmp/bench.lock .venv/bin/python benchmarks/routing.py
"""

from __future__ import annotations

import argparse
import json
import platform
import queue
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from llm import cpu_model  # benchmarks/ is on sys.path when run as a script
from rich.console import Console
from rich.progress import Progress

from client.metrics import distribution
from serving.intent import prompt_text
from serving.launcher import LaunchOptions, TritonLauncher
from serving.params import Params
from serving.repository import parse_config
from serving.routing import RoutingPolicy

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOLLY = ROOT / ".." / "shared" / "data" / "dolly_sample.jsonl"
TIERS = ("llm_small", "llm_medium", "llm_large")
MODELS = ["router", "intent_classifier", "preprocessing", *TIERS, *(f"{t}_text" for t in TIERS)]
console = Console(stderr=True)


@dataclass
class Timing:
    ttft: float
    total: float
    tier: str
    text: str


def committed_policy() -> RoutingPolicy:
    config = parse_config(ROOT / "model_repository" / "router" / "config.pbtxt")
    raw = {k: {"string_value": v.string_value} for k, v in config.parameters.items()}
    return RoutingPolicy.from_params(Params({"parameters": raw}, "router"))


def policy_sweep(dolly: Path, thresholds: list[float]) -> dict[str, Any]:
    """Route the intent head's held-out prompts in-process at several thresholds."""
    from serving.embedding import Runtime, load_embedder
    from serving.intent import ENCODER, LABELS, IntentHead, prompt_features
    from serving.intent_training import build_dataset, read_jsonl

    own = ROOT / "serving" / "data" / "intent_extra.jsonl"
    held_out = build_dataset(read_jsonl(dolly), read_jsonl(own)).held_out
    embedder = load_embedder(Runtime.ONNX, threads=1, spec=ENCODER)
    x = prompt_features([e.text for e in held_out], lambda texts: embedder.embed(texts).vectors)
    prediction = IntentHead.load().predict(x)
    policy = committed_policy()
    biggest = policy.tiers[-1]
    truth = [LABELS[e.label] for e in held_out]
    rows = []
    for threshold in thresholds:
        swept = RoutingPolicy(
            policy.table, policy.tiers, threshold, policy.low_confidence_tier, policy.fallbacks
        )
        tiers = [
            swept.decide(intent, float(conf)).tier
            for intent, conf in zip(prediction.intents, prediction.confidence, strict=True)
        ]
        row: dict[str, Any] = {
            "threshold": threshold,
            "right_tier": float(
                np.mean([t == policy.table[y] for t, y in zip(tiers, truth, strict=True)]),
            ),
            "low_confidence": float(np.mean(prediction.confidence < threshold)),
        }
        for intent in LABELS:
            landed = [t for t, y in zip(tiers, truth, strict=True) if y == intent]
            row[f"{intent}_on_{biggest}"] = float(np.mean([t == biggest for t in landed]))
        rows.append(row)
    return {
        "held_out": len(held_out),
        "per_intent": {i: truth.count(i) for i in LABELS},
        "committed_threshold": policy.confidence_threshold,
        "rows": rows,
    }


def load_prompts(path: Path, count: int) -> list[str]:
    """Dolly prompts as the classifier sees them: instruction, blank line, context."""
    prompts = []
    with path.open() as f:
        for line in f:
            record = json.loads(line)
            prompts.append(prompt_text(record["instruction"], record.get("context") or ""))
    if not prompts:
        raise SystemExit(f"error: no prompts in {path}")
    step = max(1, len(prompts) // count)  # spread over the file's categories
    return [prompts[(i * step) % len(prompts)] for i in range(count)]


def stream_once(
    url: str, model: str, prompt: str, max_tokens: int, overrides: dict[str, str] | None = None
) -> Timing:
    """One streamed request; times are from just before sending. ``overrides`` are extra
    string inputs (the router's ``intent`` and ``model``)."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    arrays = {
        "text_input": np.array([[prompt.encode()]], dtype=np.object_),
        "max_tokens": np.array([[max_tokens]], dtype=np.int32),
        "temperature": np.array([[0.0]], dtype=np.float32),
        "stream": np.array([[True]], dtype=np.bool_),
    }
    for name, value in (overrides or {}).items():
        arrays[name] = np.array([[value.encode()]], dtype=np.object_)
    inputs = []
    for name, array in arrays.items():
        dtype = {np.object_: "BYTES", np.int32: "INT32", np.float32: "FP32", np.bool_: "BOOL"}
        tensor = grpcclient.InferInput(name, list(array.shape), dtype[array.dtype.type])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    pieces: list[str] = []
    first = None
    tier = model.removesuffix("_text")
    try:
        start = time.perf_counter()
        client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        while True:
            result, error = responses.get(timeout=600)
            if error is not None:
                raise RuntimeError(f"{model}: {error}")
            out = result.as_numpy("text_output")
            if out is not None:
                text = b"".join(out.reshape(-1)).decode()
                if text and first is None:
                    first = time.perf_counter() - start
                pieces.append(text)
                if model == "router":
                    tier = result.as_numpy("model").reshape(-1)[0].decode()
            if result.get_response().parameters["triton_final_response"].bool_param:
                total = time.perf_counter() - start
                break
    finally:
        client.stop_stream()
        client.close()
    return Timing(first if first is not None else total, total, tier, "".join(pieces))


def classify_all(url: str, prompts: list[str], policy: RoutingPolicy) -> list[dict[str, str]]:
    """The router's overrides that reproduce its own choice for each prompt, unmeasured:
    the classifier's intent and the tier the committed policy picks for its answer."""
    client = grpcclient.InferenceServerClient(url)
    overrides = []
    try:
        for prompt in prompts:
            tensor = grpcclient.InferInput("text", [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[prompt.encode()]], dtype=np.object_))
            result = client.infer("intent_classifier", [tensor])
            intent = result.as_numpy("intent").reshape(-1)[0].decode()
            confidence = float(result.as_numpy("confidence").reshape(-1)[0])
            tier = policy.decide(intent, confidence).tier
            overrides.append({"intent": intent, "model": tier})
    finally:
        client.close()
    return overrides


#: The arms, and the differences reported: (key in the results, minuend, subtrahend).
ARMS = ("routed", "given", "direct")
DIFFERENCES = (
    ("classifier", "routed", "given"),
    ("router_path", "given", "direct"),
    ("routing", "routed", "direct"),
)


def run_level(
    url: str,
    prompts: list[str],
    overrides: list[dict[str, str]],
    concurrency: int,
    max_tokens: int,
    progress: Progress,
) -> dict[str, Any]:
    """``concurrency`` clients, each sending a prompt's three arms from a shared queue."""
    work: queue.Queue = queue.Queue()
    for i in range(len(prompts)):
        work.put(i)
    timings: dict[str, list[Timing | None]] = {arm: [None] * len(prompts) for arm in ARMS}
    task = progress.add_task(f"concurrency {concurrency}", total=len(prompts))
    errors: list[BaseException] = []

    def one(arm: str, i: int) -> Timing:
        given = overrides[i]
        if arm == "routed":
            return stream_once(url, "router", prompts[i], max_tokens)
        if arm == "given":
            return stream_once(url, "router", prompts[i], max_tokens, given)
        return stream_once(url, f"{given['model']}_text", prompts[i], max_tokens)

    def client() -> None:
        while True:
            try:
                i = work.get_nowait()
            except queue.Empty:
                return
            try:
                for k in range(len(ARMS)):  # the order rotates with the prompt
                    arm = ARMS[(i + k) % len(ARMS)]
                    timings[arm][i] = one(arm, i)
            except BaseException as exc:  # reported after the threads join
                errors.append(exc)
                return
            progress.advance(task)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    wall = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - wall
    if errors:
        raise errors[0]
    # No error means every client ran its prompts to the end: every slot is filled, and
    # the arms stay aligned prompt by prompt for the per-prompt differences.
    done = {arm: [t for t in ts if t is not None] for arm, ts in timings.items()}
    if any(len(ts) != len(prompts) for ts in done.values()):
        raise RuntimeError("a prompt was left unmeasured")
    result: dict[str, Any] = {"concurrency": concurrency, "prompts": len(prompts), "wall_s": wall}
    for metric in ("ttft", "total"):
        values = {arm: [getattr(t, metric) for t in done[arm]] for arm in ARMS}
        stats = {f"{arm}_ms": distribution(values[arm]) for arm in ARMS}
        for key, a, b in DIFFERENCES:
            stats[f"{key}_added_p50_ms"] = stats[f"{a}_ms"]["p50"] - stats[f"{b}_ms"]["p50"]
            stats[f"{key}_added_p99_ms"] = stats[f"{a}_ms"]["p99"] - stats[f"{b}_ms"]["p99"]
            paired = np.subtract(values[a], values[b]) * 1000
            stats[f"{key}_paired_p50_ms"] = float(np.median(paired))
        result[metric] = stats
    routed, given, direct = (done[arm] for arm in ARMS)
    result["tiers"] = {t: sum(x.tier == t for x in routed) for t in TIERS}
    result["tier_mismatches"] = sum(r.tier != g.tier for r, g in zip(routed, given, strict=True))
    result["text_mismatches"] = sum(
        len({r.text, g.text, d.text}) > 1 for r, g, d in zip(routed, given, direct, strict=True)
    )
    return result


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Routing overhead: what the classifier and the router add to a tier's latency",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{report['prompts']} Dolly 15k prompts (CC BY-SA 3.0, Databricks), "
        f"{report['max_tokens']} output tokens each, greedy; gRPC streaming from one "
        "tritonclient. Each prompt is sent three ways, in an order that rotates from prompt "
        "to prompt: **routed** (`router`: classify, pick a tier, stream it), **given** "
        "(`router` told the intent and tier the classifier picks for that prompt, so it "
        "skips the classifier) and **direct** (`llm_<tier>_text`). CPU profile "
        f"(SmolLM2-135M in every tier), {report['machine']}. Latencies in ms.",
        "",
        "| concurrency | metric | routed p50 | given p50 | direct p50 | routed p99 "
        "| given p99 | direct p99 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for level in report["levels"]:
        for metric in ("ttft", "total"):
            m = level[metric]
            cells = [f"{m[f'{arm}_ms'][p]:.1f}" for p in ("p50", "p99") for arm in ARMS]
            name = metric.upper() if metric == "ttft" else metric
            lines.append(f"| {level['concurrency']} | {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "What each part adds: the difference of the p50s, the median of the per-prompt "
        "differences (the same prompt, back to back), and the difference of the p99s.",
        "",
        "| concurrency | metric | added by | p50 difference | per-prompt median | p99 difference |",
        "|---|---|---|---|---|---|",
    ]
    for level in report["levels"]:
        for metric in ("ttft", "total"):
            m = level[metric]
            name = metric.upper() if metric == "ttft" else metric
            for key, a, b in DIFFERENCES:
                part = key.replace("_", " ")
                lines.append(
                    f"| {level['concurrency']} | {name} | {part} ({a} - {b}) "
                    f"| {m[f'{key}_added_p50_ms']:+.1f} | **{m[f'{key}_paired_p50_ms']:+.1f}** "
                    f"| {m[f'{key}_added_p99_ms']:+.1f} |"
                )
    lines.append("")
    for level in report["levels"]:
        lines.append(
            f"- concurrency {level['concurrency']}: {level['prompts']} prompts; tiers chosen "
            f"{level['tiers']}; routed and given took different tiers in "
            f"{level['tier_mismatches']} prompts; the three texts differed in "
            f"{level['text_mismatches']} prompts."
        )
    for failure in report["failures"]:
        lines.append(f"- concurrency {failure['concurrency']} FAILED: {failure['error']}")
    c1 = next((x for x in report["levels"] if x["concurrency"] == 1), None)
    if c1 is not None:
        added = c1["ttft"]["classifier_paired_p50_ms"]
        verdict = "meets" if added <= 15 else "misses"
        lines += [
            "",
            "Goal (the classifier adds <= 15 ms to TTFT at p50, concurrency 1, per-prompt "
            f"median of routed - given): {added:+.1f} ms, {verdict} it.",
        ]
    lines += [
        "",
        "p99 over this few samples is close to the maximum: read it as a bound, not a tail "
        "estimate.",
    ]
    sweep = report["policy_sweep"]
    biggest = committed_policy().tiers[-1]
    intents = list(sweep["per_intent"])
    lines += [
        "",
        f"## Confidence threshold over the intent head's {sweep['held_out']} held-out "
        f"prompts ({sweep['per_intent']})",
        "",
        "In-process, committed head and table; a prompt below the threshold goes to the "
        'low-confidence tier. "Right tier": the tier the table means for the prompt\'s '
        f"true intent. The committed threshold is {sweep['committed_threshold']}.",
        "",
        "| threshold | right tier | below threshold | "
        + " | ".join(f"{i} on {biggest}" for i in intents)
        + " |",
        "|---" * (3 + len(intents)) + "|",
    ]
    for row in sweep["rows"]:
        lines.append(
            f"| {row['threshold']:.2f} | {row['right_tier']:.3f} | {row['low_confidence']:.2f} | "
            + " | ".join(f"{row[f'{i}_on_{biggest}']:.2f}" for i in intents)
            + " |"
        )
    return "\n".join(lines) + "\n"


def save(report: dict[str, Any], output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "routing.json").write_text(json.dumps(report, indent=2) + "\n")
    (output_dir / "routing.md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Routed vs given vs direct latency (TTFT and total) at concurrency 1 "
        "and 8. "
        "Starts its own tritonserver on free loopback ports. Run under "
        "'flock /tmp/bench.lock'.",
    )
    parser.add_argument("--prompts", type=Path, default=DOLLY, help="JSONL of Dolly records")
    parser.add_argument("--requests", type=int, default=40, help="prompts per level")
    parser.add_argument("--max-tokens", type=int, default=16, help="output tokens per request")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 8], help="client counts to measure"
    )
    parser.add_argument("--warmup", type=int, default=6, help="unmeasured prompts first")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.requests < 1 or args.max_tokens < 1 or min(args.concurrency) < 1:
        parser.error("--requests, --max-tokens and --concurrency must be >= 1")
    if not args.prompts.is_file():
        parser.error(f"--prompts {args.prompts} does not exist")
    if 1 not in args.concurrency:
        parser.error("--concurrency must include 1 (the goal is stated at concurrency 1)")

    console.print("sweeping the confidence threshold over the held-out prompts")
    sweep = policy_sweep(args.prompts, [0.0, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    prompts = load_prompts(args.prompts, args.requests + args.warmup)
    log_path = Path(tempfile.mkdtemp(prefix="bench-routing-")) / "server.log"
    launcher = TritonLauncher(
        LaunchOptions.on_free_ports(models=MODELS, log_path=log_path, ready_timeout=900)
    )
    console.print(f"starting tritonserver with {', '.join(MODELS)} (log: {log_path})")
    launcher.start()
    try:
        report: dict[str, Any] = {
            "command": shlex.join(["python", "benchmarks/routing.py", *(argv or sys.argv[1:])]),
            "prompts": args.requests,
            "max_tokens": args.max_tokens,
            "machine": f"{cpu_model()}, {platform.machine()}, Python {platform.python_version()}",
            "levels": [],
            "failures": [],
            "policy_sweep": sweep,
        }
        overrides = classify_all(launcher.grpc_url, prompts, committed_policy())
        warm, measured = slice(None, args.warmup), slice(args.warmup, None)
        with Progress(console=console) as progress:
            run_level(
                launcher.grpc_url,
                prompts[warm],
                overrides[warm],
                1,
                args.max_tokens,
                progress,
            )
            for concurrency in args.concurrency:
                try:
                    level = run_level(
                        launcher.grpc_url,
                        prompts[measured],
                        overrides[measured],
                        concurrency,
                        args.max_tokens,
                        progress,
                    )
                except (RuntimeError, queue.Empty) as exc:  # the server died: keep what we have
                    report["failures"].append({"concurrency": concurrency, "error": str(exc)})
                    save(report, args.output_dir)
                    console.print(f"error: concurrency {concurrency} failed: {exc}")
                    return 1
                report["levels"].append(level)
                save(report, args.output_dir)  # each level as soon as it is measured
    finally:
        launcher.stop()
    console.print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
