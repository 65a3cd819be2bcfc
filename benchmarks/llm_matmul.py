"""Which weight layout the CPU tier's products should use, by row count, on this machine.

One decode step of n sequences is a product of n rows with each of the 120 layer weights;
a prefill is one of many rows. This times the 30 layers' real weights (SmolLM2-135M) in
each layout the runner has, at 1-64 rows, in interleaved rounds (so a drift of the VM
hits every layout alike), and reports the median per layout and row count:

- ``plain``: float32 ``[in, out]``, ``x @ w`` (MKL);
- ``blocked``: float32 in oneDNN's blocked layout (``prepack_float32``);
- ``int8``: int8 with bfloat16 scales (``_weight_int8pack_mm``, the int8 tier's decode);
- ``native-float32``, ``native-bfloat16``, ``native-int8``: the native kernels' packed
  panels (``serving.llm.native``, float32 accumulation), what the runner uses wherever the
  kernels load; on a CPU with AVX-512 the same products on AVX2 as well
  (``native-<dtype>-avx2``: the same bits, narrower registers);
- ``aten-bfloat16``, where the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX):
  ``x @ w`` with both in bfloat16 through oneDNN, what vLLM's CPU build runs in bfloat16.

``serving.llm.runner.FLOAT32_PLAIN_MAX_ROWS`` and ``INT8_MAX_ROWS`` (the ATen path's
choices) are read off this.

    flock /tmp/bench.lock .venv/bin/python benchmarks/llm_matmul.py

Results go to ``benchmarks/results/llm_matmul.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from llm import cpu_flags, cpu_model  # benchmarks/ is on sys.path when run as a script

from serving.assets import smollm2_gguf
from serving.llm import native
from serving.llm.runner import (
    FLOAT32_PLAIN_MAX_ROWS,
    INT8_MAX_ROWS,
    Float32Weight,
    Int8Weight,
    LlamaRunner,
    float32_matmul,
    load_hf_model,
    quantize_int8,
)

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def layer_weights(runner: LlamaRunner) -> list[Float32Weight]:
    """The 120 layer weights of a float32 runner (built with its blocked copy)."""
    return [w for layer in runner.layers for w in layer.matmul_weights()]


def layouts(held: list[Float32Weight]) -> dict[str, Callable[[dict[int, torch.Tensor]], None]]:
    """Layout name -> one pass of products over every layer weight, given rows per width."""
    int8 = [Int8Weight.quantize(w.plain) for w in held]
    kernels = native.load()
    if kernels is None:
        raise SystemExit("the native kernels did not load (see the log): nothing to compare")
    packed = {
        "native-float32": [kernels.pack(w.plain) for w in held],
        "native-bfloat16": [kernels.pack(w.plain, torch.bfloat16) for w in held],
        "native-int8": [
            kernels.pack(q.t(), torch.int8, scales)
            for q, scales in (quantize_int8(w.plain) for w in held)
        ],
    }

    def native_pass(
        weights: list[native.PackedWeight], on: native.NativeKernels
    ) -> Callable[[dict[int, torch.Tensor]], None]:
        def one_pass(xs: dict[int, torch.Tensor]) -> None:
            for w in weights:
                on.matmul(xs[w.in_features], w)

        return one_pass

    def plain(xs: dict[int, torch.Tensor]) -> None:
        for w in held:
            torch.mm(xs[w.plain.shape[0]], w.plain)

    def blocked(xs: dict[int, torch.Tensor]) -> None:
        for w in held:
            float32_matmul(xs[w.plain.shape[0]], w.blocked)

    def int8_mm(xs: dict[int, torch.Tensor]) -> None:
        for w in int8:
            torch.ops.aten._weight_int8pack_mm(xs[w.q.shape[1]].to(torch.bfloat16), w.q, w.scales)

    passes = {"plain": plain, "blocked": blocked, "int8": int8_mm}
    if native_bfloat16():
        bf16 = [w.plain.to(torch.bfloat16) for w in held]

        def aten_bfloat16(xs: dict[int, torch.Tensor]) -> None:
            for w in bf16:
                torch.mm(xs[w.shape[0]].to(torch.bfloat16), w)

        passes["aten-bfloat16"] = aten_bfloat16
    passes |= {name: native_pass(weights, kernels) for name, weights in packed.items()}
    if kernels.isa != "avx2":
        avx2 = kernels.with_isa("avx2")
        passes |= {f"{name}-avx2": native_pass(w, avx2) for name, w in packed.items()}
    return passes


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX); elsewhere
    ATen's bfloat16 product is emulated, two orders of magnitude slower."""
    return not {"avx512_bf16", "amx_bf16"}.isdisjoint(cpu_flags())


def measure(held: list[Float32Weight], rows: list[int], rounds: int, repeats: int) -> dict:
    passes = layouts(held)
    widths = {w.plain.shape[0] for w in held}
    times: dict[str, dict[int, list[float]]] = {k: {r: [] for r in rows} for k in passes}
    for _ in range(rounds):
        for n in rows:
            xs = {width: torch.randn(n, width) for width in widths}
            for name, one_pass in passes.items():
                one_pass(xs)  # warm
                best = float("inf")
                for _ in range(repeats):
                    start = time.perf_counter()
                    one_pass(xs)
                    best = min(best, time.perf_counter() - start)
                times[name][n].append(best * 1e3)
    return {
        name: {str(n): {"median_ms": statistics.median(v), "rounds_ms": v} for n, v in by.items()}
        for name, by in times.items()
    }


def markdown(report: dict) -> str:
    rows = report["rows"]
    names = list(report["ms"])
    lines = [
        "# Weight layouts for the CPU tier's products, by row count",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['cpu']}, {report['threads']} threads, torch {report['torch']}; "
        f"load average at the end {', '.join(f'{x:.2f}' for x in report['load_average_at_end'])}. "
        f"One pass = the 120 layer weights of SmolLM2-135M ({report['float32_mb']:.0f} MB in "
        f"float32); median over {report['rounds']} interleaved rounds of the best of "
        f"{report['repeats']}.",
        "",
        "| rows | " + " | ".join(f"{n} (ms)" for n in names) + " | fastest ATen float32 |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for n in rows:
        med = {name: report["ms"][name][str(n)]["median_ms"] for name in names}
        best = min(("plain", "blocked"), key=lambda k: med[k])
        lines.append(f"| {n} | " + " | ".join(f"{med[k]:.1f}" for k in names) + f" | {best} |")
    lines += [
        "",
        "Where the native kernels load the runner uses `native-<dtype>` at every row count "
        "(one copy of each weight). On the ATen path it uses `plain` up to "
        f"{report['float32_plain_max_rows']} row(s) and `blocked` above "
        "(`FLOAT32_PLAIN_MAX_ROWS`); the int8 tier uses `int8` up to "
        f"{report['int8_max_rows']} rows (`INT8_MAX_ROWS`) and `blocked` above.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "llm_matmul")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    runner = LlamaRunner(load_hf_model(smollm2_gguf()), 1, 8, torch.float32, native_kernels=False)
    held = layer_weights(runner)
    report = {
        "command": "flock /tmp/bench.lock .venv/bin/python benchmarks/llm_matmul.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "cpu": cpu_model(),
        "threads": args.threads,
        "torch": torch.__version__,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "rows": args.rows,
        "float32_mb": sum(w.nbytes for w in held) / 1e6,
        "float32_plain_max_rows": FLOAT32_PLAIN_MAX_ROWS,
        "int8_max_rows": INT8_MAX_ROWS,
        "ms": measure(held, args.rows, args.rounds, args.repeats),
        "load_average_at_end": os.getloadavg(),
    }
    report["command"] = report["command"].strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
