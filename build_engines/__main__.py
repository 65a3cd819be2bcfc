"""``python -m build_engines``: build TensorRT-LLM engines, plan GPUs, write h100 configs.

plan       place models on a node's GPUs (recorded or live nvidia-smi) and explain why
build      build one tier's engine from its spec, with manifest and configs/h100.pbtxt
configure  write every tier's configs/h100.pbtxt from the specs and a plan (no build)
capacity   GPUs, replicas and cost per tier for a traffic description
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from enum import Enum
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from build_engines.architectures import ARCHITECTURES, architecture
from build_engines.build import dry_run_text, make_flow, placement, plan_tiers
from build_engines.planner import PlanOptions, Target, plan
from build_engines.render import (
    AUX_MODELS,
    REPO_ROOT,
    aux_config,
    h100_config_path,
    plan_report,
    relative,
    tier_config,
    write_tier_config,
)
from build_engines.spec import (
    DType,
    KvCacheDType,
    Quantization,
    load_spec,
    tier_specs,
)
from build_engines.topology import Topology, load_topology
from serving.errors import ConfigError

log = logging.getLogger("build_engines")


def _topology_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--topology",
        type=Path,
        default=None,
        metavar="FILE",
        help="recorded `nvidia-smi topo -m` output followed by `nvidia-smi "
        "--query-gpu=index,name,memory.total --format=csv` (default: run nvidia-smi)",
    )


def _enum_arg(parser: argparse.ArgumentParser, flag: str, default: Enum, text: str) -> None:
    """An option whose choices are the values of ``default``'s enum."""
    choices = [m.value for m in type(default)]
    parser.add_argument(
        flag, choices=choices, default=default.value, help=f"{text} (default: %(default)s)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m build_engines",
        description="TensorRT-LLM engine builds, the H100 profile and a GPU topology planner.",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show tracebacks of unexpected errors"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "plan",
        help="place models on GPUs and explain the choice",
        description="Pick the smallest TP that fits, replicas per NVLink group "
        "and which tiers share GPUs; print reasons, roofline "
        "estimates and Triton / compose / Kubernetes snippets.",
    )
    _topology_arg(p)
    p.add_argument(
        "--spec",
        type=Path,
        action="append",
        default=None,
        help="engine spec(s) to place (default: every tier in build_engines/specs)",
    )
    p.add_argument(
        "--model",
        choices=sorted(ARCHITECTURES),
        default=None,
        help="plan one model of this architecture instead of the specs (e.g. dense-32b)",
    )
    _enum_arg(p, "--dtype", DType.BFLOAT16, "with --model: activation dtype")
    _enum_arg(p, "--quantization", Quantization.NONE, "with --model: weight quantization")
    _enum_arg(p, "--kv-cache-dtype", KvCacheDType.AUTO, "with --model: KV cache precision")
    p.add_argument(
        "--concurrency",
        type=int,
        default=32,
        help="with --model: concurrent sequences to size the KV cache for",
    )
    p.add_argument(
        "--context",
        type=int,
        default=4096,
        help="with --model: tokens per sequence (prompt + output)",
    )
    p.add_argument(
        "--gpu-hour-price",
        type=float,
        default=None,
        metavar="USD",
        help="price of one GPU-hour, for the cost per million output tokens",
    )
    p.add_argument(
        "--headroom", type=float, default=0.9, help="fraction of each GPU's memory the plan may use"
    )
    p.add_argument(
        "--overhead-gib",
        type=float,
        default=3.0,
        help="runtime memory per GPU besides weights and KV cache",
    )
    p.add_argument(
        "--max-replicas",
        type=int,
        default=None,
        help="at most this many replicas per model (spare GPUs stay idle for other work)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")

    b = sub.add_parser(
        "build",
        help="build one tier's engine from its spec",
        description="Quantize/convert and build the engine with TensorRT-LLM's "
        "LLM API, write manifest.json beside it and fill the tier's "
        "configs/h100.pbtxt.",
    )
    b.add_argument("spec", type=Path, help="e.g. build_engines/specs/llm_small.yaml")
    _topology_arg(b)
    b.add_argument(
        "--engine-dir",
        type=Path,
        default=None,
        help="where to write the engine (default: the spec's triton.engine_dir)",
    )
    b.add_argument(
        "--repository",
        type=Path,
        default=REPO_ROOT / "model_repository",
        help="model repository whose configs/h100.pbtxt to fill",
    )
    b.add_argument(
        "--dry-run",
        action="store_true",
        help="print every step and file, run nothing (no GPU needed)",
    )

    c = sub.add_parser(
        "configure",
        help="write every tier's configs/h100.pbtxt (no build)",
        description="Render configs/h100.pbtxt for every tier spec, with "
        "gpu_device_ids from the plan on --topology.",
    )
    _topology_arg(c)
    c.add_argument("--repository", type=Path, default=REPO_ROOT / "model_repository")

    k = sub.add_parser(
        "capacity",
        help="GPUs, replicas, TP and cost per tier for a traffic description",
        description="Size each tier for a month of traffic at its TTFT target from published "
        "TensorRT-LLM throughput (docs/capacity.md explains the model and its assumptions).",
    )
    k.add_argument(
        "traffic",
        type=Path,
        nargs="?",
        default=Path(__file__).with_name("traffic") / "400m.yaml",
        help="traffic description (default: the 400M requests/month case)",
    )
    k.add_argument(
        "--topology",
        type=Path,
        default=REPO_ROOT / "tests" / "fixtures" / "topologies" / "8x-h100-sxm.txt",
        help="the node whose planner decides each tier's TP (default: 8x H100 SXM)",
    )
    k.add_argument("--gpu-hour-price", type=float, default=None, metavar="USD")
    k.add_argument("--plot", type=Path, default=None, help="write cost vs TTFT target (PNG)")
    k.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"--{name} must be > 0, got {value}")


def _topology(args: argparse.Namespace) -> Topology:
    topology = load_topology(args.topology)
    if args.topology is not None:
        topology.source = relative(args.topology)  # repo-relative in generated headers
    return topology


def cmd_plan(args: argparse.Namespace, console: Console) -> None:
    topology = _topology(args)
    for name in ("concurrency", "context", "headroom", "overhead_gib"):
        _positive(name.replace("_", "-"), getattr(args, name))
    for name in ("gpu_hour_price", "max_replicas"):
        if getattr(args, name) is not None:
            _positive(name.replace("_", "-"), getattr(args, name))
    if args.headroom > 1:
        raise ConfigError(f"--headroom is a fraction in (0, 1], got {args.headroom}")
    if args.model:
        quant = Quantization(args.quantization)
        kv = KvCacheDType(args.kv_cache_dtype)
        precision = args.dtype if quant is Quantization.NONE else f"{quant.value} weights"
        targets = [
            Target(
                args.model,
                architecture(args.model),
                quant.bytes_per_param,
                kv.bytes_per_value(DType(args.dtype)),
                args.concurrency,
                args.context,
                precision,
            )
        ]
    else:
        specs = [load_spec(p) for p in args.spec] if args.spec else tier_specs()
        targets = [Target.from_spec(s) for s in specs]
    options = PlanOptions(
        headroom=args.headroom,
        overhead_gib=args.overhead_gib,
        gpu_hour_price=args.gpu_hour_price,
        max_replicas=args.max_replicas,
    )
    result = plan(topology, targets, options)
    if args.json:
        data = {
            "topology": topology.source,
            "targets": [
                {
                    "name": t.target.name,
                    "tp": t.tp,
                    "gpu_device_ids": t.gpu_device_ids,
                    "replicas": [asdict(r) for r in t.replicas],
                    "reasons": t.reasons,
                    "estimate": asdict(t.estimate) if t.estimate else None,
                }
                for t in result.targets
            ],
            "aux_gpu": result.aux_gpu,
            "idle": result.idle,
            "notes": result.notes,
            "compose_device_ids": [str(g) for g in result.used_gpus],
        }
        console.print_json(json.dumps(data))
    else:
        console.print(plan_report(result), markup=False, highlight=False)


def cmd_build(args: argparse.Namespace, console: Console) -> None:
    spec = load_spec(args.spec)
    topology = _topology(args)
    tplan = placement(spec, topology)
    gpu_name = topology.gpu(tplan.replicas[0].gpus[0]).name
    engine_dir = args.engine_dir or Path(spec.triton.engine_dir)
    flow = make_flow(
        spec, engine_dir, args.repository, tplan.gpu_device_ids, gpu_name, topology.source
    )
    if args.dry_run:
        console.print(dry_run_text(flow), markup=False, highlight=False)
        return
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
    ) as progress:
        for n, step in enumerate(flow.steps, 1):
            task = progress.add_task(f"[{n}/{len(flow.steps)}] {step.title}", total=1)
            step.action()
            progress.update(task, completed=1)
    console.print(
        f"engine: {engine_dir} (manifest.json beside it); config: {flow.files[-1]}",
        markup=False,
        highlight=False,
    )


def cmd_configure(args: argparse.Namespace, console: Console) -> None:
    topology = _topology(args)
    result = plan_tiers(topology)
    for spec in tier_specs():
        tplan = placement(spec, topology, result)
        text = tier_config(spec, tplan.gpu_device_ids, source=f"planned on {topology.source}")
        path = write_tier_config(args.repository, spec, text)
        console.print(
            f"{path}: gpu_device_ids={tplan.gpu_device_ids}", markup=False, highlight=False
        )
    for model in AUX_MODELS if result.aux_gpu is not None else ():
        path = h100_config_path(args.repository, model)
        path.write_text(
            aux_config(path.read_text(), result.aux_gpu, f"planned on {topology.source}")
        )
        console.print(f"{path}: gpus=[{result.aux_gpu}]", markup=False, highlight=False)


def cmd_capacity(args: argparse.Namespace, console: Console) -> None:
    from dataclasses import replace

    from build_engines import capacity

    traffic = capacity.load_traffic(args.traffic)
    if args.gpu_hour_price is not None:
        _positive("gpu-hour-price", args.gpu_hour_price)
        traffic = replace(traffic, gpu_hour_price=args.gpu_hour_price)
    throughput = capacity.load_throughput()
    tp = capacity.planner_tp(args.topology)
    result = capacity.plan_capacity(traffic, throughput, tp)
    if args.json:
        data = {
            "traffic": asdict(traffic),
            "tiers": [asdict(t) for t in result.tiers],
            "gpus": result.gpus,
            "monthly_cost": result.monthly_cost,
            "cost_per_million_requests": result.cost_per_million_requests,
            "cost_per_million_tokens": result.cost_per_million_tokens,
        }
        console.print_json(json.dumps(data))
    else:
        console.print(capacity.report(result), markup=False, highlight=False)
    if args.plot:
        scales = [0.25, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0]
        points = capacity.cost_curve(traffic, throughput, tp, scales)
        capacity.plot_cost_curve(traffic, points, args.plot)
        console.print(f"plot: {args.plot}", markup=False, highlight=False)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    console = Console(soft_wrap=True)
    command = {
        "plan": cmd_plan,
        "build": cmd_build,
        "configure": cmd_configure,
        "capacity": cmd_capacity,
    }[args.command]
    errors = Console(stderr=True, soft_wrap=True)
    try:
        command(args, console)
    except ConfigError as exc:
        errors.print(f"error: {exc}", markup=False, highlight=False)
        return 2
    except Exception as exc:  # a TensorRT-LLM or I/O failure deep in a build
        if args.verbose:
            log.exception("%s failed", args.command)
        errors.print(
            f"error: {args.command} failed: {type(exc).__name__}: {exc} (rerun with "
            f"--verbose for the traceback)",
            markup=False,
            highlight=False,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
