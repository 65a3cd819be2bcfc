"""aiperf against ``python -m client bench`` on the same load, each tool's CPU accounted.

NVIDIA's aiperf is the judge of the client's numbers. Both tools drive the same Triton
endpoint, ``/v2/models/<model>/generate_stream`` over HTTP (aiperf through its
``template`` endpoint type; the client with ``--protocol http``), with the same
closed-loop concurrency, request count and output length, one after the other.

Fairness: aiperf alone used about one of this machine's two cores (issue 11), which
slowed the server it measured. Here the server is pinned to one core and the tools to
the other (``sched_setaffinity``, what ``taskset`` does), and the default model is the
``ticker`` fixture: it streams ``--tokens`` responses exactly ``--interval-ms`` apart at
almost no CPU, so the server is not the bottleneck and whatever a tool's own overhead
adds shows in its numbers. Each response is the text ``" tok"``, which the tiers'
tokenizer counts as exactly one token, so aiperf (which counts tokens by tokenizing the
text) and the client (which counts responses with text) see the same token counts.

Usage (aiperf in its own virtualenv, never the project's)::

    python benchmarks/aiperf_compare.py --aiperf ~/.cache/triton-llm-stack/aiperf-venv/bin/aiperf
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway.config import DEFAULT_ROUTER_CONFIG, RoutingSettings  # noqa: E402
from gateway.tokenizer import cache_folder, load  # noqa: E402
from serving.launcher import LaunchOptions, TritonLauncher  # noqa: E402
from serving.repository import configured_copy  # noqa: E402
from serving.runtime import child_command  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
TICKER_REPO = REPO / "tests" / "fixtures" / "ticker_repo"

#: (label, aiperf's export key, the client's summary key, statistic)
COMPARED = [
    ("TTFT p50 (ms)", "time_to_first_token", "ttft_ms", "p50"),
    ("TTFT p90 (ms)", "time_to_first_token", "ttft_ms", "p90"),
    ("TTFT p99 (ms)", "time_to_first_token", "ttft_ms", "p99"),
    ("ITL p50 (ms)", "inter_token_latency", "inter_token_latency_ms", "p50"),
    ("ITL p99 (ms)", "inter_token_latency", "inter_token_latency_ms", "p99"),
    ("ICL p50 (ms)", "inter_chunk_latency", "inter_chunk_latency_ms", "p50"),
    ("ICL p99 (ms)", "inter_chunk_latency", "inter_chunk_latency_ms", "p99"),
    ("output tokens/s", "output_token_throughput", "output_tokens_per_s", "avg"),
    ("requests/s", "request_throughput", "requests_per_s", "avg"),
]


def _pin(core: int) -> None:
    os.sched_setaffinity(0, {core})


def _timed(command: list[str], core: int, log: Path) -> tuple[float, float]:
    """Run ``command`` pinned to ``core``; its wall time and CPU time (with descendants)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with log.open("w") as out:
        subprocess.run(
            child_command(command, cpus={core}),
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
        )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def payload_template(tokens: int) -> str:
    """aiperf's request body for Triton's generate endpoint (Jinja, ``text`` is the prompt)."""
    return '{"text_input": {{ text|tojson }}, "max_tokens": ' + str(tokens) + ', "stream": true}'


def run_aiperf(args: argparse.Namespace, url: str, tokenizer: Path, out: Path) -> dict[str, Any]:
    template = out / "payload.jinja"
    template.write_text(payload_template(args.tokens))
    command = [
        args.aiperf,
        "profile",
        "-m",
        args.model,
        "--endpoint-type",
        "template",
        "--custom-endpoint",
        f"/v2/models/{args.model}/generate_stream",
        "--streaming",
        "--url",
        f"http://{url}",
        "--extra-inputs",
        f"payload_template:{template}",
        "--extra-inputs",
        "response_field:text_output",
        "--tokenizer",
        str(tokenizer),
        "--concurrency",
        str(args.concurrency),
        "--request-count",
        str(args.requests),
        "--warmup-request-count",
        str(args.warmup),
        "--synthetic-input-tokens-mean",
        str(args.prompt_words),
        "--synthetic-input-tokens-stddev",
        "0",
        "--output-tokens-mean",
        str(args.tokens),
        "--output-tokens-stddev",
        "0",
        "--random-seed",
        "1",
        "--ui-type",
        "none",
        "--artifact-dir",
        str(out / "aiperf"),
    ]
    wall, cpu = _timed(command, args.tool_core, out / "aiperf.log")
    export = json.loads(next((out / "aiperf").rglob("profile_export_aiperf.json")).read_text())
    figures = {}
    for _, key, _, stat in COMPARED:
        figures[f"{key}.{stat}"] = export[key][stat]
    figures["output_sequence_length.avg"] = export["output_sequence_length"]["avg"]
    figures["request_count"] = export["request_count"]["avg"]
    return {"command": shlex.join(command), "wall_s": wall, "cpu_s": cpu, "figures": figures}


def run_client(args: argparse.Namespace, url: str, out: Path) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "client",
        "bench",
        "--protocol",
        "http",
        "--url",
        url,
        "--target",
        "llm_small_text",
        "--model",
        args.model,
        "--users",
        str(args.concurrency),
        "--requests",
        str(args.requests),
        "--warmup",
        str(args.warmup),
        "--synthetic-words",
        str(args.prompt_words),
        "--output-tokens",
        str(args.tokens),
        "--output-dir",
        str(out / "client"),
        "--no-plots",
    ]
    wall, cpu = _timed(command, args.tool_core, out / "client.log")
    summary = json.loads((out / "client" / "bench.json").read_text())["summary"]
    figures = {}
    for _, _, key, stat in COMPARED:
        value = summary[key]
        figures[f"{key}.{stat}"] = value if stat == "avg" else value[stat]
    figures["output_tokens_per_request"] = summary["output_tokens"] / max(summary["succeeded"], 1)
    figures["succeeded"] = summary["succeeded"]
    return {"command": shlex.join(command), "wall_s": wall, "cpu_s": cpu, "figures": figures}


def compare(aiperf: dict[str, Any], client: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for label, a_key, c_key, stat in COMPARED:
        a, c = aiperf["figures"][f"{a_key}.{stat}"], client["figures"][f"{c_key}.{stat}"]
        ratio = c / a if a else float("nan")
        rows.append(
            {
                "metric": label,
                "aiperf": a,
                "client": c,
                "ratio": ratio,
                "within_10pct": abs(ratio - 1) <= 0.10,
            }
        )
    return rows


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        "# aiperf vs `python -m client bench`, same load, same endpoint",
        "",
        f"{report['machine']}; {report['when']}; load average before the run: {report['load_average']}.",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Model `{cfg['model']}` (interval {cfg['interval_ms']:g} ms, {cfg['tokens']} responses of one token each), "
        f"`/v2/models/{cfg['model']}/generate_stream` over HTTP; closed loop, concurrency {cfg['concurrency']}, "
        f"{cfg['requests']} counted requests after {cfg['warmup']} warm-up. Triton pinned to core "
        f"{cfg['server_core']}, each tool (run alone, one after the other) to core {cfg['tool_core']}.",
        "",
    ]
    for i, run in enumerate(report["runs"]):
        a, c = run["aiperf"], run["client"]
        lines += [
            f"## Round {i + 1}",
            "",
            "| metric | aiperf | client bench | client / aiperf | within 10% |",
            "|---|---|---|---|---|",
        ]
        for row in run["rows"]:
            lines.append(
                f"| {row['metric']} | {row['aiperf']:.2f} | {row['client']:.2f} | {row['ratio']:.3f} | "
                f"{'yes' if row['within_10pct'] else '**no**'} |"
            )
        lines += [
            f"| tool CPU time (s) | {a['cpu_s']:.1f} in {a['wall_s']:.1f} s wall | {c['cpu_s']:.1f} in {c['wall_s']:.1f} s wall | | |",
            f"| output tokens per request | {a['figures']['output_sequence_length.avg']:.2f} | {c['figures']['output_tokens_per_request']:.2f} | | |",
            "",
        ]
    lines += [
        "Exact commands (aiperf from its own virtualenv, `python -m venv "
        "~/.cache/triton-llm-stack/aiperf-venv && ~/.cache/triton-llm-stack/aiperf-venv/bin/pip "
        f"install aiperf==0.13.0`, never the project's; `payload.jinja` holds `{payload_template(cfg['tokens'])}`):",
        "",
        "```bash",
        report["runs"][0]["aiperf"]["command"],
        report["runs"][0]["client"]["command"],
        "```",
        "",
        report.get("note", ""),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--aiperf", required=True, help="the aiperf executable (its own venv)")
    parser.add_argument("--model", default="ticker")
    parser.add_argument("--interval-ms", type=float, default=20.0)
    parser.add_argument("--tokens", type=int, default=32, help="responses (tokens) per request")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--prompt-words", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--server-core", type=int, default=1)
    parser.add_argument("--tool-core", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS / "aiperf_compare")
    args = parser.parse_args(argv)

    routing = RoutingSettings.from_file(DEFAULT_ROUTER_CONFIG)
    load(None, routing.tokenizer_dir)  # exports the tiers' tokenizer folder once
    tokenizer = cache_folder(routing.tokenizer_dir)
    load_average = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="aiperf-compare-") as tmp:
        where = Path(tmp)
        repo = configured_copy(
            TICKER_REPO,
            where,
            {"ticker": {"interval_ms": f"{args.interval_ms:g}", "piece": " tok"}},
        )
        options = LaunchOptions.on_free_ports(models=[args.model], repository=repo)
        launcher = TritonLauncher(options)
        mine = os.sched_getaffinity(0)
        _pin(args.server_core)  # the server inherits this core
        try:
            launcher.start()
        finally:
            os.sched_setaffinity(0, mine)
        url = f"127.0.0.1:{options.http_port}"
        runs = []
        try:
            for i in range(args.rounds):
                out = where / f"round{i}"
                out.mkdir()
                aiperf = run_aiperf(args, url, tokenizer, out)
                client = run_client(args, url, out)
                rows = compare(aiperf, client)
                runs.append({"aiperf": aiperf, "client": client, "rows": rows})
                for row in rows:
                    print(json.dumps(row), flush=True)
        finally:
            launcher.stop()
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": load_average,
        "command": "python benchmarks/aiperf_compare.py " + shlex.join(argv or sys.argv[1:]),
        "config": {
            "model": args.model,
            "interval_ms": args.interval_ms,
            "tokens": args.tokens,
            "concurrency": args.concurrency,
            "requests": args.requests,
            "warmup": args.warmup,
            "server_core": args.server_core,
            "tool_core": args.tool_core,
        },
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {args.output}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
