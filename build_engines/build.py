"""Build one tier's TensorRT-LLM engine from its spec, with a manifest and its h100 config.

The engine path is TensorRT-LLM 1.2's supported one for TensorRT engines: the LLM API's
TensorRT backend (``tensorrt_llm._tensorrt_engine.LLM``). Given a Hugging Face checkpoint
it quantizes with ModelOpt when asked (FP8, INT4-AWQ, calibrated on a dataset), converts
to a TensorRT-LLM checkpoint per rank, builds the engines, and ``save()`` writes the engine
directory the Triton ``tensorrtllm`` backend loads (``config.json`` + ``rank<N>.engine``).

Every call is described as data (:class:`Call`) so that ``--dry-run`` prints exactly what
a real build runs, and unit tests can run the whole flow against a fake module.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from build_engines.manifest import Manifest
from build_engines.planner import Plan, Target, TargetPlan, plan
from build_engines.render import (
    check_engine_config,
    h100_config_path,
    relative,
    tier_config,
    write_tier_config,
)
from build_engines.spec import EngineSpec, KvCacheDType, Quantization, tier_specs
from build_engines.topology import Topology
from serving.errors import ConfigError

TRTLLM_VERSION = "1.2.1"  # keep equal to the `trtllm` extra in pyproject.toml
LLM_CLASS = "tensorrt_llm._tensorrt_engine.LLM"
_QUANT_ALGO = {Quantization.FP8: "FP8", Quantization.INT4_AWQ: "W4A16_AWQ"}
_KV_ALGO = {KvCacheDType.FP8: "FP8", KvCacheDType.INT8: "INT8"}


@dataclass(frozen=True)
class Attr:
    """A module attribute used as a value, e.g. ``tensorrt_llm.llmapi.QuantAlgo.FP8``."""

    path: str

    def render(self) -> str:
        return self.path.rsplit(".", 2)[-2] + "." + self.path.rsplit(".", 1)[-1]

    def resolve(self) -> Any:
        return _resolve(self.path)

    def imports(self) -> dict[str, set[str]]:
        module, name = self.path.rsplit(".", 2)[:2]
        return {module: {name}}


@dataclass(frozen=True)
class Call:
    """A constructor or function call described as data: printable and runnable."""

    target: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def render(self, indent: int = 0) -> str:
        name = self.target.rsplit(".", 1)[-1]
        pad = " " * (indent + 4)
        args = ",\n".join(f"{pad}{k}={_render(v, indent + 4)}" for k, v in self.kwargs.items())
        return f"{name}(\n{args},\n{' ' * indent})" if args else f"{name}()"

    def run(self) -> Any:
        return _resolve(self.target)(**{k: _make(v) for k, v in self.kwargs.items()})

    def imports(self) -> dict[str, set[str]]:
        """``module -> names`` a script needs to make this call (for --dry-run)."""
        module, name = self.target.rsplit(".", 1)
        found = {module: {name}}
        for value in self.kwargs.values():
            if isinstance(value, (Call, Attr)):
                for mod, names in value.imports().items():
                    found.setdefault(mod, set()).update(names)
        return found


def _render(value: Any, indent: int) -> str:
    if isinstance(value, Call):
        return value.render(indent)
    if isinstance(value, Attr):
        return value.render()
    return repr(value)


def _make(value: Any) -> Any:
    if isinstance(value, Call):
        return value.run()
    if isinstance(value, Attr):
        return value.resolve()
    return value


def _resolve(dotted: str) -> Any:
    """Import ``pkg.module.Name`` (longest importable module prefix, then attributes)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as exc:
            if exc.name and not dotted.startswith(exc.name):
                raise ConfigError(f"importing {dotted} failed: {exc}") from None
            if cut == 1:
                raise ConfigError(
                    f"cannot import {parts[0]} ({exc}): install TensorRT-LLM with "
                    f"pip install '.[trtllm]' (tensorrt_llm=={TRTLLM_VERSION}) or run inside "
                    f"the NGC tritonserver trtllm container"
                ) from None
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ConfigError(f"cannot resolve {dotted}")


def llm_call(spec: EngineSpec) -> Call:
    """The LLM-API call that quantizes, converts and builds ``spec``'s engine."""
    api = "tensorrt_llm.llmapi"
    kwargs: dict[str, Any] = {
        "model": spec.checkpoint,
        "tensor_parallel_size": spec.tp,
        "pipeline_parallel_size": spec.pp,
        "dtype": spec.dtype.value,
        "build_config": Call(
            "tensorrt_llm.BuildConfig",
            {
                "max_batch_size": spec.limits.max_batch_size,
                "max_input_len": spec.limits.max_input_len,
                "max_seq_len": spec.limits.max_seq_len,
                "max_num_tokens": spec.limits.max_num_tokens,
                "max_beam_width": 1,
            },
        ),
        "kv_cache_config": Call(
            f"{api}.KvCacheConfig",
            {
                "free_gpu_memory_fraction": spec.kv_cache.free_gpu_mem_fraction,
                "enable_block_reuse": spec.kv_cache.enable_block_reuse,
            },
        ),
        "enable_chunked_prefill": spec.triton.enable_chunked_context,
        # Triton's preprocessing/postprocessing models tokenize; the engine needs no tokenizer.
        "skip_tokenizer_init": True,
    }
    quant: dict[str, Any] = {}
    if spec.quantization in _QUANT_ALGO:
        quant["quant_algo"] = Attr(f"{api}.QuantAlgo.{_QUANT_ALGO[spec.quantization]}")
    if spec.kv_cache.dtype in _KV_ALGO:
        quant["kv_cache_quant_algo"] = Attr(f"{api}.QuantAlgo.{_KV_ALGO[spec.kv_cache.dtype]}")
    if quant:
        kwargs["quant_config"] = Call(f"{api}.QuantConfig", quant)
    if spec.calibration is not None and quant:
        kwargs["calib_config"] = Call(
            f"{api}.CalibConfig",
            {
                "calib_dataset": spec.calibration.dataset,
                "calib_batches": spec.calibration.num_samples,
                "calib_max_seq_length": spec.calibration.max_seq_len,
            },
        )
    return Call(LLM_CLASS, kwargs)


def plan_tiers(topology: Topology, spec: EngineSpec | None = None) -> Plan:
    """Plan every shipped tier (with ``spec`` replacing its own tier) on ``topology``.

    A spec for a model that is not a shipped tier (a smoke test, an experiment) is planned
    alone: it is not part of the node's serving layout.
    """
    shipped = tier_specs()
    if spec is not None and spec.tier not in {s.tier for s in shipped}:
        return plan(topology, [Target.from_spec(spec)])
    specs = [s for s in shipped if spec is None or s.tier != spec.tier]
    if spec is not None:
        specs.append(spec)
    return plan(topology, [Target.from_spec(s) for s in specs])


def placement(spec: EngineSpec, topology: Topology, result: Plan | None = None) -> TargetPlan:
    """Where the planner puts ``spec``'s tier; refuse a tier that does not fit the node."""
    spec.check_gpu_count(len(topology.gpus))
    tplan = (result or plan_tiers(topology, spec)).for_target(spec.tier)
    if not tplan.replicas:
        raise ConfigError(
            f"{spec.tier} does not fit on {topology.source}: " + "; ".join(tplan.reasons)
        )
    return tplan


@dataclass
class Step:
    title: str
    shows: str
    action: Callable[[], Any]


@dataclass
class BuildFlow:
    """The ordered steps of one build and the files it produces."""

    spec: EngineSpec
    engine_dir: Path
    repository: Path
    gpu_device_ids: str
    gpu_name: str
    topology_source: str
    steps: list[Step] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)


def make_flow(
    spec: EngineSpec,
    engine_dir: Path,
    repository: Path,
    gpu_device_ids: str,
    gpu_name: str,
    topology_source: str,
) -> BuildFlow:
    flow = BuildFlow(
        spec, Path(engine_dir), Path(repository), gpu_device_ids, gpu_name, topology_source
    )
    call = llm_call(spec)
    imports = "\n".join(
        f"from {module} import {', '.join(sorted(names))}"
        for module, names in sorted(call.imports().items())
    )
    script = f"{imports}\n\nllm = {call.render()}\nllm.save({str(engine_dir)!r})\nllm.shutdown()"
    steps = [
        Step(
            "Check TensorRT-LLM / TensorRT versions",
            "import tensorrt_llm, tensorrt  # record __version__ in the manifest",
            lambda: _record_versions(flow),
        ),
        Step(_build_title(spec), script, lambda: _build_engine(flow, call)),
        Step(
            "Check the engine's config.json against the spec",
            f"read {engine_dir / 'config.json'}",
            lambda: _check_engine(flow),
        ),
        Step(
            "Write the engine manifest",
            f"write {engine_dir / 'manifest.json'}",
            lambda: _write_manifest(flow),
        ),
        Step(
            f"Fill {spec.tier}/configs/h100.pbtxt",
            f"write {h100_config_path(repository, spec.tier)} (gpu_device_ids={gpu_device_ids!r})",
            lambda: _write_config(flow),
        ),
    ]
    flow.steps = steps
    flow.files = (
        [engine_dir / "config.json"]
        + [engine_dir / f"rank{r}.engine" for r in range(spec.world_size)]
        + [engine_dir / "manifest.json", h100_config_path(repository, spec.tier)]
    )
    return flow


def _build_title(spec: EngineSpec) -> str:
    if spec.quantization is Quantization.NONE:
        first = f"convert the checkpoint to {spec.dtype.value}"
    else:
        first = (
            f"quantize to {spec.quantization.value} with ModelOpt (calibration: "
            f"{spec.calibration.dataset}, {spec.calibration.num_samples} samples)"
        )
    return f"LLM API: {first}, then build TP{spec.tp} x PP{spec.pp} engines"


def _record_versions(flow: BuildFlow) -> None:
    flow.versions["tensorrt_llm"] = str(_resolve("tensorrt_llm.__version__"))
    try:
        flow.versions["tensorrt"] = str(_resolve("tensorrt.__version__"))
    except ConfigError:
        flow.versions["tensorrt"] = "unknown"


def _build_engine(flow: BuildFlow, call: Call) -> None:
    flow.engine_dir.mkdir(parents=True, exist_ok=True)
    # A rebuild must not leave an old manifest vouching for new (or half-written) files,
    # nor stale rank files from a build with more ranks.
    for stale in ("manifest.json", "config.json", "rank*.engine"):
        for path in flow.engine_dir.glob(stale):
            path.unlink()
    llm = call.run()
    try:
        llm.save(str(flow.engine_dir))
    finally:
        llm.shutdown()


def _check_engine(flow: BuildFlow) -> None:
    path = flow.engine_dir / "config.json"
    try:
        engine_config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"the build wrote no readable {path}: {exc}") from None
    check_engine_config(flow.spec, engine_config)


def _write_manifest(flow: BuildFlow) -> None:
    files = sorted(p.name for p in flow.engine_dir.iterdir() if p.name != "manifest.json")
    Manifest(
        tier=flow.spec.tier,
        tensorrt_llm_version=flow.versions["tensorrt_llm"],
        tensorrt_version=flow.versions["tensorrt"],
        gpu_name=flow.gpu_name,
        spec_path=relative(flow.spec.path),
        spec_sha256=flow.spec.sha256(),
        spec=flow.spec.to_dict(),
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        files=files,
    ).write(flow.engine_dir)


def _write_config(flow: BuildFlow) -> None:
    text = tier_config(
        flow.spec,
        flow.gpu_device_ids,
        str(flow.engine_dir),
        source=f"planned on {flow.topology_source}",
    )
    write_tier_config(flow.repository, flow.spec, text)


def dry_run_text(flow: BuildFlow) -> str:
    """Everything a build would run and write, for ``--dry-run``."""
    out = [
        f"Build {flow.spec.tier} from {relative(flow.spec.path)} "
        f"(TensorRT-LLM {TRTLLM_VERSION}, GPU {flow.gpu_name})",
        "",
    ]
    for n, step in enumerate(flow.steps, 1):
        out.append(f"[{n}/{len(flow.steps)}] {step.title}")
        out += ["    " + ln for ln in step.shows.splitlines()]
        out.append("")
    out.append("Files:")
    out += [f"  {p}" for p in flow.files]
    out.append("")
    out.append(f"{h100_config_path(flow.repository, flow.spec.tier)} would contain:")
    out.append(
        tier_config(
            flow.spec,
            flow.gpu_device_ids,
            str(flow.engine_dir),
            source=f"planned on {flow.topology_source}",
        )
    )
    return "\n".join(out)
