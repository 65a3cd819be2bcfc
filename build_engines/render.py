"""Text the planner and the build emit: tier ``configs/h100.pbtxt``, compose, Kubernetes.

Everything here is generated from a validated spec, a plan and (after a build) the
engine's own ``config.json``, so the h100 configs are never edited by hand and cannot
drift from the engine they serve.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from build_engines.planner import Plan, TargetPlan
from build_engines.spec import EngineSpec
from serving.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
ORCHESTRATOR_WORKER = "/opt/tritonserver/backends/tensorrtllm/trtllmExecutorWorker"

# The tensorrt_llm tensor interface the CPU tiers share (DESIGN.md "Model contracts").
# (name, type, dims, optional, scalar reshape)
TIER_INPUTS = [
    ("input_ids", "TYPE_INT32", "-1", False, False),
    ("input_lengths", "TYPE_INT32", "1", False, True),
    ("request_output_len", "TYPE_INT32", "1", False, False),
    ("end_id", "TYPE_INT32", "1", True, True),
    ("pad_id", "TYPE_INT32", "1", True, True),
    ("streaming", "TYPE_BOOL", "1", True, False),
    ("temperature", "TYPE_FP32", "1", True, True),
    ("runtime_top_k", "TYPE_INT32", "1", True, True),
    ("runtime_top_p", "TYPE_FP32", "1", True, True),
    ("seed", "TYPE_UINT64", "1", True, True),
    # tensorrt_llm's stop: the router ends a cancelled stream with a stop request (same id)
    ("stop", "TYPE_BOOL", "1", True, False),
]
TIER_OUTPUTS = [("output_ids", "TYPE_INT32", "-1, -1"), ("sequence_length", "TYPE_INT32", "-1")]


def _bool(value: bool) -> str:
    return "true" if value else "false"


def relative(path: Path | None) -> str:
    """A repo-relative path for generated headers (absolute paths differ per checkout)."""
    if path is None:
        return "<unsaved spec>"
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def kv_cache_tokens(spec: EngineSpec) -> int:
    """The KV cache the planner sizes each replica's memory for, in tokens."""
    return spec.serving.target_concurrency * spec.serving.target_context


def tier_parameters(spec: EngineSpec, gpu_device_ids: str, engine_dir: str) -> dict[str, str]:
    """tensorrtllm_backend parameters of one tier, plus the spec it came from."""
    params = {
        "gpt_model_type": "inflight_fused_batching",
        "gpt_model_path": engine_dir,
        "max_beam_width": "1",
        "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
        "batch_scheduler_policy": spec.triton.batch_scheduler_policy.value,
        # The KV cache is the planner's budget (target_concurrency x target_context tokens),
        # not a fraction of whatever is free at load time: embedding loads in the same wave
        # on a shared GPU, and load order must not decide who runs out of memory. The
        # backend takes the smaller of the two, so the fraction is only an upper bound.
        "max_tokens_in_paged_kv_cache": str(kv_cache_tokens(spec)),
        "kv_cache_free_gpu_mem_fraction": f"{spec.kv_cache.free_gpu_mem_fraction:g}",
        "enable_kv_cache_reuse": _bool(spec.kv_cache.enable_block_reuse),
        "enable_chunked_context": _bool(spec.triton.enable_chunked_context),
        "exclude_input_in_output": _bool(spec.triton.exclude_input_in_output),
        "gpu_device_ids": gpu_device_ids,
        "tokenizer_dir": spec.triton.tokenizer_dir,
        "engine_spec": relative(spec.path),
        "engine_spec_sha256": spec.sha256(),
    }
    if ";" in gpu_device_ids:
        # Several instances of one model need the orchestrator's executor worker
        # (TRTLLM_ORCHESTRATOR=1 in the server environment).
        params["executor_worker_path"] = ORCHESTRATOR_WORKER
    return params


def check_engine_config(spec: EngineSpec, engine_config: dict[str, Any]) -> None:
    """Refuse to write a config for an engine built from different limits or parallelism."""
    build = engine_config.get("build_config", {})
    mapping = engine_config.get("pretrained_config", {}).get("mapping", {})
    wanted = {
        "max_batch_size": spec.limits.max_batch_size,
        "max_input_len": spec.limits.max_input_len,
        "max_seq_len": spec.limits.max_seq_len,
        "max_num_tokens": spec.limits.max_num_tokens,
    }
    problems = [
        f"{k}: engine {build[k]} != spec {v}"
        for k, v in wanted.items()
        if k in build and build[k] != v
    ]
    for key, value in (("tp_size", spec.tp), ("pp_size", spec.pp)):
        if key in mapping and mapping[key] != value:
            problems.append(f"{key}: engine {mapping[key]} != spec {value}")
    if problems:
        raise ConfigError(
            f"{spec.tier}: the engine does not match its spec ("
            + "; ".join(problems)
            + "); rebuild it"
        )


def tier_config(
    spec: EngineSpec, gpu_device_ids: str, engine_dir: str | None = None, source: str = ""
) -> str:
    """The tier's ``configs/h100.pbtxt`` text."""
    engine_dir = engine_dir or spec.triton.engine_dir
    instances = gpu_device_ids.count(";") + 1
    out = [
        f"# GENERATED by `python -m build_engines` from {relative(spec.path)}"
        + (f" ({source})" if source else "")
        + ". Do not edit: change the spec and rerun.",
        f"# {spec.description}",
        f'name: "{spec.tier}"',
        'backend: "tensorrtllm"',
        f"max_batch_size: {spec.limits.max_batch_size}",
        "model_transaction_policy { decoupled: true }",
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {spec.triton.max_queue_delay_microseconds}",
        f"  default_queue_policy {{ max_queue_size: {spec.triton.max_queue_size} }}",
        "}",
        "input [",
    ]
    items = []
    for name, dtype, dims, optional, scalar in TIER_INPUTS:
        body = [f'    name: "{name}"', f"    data_type: {dtype}", f"    dims: [ {dims} ]"]
        if scalar:
            body.append("    reshape: { shape: [ ] }")
        if optional:
            body.append("    optional: true")
        if name == "input_ids":
            body.append("    allow_ragged_batch: true")
        items.append("  {\n" + "\n".join(body) + "\n  }")
    out.append(",\n".join(items))
    out.append("]")
    out.append("output [")
    out.append(
        ",\n".join(
            f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: [ {d} ]\n  }}'
            for n, t, d in TIER_OUTPUTS
        )
    )
    out.append("]")
    out.append("# The backend places each instance on its gpu_device_ids itself: KIND_CPU.")
    out.append(f"instance_group [ {{ count: {instances}, kind: KIND_CPU }} ]")
    for key, value in tier_parameters(spec, gpu_device_ids, engine_dir).items():
        out.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    return "\n".join(out) + "\n"


#: The small encoders that share the plan's auxiliary GPU (search embeddings, intent).
AUX_MODELS = ("embedding", "intent_encoder")
_AUX_GPUS = re.compile(r"^(\s*gpus: \[ )[0-9, ]+( \])$", re.M)


def aux_config(text: str, gpu: int, source: str) -> str:
    """An aux model's ``configs/h100.pbtxt`` with its instances on the plan's shared GPU.

    The rest of that file is written by hand (it is not a TensorRT-LLM engine); only the
    placement comes from the plan, in one marked line, so it cannot drift from it.
    """
    if len(_AUX_GPUS.findall(text)) != 1:
        raise ConfigError(f"{source}: expected one 'gpus: [ N ]' line in an aux h100.pbtxt")
    text = _AUX_GPUS.sub(rf"\g<1>{gpu}\g<2>", text)
    marker = "# placement GENERATED by `python -m build_engines configure`"
    lines = [ln for ln in text.splitlines() if not ln.startswith(marker)]
    return "\n".join([f"{marker} ({source}): GPU{gpu}", *lines]) + "\n"


def h100_config_path(repository: Path, tier: str) -> Path:
    return repository / tier / "configs" / "h100.pbtxt"


def write_tier_config(repository: Path, spec: EngineSpec, text: str) -> Path:
    path = h100_config_path(repository, spec.tier)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def compose_snippet(plan: Plan) -> str:
    """docker compose ``deploy.resources`` for the one tritonserver that serves the plan."""
    ids = ", ".join(f'"{g}"' for g in plan.used_gpus)
    return (
        "services:\n  triton:\n    deploy:\n      resources:\n        reservations:\n"
        "          devices:\n            - driver: nvidia\n"
        f"              device_ids: [{ids}]\n              capabilities: [gpu]\n"
    )


def kubernetes_snippet(plan: Plan) -> str:
    """Container resources for Kubernetes (the device plugin hands out whole GPUs)."""
    n = len(plan.used_gpus)
    return f"resources:\n  limits:\n    nvidia.com/gpu: {n}\n  requests:\n    nvidia.com/gpu: {n}\n"


def triton_snippet(tplan: TargetPlan) -> str:
    count = len(tplan.replicas)
    return (
        f"# {tplan.target.name}\ninstance_group [ {{ count: {count}, kind: KIND_CPU }} ]\n"
        f'parameters {{ key: "gpu_device_ids" value: {{ string_value: '
        f'"{tplan.gpu_device_ids}" }} }}\n'
    )


def plan_report(plan: Plan) -> str:
    """Human-readable plan: decisions, reasons, estimates and the config snippets."""
    lines = [
        f"Topology: {plan.topology.source or 'given'}: {len(plan.topology.gpus)} GPUs ("
        + ", ".join(sorted({g.name for g in plan.topology.gpus}))
        + ")"
    ]
    lines += [f"  {n}" for n in plan.notes[:1]]
    for tplan in plan.targets:
        lines.append("")
        if tplan.replicas:
            lines.append(
                f"{tplan.target.name}: {len(tplan.replicas)}x TP{tplan.tp} on "
                + ", ".join("GPU" + "+GPU".join(map(str, r.gpus)) for r in tplan.replicas)
            )
        else:
            lines.append(f"{tplan.target.name}: not placed")
        lines += [f"  - {r}" for r in tplan.reasons]
        if tplan.estimate:
            est = tplan.estimate
            lines.append(
                f"  - ESTIMATE (roofline, memory-bandwidth bound; real engines reach "
                f"less): per replica {est.single_stream_tok_s:,.0f} tok/s for one "
                f"stream, {est.batch_tok_s:,.0f} tok/s aggregate at "
                f"{tplan.target.concurrency} concurrent; node total "
                f"{est.batch_tok_s * len(tplan.replicas):,.0f} tok/s"
            )
            if est.cost_per_million is not None:
                lines.append(
                    f"  - ESTIMATE: ${est.cost_per_million:,.3f} per million output "
                    f"tokens at ${plan.options.gpu_hour_price:g}/GPU-hour (roofline, "
                    f"so a lower bound)"
                )
    lines.append("")
    lines.append("GPU memory (planned / usable):")
    for index, items in plan.gpu_usage().items():
        gpu = plan.topology.gpu(index)
        planned = sum(gib for _, gib in items)
        what = " + ".join(name for name, _ in items) or "idle"
        lines.append(
            f"  GPU{index} {gpu.name}: {planned:5.1f} / "
            f"{gpu.memory_gib * plan.options.headroom:5.1f} GiB  {what}"
        )
    lines.append("")
    lines += [f"Note: {n}" for n in plan.notes[1:]]
    placed = [t for t in plan.targets if t.replicas]
    if placed:
        lines.append("")
        lines.append("Triton (configs/h100.pbtxt of each tier):")
        lines += ["  " + ln for t in placed for ln in triton_snippet(t).splitlines()]
        lines.append("docker compose:")
        lines += ["  " + ln for ln in compose_snippet(plan).splitlines()]
        lines.append("Kubernetes (tritonserver container):")
        lines += ["  " + ln for ln in kubernetes_snippet(plan).splitlines()]
    return "\n".join(lines) + "\n"
