"""Served LLM tier vs the engines a CPU user would pick instead, side by side in one run.

(a) transformers ``generate`` in-process (float32, the DESIGN.md anchor) at batch 1 and
    at a static batch of 16, same prompts, same number of output tokens;
(b) the ``llm_small`` tier through a real tritonserver (started with ``serving.launcher``
    with only that model) with 1 and with 16 concurrent gRPC streaming clients, once per
    ``--served-dtypes`` entry: the repository's own ``dtype`` (float32) and int8
    weight-only, each a copy of the repository with only that parameter changed;
(c) for reference, the engine behind the tier in-process (no server) at 1 and 16, in
    every served dtype and in bfloat16, to separate engine speed from serving overhead;
(d) transformers' own in-flight batching (``model.init_continuous_batching()``) at 1 and 16;
(e) vLLM's CPU build serving the same weights through its own OpenAI server, in its own
    virtualenv (``scripts/vllm_env.sh``), in bfloat16 (its CPU default) and float32;
(f) llama.cpp on the packaged GGUF itself (``llama-cpp-python``), when it is installed;
(g) this machine's ceilings, measured in the same run (``llm_baselines.ceilings``).

Every request generates exactly ``--tokens`` tokens (end-of-sequence is disabled:
``min_new_tokens`` for ``generate``, ``end_id=-1`` for the tier, ``ignore_eos`` for vLLM),
so the token counts match. Prompts are Dolly 15k instructions (CC BY-SA 3.0, Databricks)
through SmolLM2's chat template, sent as token ids to every engine: one for the warm-up,
``--single-requests`` for the one-stream runs and ``--batch`` for the concurrent streams,
all different (:class:`Workload`). Reports aggregate
output tokens/s, TTFT and inter-token latency p50/p90/p99, and the ratios. Results go to
``benchmarks/results/llm.{json,md}``.

Run alone (nothing else on the machine), under the shared benchmark lock::

    scripts/vllm_env.sh && flock /tmp/bench.lock .venv/bin/python benchmarks/llm.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import queue
import shlex
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llm_baselines
import numpy as np
import torch
import tritonclient.grpc as grpcclient
from rich.console import Console
from rich.progress import Progress

from client.metrics import distribution
from serving.assets import SMOLLM2_CHECKPOINT, smollm2_gguf
from serving.launcher import LaunchOptions, TritonLauncher
from serving.llm.engine import Engine, EngineLimits, GenerationRequest
from serving.llm.runner import LlamaRunner, load_hf_model
from serving.llm.tokenizer import ChatTemplate, load_tokenizer
from serving.repository import configured_copy, parse_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOLLY = ROOT / ".." / "shared" / "data" / "dolly_sample.jsonl"
TIER = "llm_small"
console = Console(stderr=True)


@dataclass
class Run:
    """One request's token timestamps (seconds since its start)."""

    start: float
    times: list[float] = field(default_factory=list)
    tokens: int = 0


def summarize(name: str, runs: list[Run], wall: float, concurrency: int) -> dict[str, Any]:
    tokens = sum(r.tokens for r in runs)
    ttft = [r.times[0] - r.start for r in runs if r.times]
    icl = [b - a for r in runs for a, b in zip(r.times, r.times[1:], strict=False)]
    return {
        "name": name,
        "concurrency": concurrency,
        "requests": len(runs),
        "output_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_ms": distribution(ttft),
        "inter_chunk_latency_ms": distribution(icl),
    }


@dataclass(frozen=True)
class Workload:
    """Distinct prompts (as chat token ids) for the warm-up, the one-stream runs and the
    concurrent streams: no measured request repeats an earlier one, so an engine that
    reuses a repeated prompt's KV cache (ours; vLLM's by 128-token blocks) is measured on
    what new prompts share (the chat template's system prompt), not on repeats."""

    warmup: list[int]
    singles: list[list[int]]
    streams: list[list[int]]

    @classmethod
    def of(cls, encoded: list[list[int]], singles: int, streams: int) -> Workload:
        if len(encoded) < 1 + singles + streams:
            raise ValueError(f"need {1 + singles + streams} prompts, got {len(encoded)}")
        return cls(
            encoded[0], encoded[1 : 1 + singles], encoded[1 + singles : 1 + singles + streams]
        )


def prompts(count: int) -> list[str]:
    rows = [json.loads(line) for line in DOLLY.read_text().splitlines() if line.strip()]
    return [r["instruction"] for r in rows if len(r["instruction"]) < 300][:count]


class _StepClock:
    """A logits processor that only timestamps each decoding step of ``generate``."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def hf_generate(model: Any, tokenizer: Any, batch: list[list[int]], tokens: int) -> list[Run]:
    """One static batch through ``generate`` (left padded), exactly ``tokens`` new tokens."""
    from transformers import LogitsProcessorList

    width = max(len(ids) for ids in batch)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch])
    clock = _StepClock()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=pad,
            logits_processor=LogitsProcessorList([clock]),
        )
    # The processor runs before a step's token is picked; the token exists just after.
    times = [*clock.times[1:], time.perf_counter()]
    generated = out.shape[1] - width
    return [Run(start, times, generated) for _ in batch]


def cb_runs(manager: Any, batch: list[list[int]], tokens: int) -> list[Run]:
    """transformers' own in-flight batching (``ContinuousBatchingManager``), timestamps
    recorded by the manager per generated token."""
    starts = {}
    for ids in batch:
        start = time.perf_counter()
        request_id = manager.add_request(ids, max_new_tokens=tokens, record_timestamps=True)
        starts[request_id] = start
    runs = []
    for request_id, start in starts.items():
        out = manager.get_result(request_id=request_id, timeout=600)
        if out is None or not out.is_finished():
            raise RuntimeError(f"continuous batching request {request_id} did not finish")
        runs.append(Run(start, list(out.timestamps or []), len(out.generated_tokens)))
    return runs


def engine_runs(engine: Engine, batch: list[list[int]], tokens: int) -> list[Run]:
    runs = [Run(time.perf_counter()) for _ in batch]
    done = threading.Semaphore(0)

    def sink_for(run: Run):
        def sink(event) -> None:
            if event.tokens:
                run.times.append(time.perf_counter())
                run.tokens += len(event.tokens)
            if event.finished:
                done.release()

        return sink

    for ids, run in zip(batch, runs, strict=True):
        run.start = time.perf_counter()
        engine.submit(GenerationRequest(ids, tokens, end_id=-1), sink_for(run))
    for _ in batch:
        done.acquire()
    return runs


def served_runs(url: str, batch: list[list[int]], tokens: int) -> list[Run]:
    """One gRPC streaming client per prompt, all at once; token times from the client."""
    runs = [Run(0.0) for _ in batch]

    def one(i: int) -> None:
        ids, run = batch[i], runs[i]
        client = grpcclient.InferenceServerClient(url)
        results: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        values = {
            "input_ids": np.array([ids], dtype=np.int32),
            "input_lengths": np.array([[len(ids)]], dtype=np.int32),
            "request_output_len": np.array([[tokens]], dtype=np.int32),
            "end_id": np.array([[-1]], dtype=np.int32),
            "streaming": np.array([[True]], dtype=np.bool_),
        }
        inputs = []
        for name, array in values.items():
            kind = {"i": "INT32", "b": "BOOL"}[array.dtype.kind]
            tensor = grpcclient.InferInput(name, list(array.shape), kind)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        try:
            run.start = time.perf_counter()
            client.async_stream_infer(TIER, inputs, enable_empty_final_response=True)
            while True:
                result, error = results.get(timeout=600)
                now = time.perf_counter()
                if error is not None:
                    raise RuntimeError(str(error))
                out = result.as_numpy("output_ids")
                if out is not None and out.size:
                    run.times.append(now)
                    run.tokens += int(out.size)
                if result.get_response().parameters["triton_final_response"].bool_param:
                    return
        finally:
            client.stop_stream()
            client.close()

    llm_baselines.on_threads(one, len(batch), "served")
    return runs


def timed(name: str, concurrency: int, fn) -> dict[str, Any]:
    start = time.perf_counter()
    runs = fn()
    wall = time.perf_counter() - start
    result = summarize(name, runs, wall, concurrency)
    console.log(f"{name}: {result['tokens_per_s']:.1f} tok/s")
    return result


def sequential(fn, batches: list[list[int]]) -> list[Run]:
    """Batch-1 requests one after another (the single-stream case)."""
    runs: list[Run] = []
    for ids in batches:
        runs += fn([ids])
    return runs


def in_process(
    args: argparse.Namespace,
    tokenizer: Any,
    work: Workload,
    progress: Progress,
    task: Any,
    dtypes: list[str],
) -> list[dict[str, Any]]:
    """(a) ``generate``, (d) transformers' continuous batching, (c) the tier's engine."""
    results: list[dict[str, Any]] = []
    singles, batch = work.singles, work.streams
    model = load_hf_model(smollm2_gguf())
    hf_generate(model, tokenizer, [work.warmup], 4)
    results.append(
        timed(
            "in-process generate, batch 1",
            1,
            lambda: sequential(lambda b: hf_generate(model, tokenizer, b, args.tokens), singles),
        )
    )
    results.append(
        timed(
            f"in-process generate, static batch {args.batch}",
            args.batch,
            lambda: hf_generate(model, tokenizer, batch, args.tokens),
        )
    )

    progress.update(task, description="in-process transformers continuous batching")
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=args.tokens,
        do_sample=False,
        eos_token_id=-1,  # never stops early: exactly --tokens, like the other runs
        pad_token_id=tokenizer.pad_token_id,
    )
    manager = model.init_continuous_batching(generation_config=config)
    manager.start()
    try:
        cb_runs(manager, [work.warmup], 4)
        results.append(
            timed(
                "in-process transformers continuous batching, 1 stream",
                1,
                lambda: sequential(lambda b: cb_runs(manager, b, args.tokens), singles),
            )
        )
        results.append(
            timed(
                f"in-process transformers continuous batching, {args.batch} streams",
                args.batch,
                lambda: cb_runs(manager, batch, args.tokens),
            )
        )
    finally:
        manager.stop()

    # The served dtypes first (what the server runs), then the others for comparison.
    for dtype in dict.fromkeys([*dtypes, "bfloat16", "float32"]):
        progress.update(task, description=f"in-process engine ({dtype})")
        limits = EngineLimits(max_active=args.batch, max_context=1024, max_new_tokens=args.tokens)
        runner = LlamaRunner(model, args.batch, 1024, getattr(torch, dtype))
        engine = Engine(runner, limits, default_end_id=tokenizer.eos_token_id)
        engine_runs(engine, [work.warmup], 4)

        def one_by_one(engine: Engine = engine) -> list[Run]:
            return sequential(lambda b: engine_runs(engine, b, args.tokens), singles)

        results.append(timed(f"in-process engine ({dtype}), 1 stream", 1, one_by_one))
        results.append(
            timed(
                f"in-process engine ({dtype}), {args.batch} streams",
                args.batch,
                lambda engine=engine: engine_runs(engine, batch, args.tokens),
            )
        )
        engine.close()
    return results


def served_tier(
    args: argparse.Namespace,
    work: Workload,
    dtype: str,
    progress: Progress,
    task: Any,
) -> list[dict[str, Any]]:
    """(b) the tier through a real tritonserver, its weights in ``dtype``."""
    singles, batch = work.singles, work.streams
    progress.update(task, description=f"starting tritonserver with {TIER} ({dtype})")
    with served_server(dtype) as launcher:
        progress.update(task, description=f"served tier ({dtype})")
        served_runs(launcher.grpc_url, [work.warmup], 4)
        return [
            timed(
                f"served {TIER} ({dtype}), 1 stream",
                1,
                lambda: sequential(
                    lambda b: served_runs(launcher.grpc_url, b, args.tokens), singles
                ),
            ),
            timed(
                f"served {TIER} ({dtype}), {args.batch} streams",
                args.batch,
                lambda: served_runs(launcher.grpc_url, batch, args.tokens),
            ),
        ]


@contextlib.contextmanager
def served_server(variant: str) -> Iterator[TritonLauncher]:
    """A tritonserver serving only the tier, from a repository copy with its dtype set.

    ``variant`` is a dtype (``float32``, ``int8``, ``bfloat16``), optionally followed by
    ``-aten`` for the ATen path instead of the native decode kernels (an A/B).
    """
    dtype, _, path = variant.partition("-")
    if path not in ("", "aten"):
        raise ValueError(f"served variant {variant!r}: expected <dtype> or <dtype>-aten")
    parameters = {"dtype": dtype} | ({"native_kernels": "false"} if path else {})
    tmp = Path(tempfile.mkdtemp(prefix="bench-llm-"))
    repository = configured_copy(
        ROOT / "model_repository", tmp / "repository", {TIER: parameters}, models=[TIER]
    )
    launcher = TritonLauncher(
        LaunchOptions.on_free_ports(
            models=[TIER], repository=repository, log_path=tmp / "server.log", ready_timeout=900
        )
    )
    launcher.start()
    try:
        yield launcher
    finally:
        launcher.stop()


def baselines(
    args: argparse.Namespace, work: Workload, progress: Progress, task: Any
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """(e) vLLM's served CPU build and (f) llama.cpp; notes say what could not run."""
    results: list[dict[str, Any]] = []
    notes: dict[str, str] = {}
    singles, batch = work.singles, work.streams
    if not llm_baselines.baseline_python().exists():
        notes["vLLM"] = "not run: its virtualenv is missing (scripts/vllm_env.sh builds it)"
    else:
        model_dir = llm_baselines.export_safetensors()
        for dtype in args.vllm_dtypes:
            progress.update(task, description=f"vLLM CPU server ({dtype})")
            log_path = Path(tempfile.mkdtemp(prefix="bench-vllm-")) / "vllm.log"
            try:
                with llm_baselines.vllm_server(model_dir, dtype, args.batch, log_path) as url:

                    def streams(b: list[list[int]], url: str = url) -> list[Run]:
                        return llm_baselines.openai_runs(url, b, args.tokens, Run)

                    streams([work.warmup])
                    results.append(
                        timed(
                            f"vLLM CPU served ({dtype}), 1 stream",
                            1,
                            lambda streams=streams: sequential(streams, singles),
                        )
                    )
                    results.append(
                        timed(
                            f"vLLM CPU served ({dtype}), {args.batch} streams",
                            args.batch,
                            lambda streams=streams: streams(batch),
                        )
                    )
            except RuntimeError as exc:
                notes[f"vLLM {dtype}"] = f"failed: {str(exc)[:400]}"
    progress.update(task, description="llama.cpp")
    cpp = llm_baselines.llama_cpp_runs(singles, args.tokens, args.threads)
    if isinstance(cpp, str):
        notes["llama.cpp"] = cpp
    else:
        runs = [Run(r["start"], r["times"], r["tokens"]) for r in cpp]
        wall = sum(r.times[-1] - r.start for r in runs)
        results.append(summarize("llama.cpp (GGUF Q4_1, in-process), 1 stream", runs, wall, 1))
    return results, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--batch", type=int, default=16, help="static batch / concurrent streams")
    parser.add_argument(
        "--single-requests", type=int, default=4, help="batch-1 requests run one after another"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads in-process")
    parser.add_argument(
        "--vllm-dtypes",
        type=lambda text: [d for d in text.split(",") if d],
        default=["bfloat16", "float32"],
        help="comma-separated dtypes vLLM serves the model in, one server each ('' skips vLLM)",
    )
    parser.add_argument(
        "--served-dtypes",
        type=lambda text: [d for d in text.split(",") if d],
        default=None,
        help="comma-separated dtypes the served tier runs in, one server each (default: the "
        "repository's own dtype, then int8)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "llm", help="results path stem")
    args = parser.parse_args(argv)
    if args.tokens < 2 or args.batch < 1 or args.single_requests < 1:
        parser.error("--tokens must be >= 2 and --batch/--single-requests >= 1")
    if not DOLLY.is_file():
        parser.error(f"{DOLLY} not found: ../shared/data must sit beside the checkout")

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(smollm2_gguf())
    template = ChatTemplate(tokenizer)
    count = 1 + args.single_requests + args.batch
    work = Workload.of(
        [template.encode(p) for p in prompts(count)], args.single_requests, args.batch
    )
    results: list[dict[str, Any]] = []
    # The tier's own dtype first, so (b) and (c) run the engine exactly as the server does.
    tier_config = parse_config(ROOT / "model_repository" / TIER / "config.pbtxt")
    dtype_name = tier_config.parameters["dtype"].string_value or "float32"
    served_dtypes = args.served_dtypes or list(dict.fromkeys([dtype_name, "int8"]))

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("ceilings", total=None)
        shape = load_hf_model(smollm2_gguf())
        footprints = {
            dtype: LlamaRunner(shape, 1, 8, getattr(torch, dtype)).weight_footprint()
            for dtype in served_dtypes
        }
        del shape
        weight_bytes = {dtype: nbytes for dtype, (nbytes, _) in footprints.items()}
        params = footprints[served_dtypes[0]][1]  # the same in every dtype
        limits = llm_baselines.ceilings(weight_bytes, 2.0 * params, args.threads)
        console.log(f"ceilings: {limits}")

        progress.update(task, description="in-process transformers generate")
        results += in_process(args, tokenizer, work, progress, task, served_dtypes)
        for dtype in served_dtypes:
            results += served_tier(args, work, dtype, progress, task)
        extra, notes = baselines(args, work, progress, task)
        results += extra
        # Measured again after the runs, the better of the two kept: one reading alone
        # caught this VM in a slow second (13.4 GB/s read, against 23.8 twenty minutes
        # earlier and 29 through the native products), and a ceiling is what it can do.
        progress.update(task, description="ceilings, again")
        again = llm_baselines.ceilings(weight_bytes, 2.0 * params, args.threads)
        limits = {key: max(value, again[key]) for key, value in limits.items()}
        console.log(f"ceilings, the better of two: {limits}")

    def rate(prefix: str, streams: int) -> float | None:
        found = [
            r["tokens_per_s"]
            for r in results
            if r["name"].startswith(prefix) and r["concurrency"] == streams
        ]
        return found[0] if found else None

    n = args.batch
    ratios: dict[str, float] = {}
    for dtype in served_dtypes:
        rates = {s: rate(f"served {TIER} ({dtype})", s) for s in (1, n)}
        others = {
            "in-process generate": "in-process generate",
            "transformers continuous batching": "in-process transformers continuous batching",
            f"in-process engine ({dtype})": f"in-process engine ({dtype})",
            "vLLM CPU served (bfloat16)": "vLLM CPU served (bfloat16)",
            "vLLM CPU served (float32)": "vLLM CPU served (float32)",
            "llama.cpp": "llama.cpp",
        }
        for streams in (1, n):
            for label, prefix in others.items():
                theirs = rate(prefix, streams)
                if theirs and rates[streams]:
                    ratios[f"served ({dtype}) {streams} / {label} {streams}"] = (
                        rates[streams] / theirs
                    )
        if rates[1]:
            ratios[f"served ({dtype}) 1 stream / single-stream ceiling ({dtype})"] = (
                rates[1] / limits[f"single_stream_ceiling_{dtype}_tok_s"]
            )
        if rates[n]:
            ratios[f"served ({dtype}) {n} streams / aggregate ceiling"] = (
                rates[n] / limits["aggregate_ceiling_tok_s"]
            )
    command = "scripts/vllm_env.sh && flock /tmp/bench.lock .venv/bin/python benchmarks/llm.py "
    command += shlex.join(sys.argv[1:] if argv is None else argv)
    report = {
        "command": command.strip(),
        "checkpoint": SMOLLM2_CHECKPOINT,
        "tokens_per_request": args.tokens,
        "machine": {
            "cpus": os.cpu_count(),
            "cpu_model": cpu_model(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": args.threads,
            "load_average_at_end": os.getloadavg(),
        },
        "ceilings": limits,
        "weight_bytes_per_token": weight_bytes,
        "data": "Databricks Dolly 15k sample (CC BY-SA 3.0), instructions as prompts",
        "results": results,
        "ratios": ratios,
        "not_run": notes,
    }
    write_report(args.out, report, markdown(report))
    return 0


def write_report(out: Path, report: dict[str, Any], text: str) -> None:
    """``out``.json (the report) and ``out``.md (``text``, also printed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(text)
    console.print(text)


def _cpuinfo() -> str:
    return Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""


def cpu_flags() -> list[str]:
    """The CPU's feature flags, as ``lscpu`` lists them (none where there is no cpuinfo)."""
    lines = _cpuinfo().splitlines()
    return next((ln.split(":", 1)[1].split() for ln in lines if "flags" in ln), [])


def cpu_model() -> str:
    """``lscpu``'s model name and the vector / matrix extensions that decide the kernels."""
    lines = _cpuinfo().splitlines()
    name = next((ln.split(":", 1)[1].strip() for ln in lines if "model name" in ln), "?")
    wanted = [f for f in cpu_flags() if f.startswith(("avx512", "amx")) or f in ("avx2", "fma")]
    return f"{name} ({' '.join(sorted(set(wanted)))})"


def _ms(stats: dict[str, Any], key: str) -> str:
    value = stats.get(key)
    return "-" if value is None else f"{value:.1f}"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# LLM tier: served vs vLLM's CPU build, llama.cpp and transformers, in one run",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Model: {report['checkpoint']}; {report['tokens_per_request']} new tokens per request "
        "(end-of-sequence disabled); prompts: Dolly 15k instructions (CC BY-SA 3.0) through "
        "the chat template, no prompt sent twice (one warm-up, then the one-stream prompts, "
        f"then the concurrent ones). Machine: {report['machine']['cpus']} CPUs, "
        f"{report['machine'].get('cpu_model', '?')}, torch "
        f"{report['machine']['torch']}, load average at the end "
        f"{', '.join(f'{x:.2f}' for x in report['machine']['load_average_at_end'])} "
        "(nothing else ran during it unless the load says so).",
        "",
        "| run | streams | tok/s | TTFT p50 | TTFT p90 | TTFT p99 | ICL p50 | ICL p90 | ICL p99 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        t, i = r["ttft_ms"], r["inter_chunk_latency_ms"]
        lines.append(
            f"| {r['name']} | {r['concurrency']} | {r['tokens_per_s']:.1f} | "
            f"{_ms(t, 'p50')} | {_ms(t, 'p90')} | {_ms(t, 'p99')} | "
            f"{_ms(i, 'p50')} | {_ms(i, 'p90')} | {_ms(i, 'p99')} |"
        )
    lines += [
        "",
        "Latencies in ms. Ceilings measured in the same run (before and after the runs, the better kept):",
        "",
    ]
    lines += [f"- {name}: {value:.1f}" for name, value in report.get("ceilings", {}).items()]
    lines += ["", "Ratios:", ""]
    lines += [f"- {name}: **{value:.2f}x**" for name, value in report["ratios"].items()]
    for name, why in report.get("not_run", {}).items():
        lines.append(f"- {name}: {why}")
    lines += [
        "",
        "Why the served tier is where it is, and how far from the ceiling: "
        "docs/llm.md, section Performance.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
