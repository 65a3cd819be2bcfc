"""Engine specs: one YAML file per LLM tier, validated before anything expensive runs.

A spec is the single source for three things that must agree: the TensorRT-LLM engine
build, the tier's ``configs/h100.pbtxt`` and the planner's memory estimate. Loading is
strict (unknown keys, wrong types and inconsistent limits are all reported at once, with
their dotted path) because a typo found after a 40-minute 405B build is expensive.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from build_engines.architectures import Architecture, architecture
from serving.errors import ConfigError

SPEC_DIR = Path(__file__).resolve().parent / "specs"
_TIER_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class DType(str, Enum):
    """Activation / unquantized weight precision of the engine."""

    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"

    @property
    def bytes(self) -> float:
        return 2.0


class Quantization(str, Enum):
    """Weight quantization. ``none`` keeps weights in ``dtype``."""

    NONE = "none"
    FP8 = "fp8"
    INT4_AWQ = "int4_awq"

    @property
    def bytes_per_param(self) -> float:
        """Effective bytes per weight, including quantization scales and the layers
        TensorRT-LLM keeps in higher precision (embeddings, lm_head): a sizing figure."""
        return {"none": 2.0, "fp8": 1.02, "int4_awq": 0.56}[self.value]


class KvCacheDType(str, Enum):
    """KV cache precision; ``auto`` follows ``dtype``."""

    AUTO = "auto"
    FP8 = "fp8"
    INT8 = "int8"

    def bytes_per_value(self, dtype: DType) -> float:
        """Bytes of one cached K or V element."""
        return dtype.bytes if self is KvCacheDType.AUTO else 1.0


class SchedulerPolicy(str, Enum):
    """tensorrtllm_backend ``batch_scheduler_policy`` values."""

    GUARANTEED_NO_EVICT = "guaranteed_no_evict"
    MAX_UTILIZATION = "max_utilization"


@dataclass(frozen=True)
class Limits:
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int


@dataclass(frozen=True)
class KvCache:
    dtype: KvCacheDType
    free_gpu_mem_fraction: float
    enable_block_reuse: bool


@dataclass(frozen=True)
class Calibration:
    dataset: str
    num_samples: int
    max_seq_len: int


@dataclass(frozen=True)
class Serving:
    """The load the tier is sized for: concurrent sequences of ``target_context`` tokens."""

    target_concurrency: int
    target_context: int


@dataclass(frozen=True)
class TritonParams:
    """Triton-side values that must agree with the engine (written into h100.pbtxt)."""

    engine_dir: str
    tokenizer_dir: str
    max_queue_delay_microseconds: int
    #: Triton's own bound on requests waiting for the backend (default_queue_policy);
    #: over it Triton answers UNAVAILABLE at once, the gateway's 429.
    max_queue_size: int
    batch_scheduler_policy: SchedulerPolicy
    exclude_input_in_output: bool
    enable_chunked_context: bool


@dataclass(frozen=True)
class EngineSpec:
    """One tier's engine, validated. ``path`` is where it was loaded from."""

    tier: str
    description: str
    architecture: Architecture
    checkpoint: str
    dtype: DType
    quantization: Quantization
    tp: int
    pp: int
    limits: Limits
    kv_cache: KvCache
    calibration: Calibration | None
    serving: Serving
    triton: TritonParams
    path: Path | None = None
    raw: Mapping[str, Any] | None = None

    @property
    def world_size(self) -> int:
        """GPUs one engine instance (one replica) spans."""
        return self.tp * self.pp

    @property
    def weight_bytes_per_param(self) -> float:
        return self.quantization.bytes_per_param

    @property
    def kv_bytes_per_value(self) -> float:
        """Bytes of one K or V element in the cache."""
        return self.kv_cache.dtype.bytes_per_value(self.dtype)

    def sha256(self) -> str:
        """Hash of the spec's content, recorded in the engine manifest."""
        text = yaml.safe_dump(dict(self.raw or {}), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def check_gpu_count(self, gpu_count: int) -> None:
        """Refuse a parallel layout the node cannot host evenly."""
        if self.world_size > gpu_count or gpu_count % self.world_size:
            raise ConfigError(
                f"{self.tier}: tp*pp = {self.tp}*{self.pp} = {self.world_size} does not divide "
                f"the {gpu_count} GPUs of this node; use a tp*pp that divides {gpu_count}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The validated spec as plain data (enums as strings), for manifests and logs."""
        out = asdict(self)
        out.pop("raw")
        out["path"] = str(self.path) if self.path else None
        out["architecture"] = self.architecture.name
        return _plain(out)


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class _Reader:
    """Reads one mapping of the spec, collecting every problem with its dotted path."""

    def __init__(self, data: Any, prefix: str, errors: list[str]) -> None:
        self.prefix, self.errors, self.seen = prefix, errors, set()
        if not isinstance(data, Mapping):
            errors.append(f"{prefix or 'spec'}: expected a mapping, got {type(data).__name__}")
            data = {}
        self.data = data

    def _where(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def get(self, key: str, kind: type, default: Any = ..., check: Any = None) -> Any:
        self.seen.add(key)
        if key not in self.data:
            if default is ...:
                self.errors.append(f"{self._where(key)}: required")
            return None if default is ... else default
        value = self.data[key]
        try:
            if issubclass(kind, Enum):
                value = kind(value)
            elif kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise TypeError
        except (ValueError, TypeError):
            expected = (
                "one of " + ", ".join(repr(m.value) for m in kind)
                if issubclass(kind, Enum)
                else kind.__name__
            )
            self.errors.append(f"{self._where(key)}: expected {expected}, got {value!r}")
            return None
        if check is not None and (problem := check(value)):
            self.errors.append(f"{self._where(key)}: {value!r} {problem}")
            return None
        return value

    def sub(self, key: str, optional: bool = False) -> _Reader | None:
        self.seen.add(key)
        if key not in self.data:
            if not optional:
                self.errors.append(f"{self._where(key)}: required section")
                return _Reader({}, self._where(key), [])
            return None
        return _Reader(self.data[key], self._where(key), self.errors)

    def finish(self) -> None:
        for key in sorted(set(self.data) - self.seen, key=str):
            self.errors.append(f"{self._where(str(key))}: unknown key")


def _positive(value: int) -> str | None:
    return None if value > 0 else "must be > 0"


def _fraction(value: float) -> str | None:
    return None if 0.0 < value <= 1.0 else "must be in (0, 1]"


def parse_spec(data: Any, path: Path | None = None) -> EngineSpec:
    """Validate ``data`` (a parsed YAML mapping); raise one ConfigError listing every problem."""
    errors: list[str] = []
    top = _Reader(data, "", errors)
    tier = top.get(
        "tier",
        str,
        check=lambda v: (
            None
            if _TIER_NAME.match(v)
            else "is not a valid model name (lowercase letters, digits, underscores)"
        ),
    )
    description = top.get("description", str, default="")
    arch_name = top.get("architecture", str)
    arch = None
    if arch_name is not None:
        try:
            arch = architecture(arch_name)
        except ConfigError as exc:
            errors.append(f"architecture: {exc}")
    checkpoint = top.get("checkpoint", str)
    dtype = top.get("dtype", DType)
    quant = top.get("quantization", Quantization)

    par = top.sub("parallel")
    tp = par.get("tp", int, check=_positive)
    pp = par.get("pp", int, default=1, check=_positive)
    par.finish()

    lim = top.sub("limits")
    limits = Limits(
        *(
            lim.get(k, int, check=_positive)
            for k in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens")
        )
    )
    lim.finish()

    kv = top.sub("kv_cache")
    kv_cache = KvCache(
        kv.get("dtype", KvCacheDType, default=KvCacheDType.AUTO),
        kv.get("free_gpu_mem_fraction", float, default=0.9, check=_fraction),
        kv.get("enable_block_reuse", bool, default=True),
    )
    kv.finish()

    cal = top.sub("calibration", optional=True)
    calibration = None
    if cal is not None:
        calibration = Calibration(
            cal.get("dataset", str),
            cal.get("num_samples", int, default=512, check=_positive),
            cal.get("max_seq_len", int, default=2048, check=_positive),
        )
        cal.finish()

    srv = top.sub("serving")
    serving = Serving(
        srv.get("target_concurrency", int, check=_positive),
        srv.get("target_context", int, check=_positive),
    )
    srv.finish()

    tri = top.sub("triton")
    triton = TritonParams(
        tri.get("engine_dir", str),
        tri.get("tokenizer_dir", str, default=checkpoint or ""),
        tri.get(
            "max_queue_delay_microseconds",
            int,
            default=100,
            check=lambda v: None if v >= 0 else "must be >= 0",
        ),
        tri.get("max_queue_size", int, check=_positive),
        tri.get(
            "batch_scheduler_policy", SchedulerPolicy, default=SchedulerPolicy.GUARANTEED_NO_EVICT
        ),
        tri.get("exclude_input_in_output", bool, default=True),
        tri.get("enable_chunked_context", bool, default=True),
    )
    tri.finish()
    top.finish()

    _check_consistency(errors, arch, tp, pp, limits, kv_cache, quant, calibration, serving)
    if errors:
        where = f"{path}" if path else "spec"
        raise ConfigError(f"{where}: " + "; ".join(errors))
    return EngineSpec(
        tier,
        description,
        arch,
        checkpoint,
        dtype,
        quant,
        tp,
        pp,
        limits,
        kv_cache,
        calibration,
        serving,
        triton,
        path,
        data,
    )


def _check_consistency(
    errors: list[str],
    arch: Architecture | None,
    tp: int | None,
    pp: int | None,
    limits: Limits,
    kv_cache: KvCache,
    quant: Quantization | None,
    calibration: Calibration | None,
    serving: Serving,
) -> None:
    """Cross-field rules: the ones TensorRT-LLM would only report deep into a build."""
    if arch and tp and tp not in arch.allowed_tp():
        errors.append(
            f"parallel.tp: {tp} does not divide the {arch.num_kv_heads} KV heads of "
            f"{arch.name}; use one of {arch.allowed_tp()}"
        )
    if arch and pp and arch.num_layers % pp:
        errors.append(
            f"parallel.pp: {pp} does not divide the {arch.num_layers} layers of {arch.name}"
        )
    if None in (
        limits.max_input_len,
        limits.max_seq_len,
        limits.max_num_tokens,
        limits.max_batch_size,
    ):
        return
    if limits.max_seq_len <= limits.max_input_len:
        errors.append(
            f"limits.max_seq_len ({limits.max_seq_len}) must be greater than "
            f"limits.max_input_len ({limits.max_input_len}), or no token can be "
            f"generated for a full-length prompt"
        )
    if limits.max_num_tokens < limits.max_batch_size:
        errors.append(
            f"limits.max_num_tokens ({limits.max_num_tokens}) must be at least "
            f"limits.max_batch_size ({limits.max_batch_size}): every sequence in a "
            f"generation step needs one token"
        )
    if serving.target_context and serving.target_context > limits.max_seq_len:
        errors.append(
            f"serving.target_context ({serving.target_context}) exceeds "
            f"limits.max_seq_len ({limits.max_seq_len})"
        )
    if serving.target_concurrency and serving.target_concurrency > limits.max_batch_size:
        errors.append(
            f"serving.target_concurrency ({serving.target_concurrency}) exceeds "
            f"limits.max_batch_size ({limits.max_batch_size}); requests beyond it "
            f"only queue"
        )
    if quant in (Quantization.FP8, Quantization.INT4_AWQ) and calibration is None:
        errors.append(
            f"calibration: required for quantization {quant.value!r} (dataset, num_samples)"
        )
    if kv_cache.dtype is KvCacheDType.INT8 and quant is Quantization.FP8:
        errors.append(
            "kv_cache.dtype: int8 KV cache with fp8 weights is not a supported combination; use fp8"
        )


def load_spec(path: Path | str) -> EngineSpec:
    """Load and validate one spec file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: spec file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_spec(data, path)


def tier_specs(spec_dir: Path = SPEC_DIR) -> list[EngineSpec]:
    """Every tier spec shipped in ``spec_dir``, sorted by file name."""
    return [load_spec(p) for p in sorted(spec_dir.glob("*.yaml"))]
