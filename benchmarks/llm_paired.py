"""The served tier against vLLM's CPU build, paired: every server up at once, rounds alternate.

``benchmarks/llm.py`` runs each engine once, one after the other, minutes apart. This VM's
speed drifts by +-20% within minutes, so one run's served / vLLM ratio moves as much as
the change being judged (0.81x and 1.01x for the same code in two runs). Here every engine
under test is started first and stays up; then each round runs every engine back to back
on the same fresh prompts (the engine order rotates every round), and each round gives
its own ratio. The report is the ratios per round, their median and their range, so a
claim like "at least 1.0x at 16 streams" can be read against the spread.

What a round does, per engine: ``--single-requests`` prompts one after another (the
one-stream case), then ``--batch`` prompts at once (the concurrent case). Prompts are Dolly
15k instructions (CC BY-SA 3.0, Databricks) through SmolLM2's chat template, sent as token
ids; no prompt is sent twice to one engine (the warm-up has its own). Every request makes
exactly ``--tokens`` tokens, as in ``benchmarks/llm.py``, whose clients this reuses.

Idle servers must not cost the measured one: the report says how busy the machine was
with every server up and none serving (``idle_busy_share``, from ``/proc/stat``), and
during the pause (``--settle``) before each engine's turn. vLLM's CPU server keeps about a
tenth of a core busy for a few seconds after its last request (11% of the machine in the
first 5 s, 1.6-1.8% after); the tier's stub, 0.4%.

Run alone, under the shared benchmark lock::

    scripts/vllm_env.sh && flock /tmp/bench.lock .venv/bin/python benchmarks/llm_paired.py

Results go to ``benchmarks/results/llm_paired.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def engine_order(engines: list[str], round_index: int) -> list[str]:
    """The engines rotated by the round's index, so none is always first (or last)."""
    k = round_index % len(engines) if engines else 0
    return engines[k:] + engines[:k]


def paired_ratios(
    rounds: list[dict[str, dict[str, float]]], ours: str, theirs: str
) -> dict[str, dict[str, Any]]:
    """Per stream count, ``ours`` / ``theirs`` tokens/s in every round, median and range.

    ``rounds[i][engine][streams]`` is the tokens/s that engine made in round ``i``.
    """
    out: dict[str, dict[str, Any]] = {}
    for streams in rounds[0][ours] if rounds else ():
        ratios = [r[ours][streams] / r[theirs][streams] for r in rounds]
        out[streams] = {
            "per_round": ratios,
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
            "rounds_at_least_1": sum(x >= 1.0 for x in ratios),
        }
    return out


def busy_share(seconds: float) -> float:
    """The machine's busy share of all CPUs over ``seconds`` (from ``/proc/stat``)."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def main(argv: list[str] | None = None) -> int:
    # Siblings (as benchmarks/llm.py imports them): only when run, so the pure helpers
    # above import anywhere.
    import llm
    import llm_baselines
    import torch

    from serving.assets import SMOLLM2_CHECKPOINT, smollm2_gguf
    from serving.llm.tokenizer import ChatTemplate, load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--batch", type=int, default=16, help="concurrent streams")
    parser.add_argument("--single-requests", type=int, default=2, help="one-stream requests")

    def dtypes(text: str) -> list[str]:
        return [d for d in text.split(",") if d]

    parser.add_argument(
        "--served-dtypes",
        type=dtypes,
        default=["float32", "int8"],
        help="served variants: a dtype, or <dtype>-aten for the ATen path (no native kernels)",
    )
    parser.add_argument("--vllm-dtypes", type=dtypes, default=["float32", "bfloat16"])
    parser.add_argument(
        "--settle", type=float, default=10.0, help="seconds of pause before each engine's turn"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "llm_paired")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.tokens < 2 or args.batch < 1 or args.single_requests < 1:
        parser.error("--rounds, --batch, --single-requests must be >= 1 and --tokens >= 2")
    if not args.served_dtypes or not args.vllm_dtypes:
        parser.error("pairs need at least one served dtype and one vLLM dtype")
    if not llm_baselines.baseline_python().exists():
        parser.error("vLLM's virtualenv is missing: run scripts/vllm_env.sh first")

    tokenizer = load_tokenizer(smollm2_gguf())
    template = ChatTemplate(tokenizer)
    per_round = args.single_requests + args.batch
    encoded = [template.encode(p) for p in llm.prompts(1 + args.rounds * per_round)]
    if len(encoded) < 1 + args.rounds * per_round:
        parser.error(f"the Dolly sample has only {len(encoded)} usable prompts")
    warmup, fresh = encoded[0], encoded[1:]
    streams = ["1", str(args.batch)]  # the keys of each round's rates

    log = llm.console.log
    rounds: list[dict[str, dict[str, float]]] = []
    details: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        send: dict[str, Callable[[list[list[int]]], list[Any]]] = {}
        for dtype in args.served_dtypes:
            log(f"starting tritonserver with {llm.TIER} ({dtype})")
            url = stack.enter_context(llm.served_server(dtype)).grpc_url
            send[f"served ({dtype})"] = lambda b, url=url: llm.served_runs(url, b, args.tokens)
        model_dir = llm_baselines.export_safetensors()
        for dtype in args.vllm_dtypes:
            log(f"starting vLLM's CPU server ({dtype})")
            log_path = Path(tempfile.mkdtemp(prefix="bench-vllm-")) / "vllm.log"
            url = stack.enter_context(
                llm_baselines.vllm_server(model_dir, dtype, args.batch, log_path)
            )
            send[f"vLLM ({dtype})"] = lambda b, url=url: llm_baselines.openai_runs(
                url, b, args.tokens, llm.Run
            )
        for name, fn in send.items():
            log(f"warm-up: {name}")
            fn([warmup])
        idle = busy_share(5.0)
        log(f"every server up, none serving: the machine is {idle:.1%} busy")
        pauses: list[float] = []
        engines = list(send)
        for i in range(args.rounds):
            chunk = fresh[i * per_round : (i + 1) * per_round]
            singles, batch = chunk[: args.single_requests], chunk[args.single_requests :]
            rates: dict[str, dict[str, float]] = {}
            for name in engine_order(engines, i):
                # vLLM keeps a core about a tenth busy for a few seconds after its last
                # request: a pause before each engine's turn keeps that off the next one.
                pauses.append(busy_share(args.settle))
                fn = send[name]
                one = llm.timed(
                    f"round {i} {name}, 1 stream", 1, lambda fn=fn, b=singles: llm.sequential(fn, b)
                )
                many = llm.timed(
                    f"round {i} {name}, {args.batch} streams",
                    args.batch,
                    lambda fn=fn, b=batch: fn(b),
                )
                rates[name] = {"1": one["tokens_per_s"], str(args.batch): many["tokens_per_s"]}
                details += [one | {"round": i}, many | {"round": i}]
            rounds.append(rates)

    pairs = {
        f"served ({ours}) / vLLM ({theirs})": paired_ratios(
            rounds, f"served ({ours})", f"vLLM ({theirs})"
        )
        for ours in args.served_dtypes
        for theirs in args.vllm_dtypes
    }
    command = "scripts/vllm_env.sh && flock /tmp/bench.lock .venv/bin/python "
    command += "benchmarks/llm_paired.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    report = {
        "command": command.strip(),
        "checkpoint": SMOLLM2_CHECKPOINT,
        "tokens_per_request": args.tokens,
        "streams": streams,
        "machine": {
            "cpus": os.cpu_count(),
            "cpu_model": llm.cpu_model(),
            "torch": torch.__version__,
            "load_average_at_end": os.getloadavg(),
        },
        "idle_busy_share": idle,
        "pause_busy_share": {"median": statistics.median(pauses), "max": max(pauses)},
        "settle_s": args.settle,
        "data": "Databricks Dolly 15k sample (CC BY-SA 3.0), instructions as prompts",
        "rounds": rounds,
        "pairs": pairs,
        "results": details,
    }
    llm.write_report(args.out, report, markdown(report))
    return 0


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    engines = list(report["rounds"][0])
    lines = [
        "# LLM tier: served vs vLLM's CPU build, paired rounds",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Model: {report['checkpoint']}; {report['tokens_per_request']} new tokens per "
        "request (end-of-sequence disabled); prompts: Dolly 15k instructions (CC BY-SA 3.0) "
        "through the chat template, fresh ones every round, the same for every engine in a "
        f"round. Machine: {machine['cpus']} CPUs, {machine['cpu_model']}, torch "
        f"{machine['torch']}, load average at the end "
        f"{', '.join(f'{x:.2f}' for x in machine['load_average_at_end'])}. Every server "
        "was up for the whole run, the engine order rotating each round; with all of them "
        f"up and none serving the machine was {report['idle_busy_share']:.1%} busy, and in "
        f"the {report['settle_s']:.0f} s pause before each engine's turn "
        f"{report['pause_busy_share']['median']:.1%} (median; at most "
        f"{report['pause_busy_share']['max']:.1%}).",
        "",
        "## Tokens/s per round",
        "",
        "| round | " + " | ".join(f"{e}, {s}" for e in engines for s in report["streams"]) + " |",
        "|---|" + "---|" * (len(engines) * len(report["streams"])),
    ]
    for i, rates in enumerate(report["rounds"]):
        cells = [f"{rates[e][s]:.1f}" for e in engines for s in report["streams"]]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Ratios (tokens/s, ours / theirs), per round",
        "",
        "| pair | streams | median | min | max | rounds >= 1.0 | per round |",
        "|---|---|---|---|---|---|---|",
    ]
    for pair, by_streams in report["pairs"].items():
        for streams, r in by_streams.items():
            rounds = ", ".join(f"{x:.2f}" for x in r["per_round"])
            lines.append(
                f"| {pair} | {streams} | **{r['median']:.2f}x** | {r['min']:.2f}x | "
                f"{r['max']:.2f}x | {r['rounds_at_least_1']}/{len(r['per_round'])} | "
                f"{rounds} |"
            )
    lines += [
        "",
        "## Latency, median over the rounds of each round's p50 (ms)",
        "",
        "| engine | streams | TTFT p50 | ICL p50 |",
        "|---|---|---|---|",
    ]
    for engine in engines:
        for streams in report["streams"]:
            runs = [
                r
                for r in report["results"]
                if r["name"].endswith(f" {engine}, {streams} stream" + "s" * (streams != "1"))
            ]
            ttft = statistics.median(r["ttft_ms"]["p50"] for r in runs)
            icl = statistics.median(r["inter_chunk_latency_ms"]["p50"] for r in runs)
            lines.append(f"| {engine} | {streams} | {ttft:.0f} | {icl:.1f} |")
    lines += ["", "Why the served tier is where it is: docs/llm.md, section Performance."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
