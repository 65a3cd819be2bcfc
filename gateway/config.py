"""The gateway's configuration: the topology file, and the routing policy it shares.

Two placements (docs/gateway.md):

- *single*: no topology file. One pool, ``local``, is the Triton server ``make serve``
  starts and serves every model; ``auto`` goes to its ``router`` model.
- *pools*: a YAML topology names pools of Triton replicas and the models each serves;
  the gateway classifies on the classifier's pool, decides with the routing policy and
  streams from the tier's pool.

The routing policy is never copied into this file: it is read from the ``router``
model's ``config.pbtxt`` (``routing_config``, default the repository's), with
:meth:`serving.routing.RoutingPolicy.from_params`, exactly as the router reads it.
"""

from __future__ import annotations

import enum
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format

from client.balancing import Strategy
from serving.errors import ConfigError
from serving.params import Params
from serving.repository import parse_config
from serving.routing import RoutingPolicy

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROUTER_CONFIG = REPO_ROOT / "model_repository" / "router" / "config.pbtxt"
LOCAL_POOL = "local"
ANY_MODEL = "*"
EMBEDDING_MODEL = "embedding"
ROUTER_MODEL = "router"

#: Public names for the tiers (what the H100 profile serves under each).
DEFAULT_ALIASES = {
    "llama-3.1-8b-instruct": "llm_small",
    "llama-3.1-70b-instruct": "llm_medium",
    "llama-3.1-405b-instruct": "llm_large",
}


class Placement(str, enum.Enum):
    SINGLE = "single"
    POOLS = "pools"


@dataclass(frozen=True)
class RoutingSettings:
    """What the gateway needs from the router's config: the policy and the tiers' limits."""

    policy: RoutingPolicy
    classifier: str
    tokenizer_dir: str | None
    default_max_tokens: int
    max_output_len: int
    max_context: int
    source: Path

    @classmethod
    def from_file(cls, path: Path) -> RoutingSettings:
        if not path.is_file():
            raise ConfigError(
                f"routing config {path} does not exist: point routing_config (topology) or "
                "--routing-config at the router model's config.pbtxt"
            )
        raw = json_format.MessageToDict(parse_config(path), preserving_proto_field_name=True)
        params = Params(raw, "router")
        return cls(
            policy=RoutingPolicy.from_params(params),
            classifier=params.get("intent_classifier_model", str),
            tokenizer_dir=params.get("tokenizer_dir", str, None),
            default_max_tokens=params.get("default_max_tokens", int, 128),
            max_output_len=params.get("max_output_len", int, 512),
            max_context=params.get("max_context", int, 1024),
            source=path,
        )


@dataclass(frozen=True)
class ReplicaSpec:
    url: str  # host:port of the gRPC endpoint
    health_url: str | None = None  # the launcher's deep readiness URL


@dataclass(frozen=True)
class DnsSpec:
    """Replicas listed by a DNS name (a Kubernetes headless Service), re-resolved."""

    name: str
    port: int
    health_port: int | None = None
    interval: float = 5.0


@dataclass(frozen=True)
class PoolSpec:
    name: str
    models: tuple[str, ...]
    replicas: tuple[ReplicaSpec, ...] = ()
    dns: DnsSpec | None = None
    strategy: Strategy = Strategy.LEAST_REQUESTS
    max_in_flight: int = 16
    max_queue: int = 256
    max_wait: float = 30.0
    gpu_hour_price: float = 0.0  # per replica per hour, for the cost metric
    required: bool = True

    def serves(self, model: str) -> bool:
        return ANY_MODEL in self.models or model in self.models

    @property
    def capacity_per_replica(self) -> int:
        return self.max_in_flight


@dataclass(frozen=True)
class Arm:
    name: str
    pool: str
    weight: float


@dataclass(frozen=True)
class Split:
    """An A/B split: requests for ``model`` go to one of ``arms`` by weight, sticky per key.

    ``sticky_header`` names a request header to hash; without it (or when the request
    lacks it) the API key is hashed, and an anonymous request is placed at random.
    """

    model: str
    arms: tuple[Arm, ...]
    sticky_header: str | None = None

    def arm_for(self, sticky_key: str | None, draw: float) -> Arm:
        """The arm for a sticky key (hashed to [0, 1)) or, without one, a uniform ``draw``."""
        if sticky_key:
            digest = hashlib.sha256(f"{self.model}:{sticky_key}".encode()).digest()
            draw = int.from_bytes(digest[:8], "big") / 2**64
        total = sum(a.weight for a in self.arms)
        point = draw * total
        for arm in self.arms:
            if point < arm.weight:
                return arm
            point -= arm.weight
        return self.arms[-1]


@dataclass(frozen=True)
class Topology:
    placement: Placement
    pools: tuple[PoolSpec, ...]
    routing_config: Path = DEFAULT_ROUTER_CONFIG
    aliases: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ALIASES))
    splits: dict[str, Split] = field(default_factory=dict)
    tokenizer_dir: Path | None = None
    embedding_model: str = EMBEDDING_MODEL

    def pool(self, name: str) -> PoolSpec:
        for spec in self.pools:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def pools_serving(self, model: str) -> list[PoolSpec]:
        return [p for p in self.pools if p.serves(model)]

    @classmethod
    def single(cls, grpc_url: str, health_url: str | None, **kwargs: Any) -> Topology:
        """The local server ``make serve`` starts, serving every model."""
        pool = PoolSpec(
            name=LOCAL_POOL,
            models=(ANY_MODEL,),
            replicas=(ReplicaSpec(grpc_url, health_url),),
            max_in_flight=kwargs.pop("max_in_flight", 64),
        )
        return cls(placement=Placement.SINGLE, pools=(pool,), **kwargs)

    @classmethod
    def load(cls, path: Path) -> Topology:
        return cls.from_dict(read_yaml(path, "topology file"), base=path.parent, where=str(path))

    @classmethod
    def from_dict(cls, data: Any, base: Path = Path("."), where: str = "topology") -> Topology:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping with 'pools'")
        _only(data, {"pools", "aliases", "splits", "routing_config", "tokenizer_dir"}, where)
        raw_pools = data.get("pools")
        if not isinstance(raw_pools, list) or not raw_pools:
            raise ConfigError(f"{where}: 'pools' must be a non-empty list")
        pools = tuple(_pool(p, f"{where}: pools[{i}]") for i, p in enumerate(raw_pools))
        names = [p.name for p in pools]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"{where}: pool names must be unique; repeated: {dupes}")
        aliases = dict(DEFAULT_ALIASES)
        aliases.update(_str_dict(data.get("aliases", {}), f"{where}: aliases"))
        splits = {
            model: _split(model, raw, set(names), f"{where}: splits.{model}")
            for model, raw in (data.get("splits") or {}).items()
        }
        routing = data.get("routing_config")
        tokenizer_dir = data.get("tokenizer_dir")
        return cls(
            placement=Placement.POOLS,
            pools=pools,
            routing_config=(base / routing) if routing else DEFAULT_ROUTER_CONFIG,
            aliases=aliases,
            splits=splits,
            tokenizer_dir=(base / tokenizer_dir) if tokenizer_dir else None,
        )


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's content; a one-line ConfigError naming ``what`` if it cannot be read."""
    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from None


def _only(data: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _str_dict(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ConfigError(f"{where}: expected a mapping of names to names")
    return dict(value)


def _positive(value: Any, name: str, where: str, kind: type = int) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: '{name}' must be a number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"{where}: '{name}' must be > 0, got {value!r}")
    return number


def _pool(raw: Any, where: str) -> PoolSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping")
    _only(
        raw,
        {
            "name",
            "models",
            "replicas",
            "dns",
            "health_port",
            "strategy",
            "max_in_flight",
            "max_queue",
            "max_wait_s",
            "gpu_hour_price",
            "required",
        },
        where,
    )
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: 'name' is required")
    where = f"{where} ({name})"
    models = raw.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        raise ConfigError(f"{where}: 'models' must be a non-empty list of model names")
    health_port = raw.get("health_port")
    replicas = tuple(_replica(r, health_port, where) for r in raw.get("replicas") or [])
    dns = _dns(raw["dns"], health_port, where) if raw.get("dns") else None
    if not replicas and dns is None:
        raise ConfigError(f"{where}: give 'replicas' (host:port entries) or 'dns'")
    if replicas and dns is not None:
        raise ConfigError(f"{where}: give 'replicas' or 'dns', not both")
    strategy = raw.get("strategy", Strategy.LEAST_REQUESTS.value)
    try:
        strategy = Strategy(strategy)
    except ValueError:
        raise ConfigError(
            f"{where}: unknown strategy {strategy!r}; use one of {[s.value for s in Strategy]}"
        ) from None
    price = raw.get("gpu_hour_price", 0.0)
    if not isinstance(price, int | float) or price < 0:
        raise ConfigError(f"{where}: 'gpu_hour_price' must be a number >= 0")
    return PoolSpec(
        name=name,
        models=tuple(models),
        replicas=replicas,
        dns=dns,
        strategy=strategy,
        max_in_flight=_positive(raw.get("max_in_flight", 16), "max_in_flight", where),
        max_queue=_positive(raw.get("max_queue", 256), "max_queue", where),
        max_wait=_positive(raw.get("max_wait_s", 30.0), "max_wait_s", where, float),
        gpu_hour_price=float(price),
        required=bool(raw.get("required", True)),
    )


def _host_port(text: str, where: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{where}: replica {text!r} is not host:port")
    return host, int(port)


def _replica(raw: Any, health_port: Any, where: str) -> ReplicaSpec:
    if isinstance(raw, str):
        host, _ = _host_port(raw, where)
        health = f"http://{host}:{int(health_port)}/health/ready" if health_port else None
        return ReplicaSpec(raw, health)
    if isinstance(raw, dict) and isinstance(raw.get("url"), str):
        _only(raw, {"url", "health_url"}, where)
        _host_port(raw["url"], where)
        return ReplicaSpec(raw["url"], raw.get("health_url"))
    raise ConfigError(f"{where}: a replica is 'host:port' or {{url, health_url}}, got {raw!r}")


def _dns(raw: Any, health_port: Any, where: str) -> DnsSpec:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise ConfigError(f"{where}: 'dns' needs 'name' and 'port'")
    _only(raw, {"name", "port", "interval_s"}, where)
    return DnsSpec(
        name=raw["name"],
        port=_positive(raw.get("port"), "dns.port", where),
        health_port=int(health_port) if health_port else None,
        interval=_positive(raw.get("interval_s", 5.0), "dns.interval_s", where, float),
    )


def _split(model: str, raw: Any, pools: set[str], where: str) -> Split:
    if not isinstance(raw, dict) or not isinstance(raw.get("arms"), list):
        raise ConfigError(f"{where}: a split needs 'arms' (a list of {{name, pool, weight}})")
    _only(raw, {"arms", "sticky_header"}, where)
    arms = []
    for i, arm in enumerate(raw["arms"]):
        if not isinstance(arm, dict) or arm.get("pool") not in pools:
            raise ConfigError(f"{where}: arms[{i}] must name one of the pools {sorted(pools)}")
        arms.append(
            Arm(
                name=str(arm.get("name", arm["pool"])),
                pool=arm["pool"],
                weight=_positive(arm.get("weight", 1), "weight", where, float),
            )
        )
    if len(arms) < 2:
        raise ConfigError(f"{where}: a split needs at least two arms")
    return Split(model=model, arms=tuple(arms), sticky_header=raw.get("sticky_header"))
