"""Where a decode step of the CPU engine spends its time, at 1 and at 16 streams.

Runs the tier's runner in-process (no server) under ``torch.profiler`` and groups the
operators into what the issue asks about: the weight matmuls, attention, the KV cache
writes, norms and RoPE (elementwise work), and everything else, which is per-operator
dispatch in Python and ATen. Also times the same step with the profiler off, and one
token pick (sampling), so the shares add up to a measured step.

    flock /tmp/bench.lock .venv/bin/python benchmarks/llm_profile.py

Results go to ``benchmarks/results/llm_profile.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from serving.assets import smollm2_gguf
from serving.llm.runner import LlamaRunner, load_hf_model
from serving.llm.sampling import Sampler, SamplingParams, pick_tokens
from serving.llm.tokenizer import ChatTemplate, load_tokenizer

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"

#: ATen operator name -> the group it is reported in.
GROUPS = {
    "aten::mm": "weight matmuls",
    "aten::addmm": "weight matmuls",
    "aten::_weight_int8pack_mm": "weight matmuls",
    "mkldnn::_linear_pointwise": "weight matmuls",
    "aten::bmm": "attention",
    "aten::_softmax": "attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::index_put_": "KV cache writes",
    "aten::_index_put_impl_": "KV cache writes",
    "aten::_fused_rms_norm": "norms, RoPE, SiLU, residual",
    "aten::mul": "norms, RoPE, SiLU, residual",
    "aten::add": "norms, RoPE, SiLU, residual",
    "aten::silu": "norms, RoPE, SiLU, residual",
    "aten::cat": "norms, RoPE, SiLU, residual",
    "aten::neg": "norms, RoPE, SiLU, residual",
}


def step_profile(runner: LlamaRunner, prompt: list[int], streams: int, steps: int) -> dict:
    for slot in range(streams):
        runner.prefill(slot, prompt)
    positions = [len(prompt)] * streams
    tokens = [100] * streams
    for _ in range(3):
        runner.decode(tokens, positions)
    start = time.perf_counter()
    for i in range(steps):
        runner.decode(tokens, [p + i for p in positions])
    step_ms = (time.perf_counter() - start) / steps * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            runner.decode(tokens, [p + i for p in positions])
    self_us: dict[str, float] = {}
    calls = 0
    for event in prof.key_averages():
        group = GROUPS.get(event.key, "other operators (dispatch, views, copies)")
        self_us[group] = self_us.get(group, 0.0) + event.self_cpu_time_total
        calls += event.count
    total = sum(self_us.values())
    logits = runner.decode(tokens, positions)
    samplers = [Sampler(SamplingParams()) for _ in range(streams)]
    start = time.perf_counter()
    for _ in range(steps):
        pick_tokens(logits, samplers)
    pick_ms = (time.perf_counter() - start) / steps * 1e3
    return {
        "streams": streams,
        "step_ms": step_ms,
        "tokens_per_s": streams / step_ms * 1e3,
        "greedy_pick_ms": pick_ms,
        "operators_per_step": calls / steps,
        "share": {k: v / total for k, v in sorted(self_us.items(), key=lambda kv: -kv[1])},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "int8"], default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS / "llm_profile")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = smollm2_gguf()
    prompt = ChatTemplate(load_tokenizer(path)).encode("What is the capital of France?")
    runner = LlamaRunner(load_hf_model(path), 16, 512, getattr(torch, args.dtype))
    rows = [step_profile(runner, prompt, n, args.steps) for n in (1, 16)]
    report = {
        "command": "flock /tmp/bench.lock .venv/bin/python benchmarks/llm_profile.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "dtype": args.dtype,
        "threads": args.threads,
        "load_average_at_end": os.getloadavg(),
        "rows": rows,
    }
    lines = [
        "# Where a decode step goes (in-process runner, no server)",
        "",
        f"Command: `{report['command'].strip()}`; dtype {args.dtype}, {args.threads} threads, "
        f"load average at the end {', '.join(f'{x:.2f}' for x in os.getloadavg())}.",
        "",
    ]
    for row in rows:
        lines += [
            f"## {row['streams']} stream(s): {row['step_ms']:.1f} ms per step "
            f"({row['tokens_per_s']:.1f} tok/s), {row['operators_per_step']:.0f} operators "
            f"per step, greedy pick {row['greedy_pick_ms']:.2f} ms",
            "",
            "| group | share of profiled CPU time |",
            "|---|---|",
            *[f"| {k} | {v:.1%} |" for k, v in row["share"].items()],
            "",
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
