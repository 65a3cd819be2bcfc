"""Place LLM engines on a node's GPUs, and say why.

The rules encode what was measured on real boxes:

1. Tensor parallelism is for models that do not fit on one GPU. The planner picks the
   smallest TP whose weights + KV cache (for the target concurrency and context) +
   runtime overhead fit in each GPU; every GPU left over becomes another replica, because
   replicas add throughput without adding all-reduces.
2. A TP group and a replica belong inside one NVLink group. On four H100 PCIe with NVLink
   bridges pairing 0-1 and 2-3, two TP=2 replicas behind a balancer beat one TP=4
   instance, whose all-reduces cross PCIe and the inter-socket link.
3. LLM tiers never share a GPU: TensorRT-LLM sizes its KV cache as a fraction of the
   memory that is free when it loads, so a second engine on the same GPU gets what is
   left, or nothing. The small encoders (embedding, intent_encoder) share one GPU instead.

Throughput numbers are roofline estimates (memory bandwidth / bytes read per step), an
upper bound that real engines reach perhaps 60-80% of; they are labelled as such.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from build_engines.architectures import Architecture
from build_engines.spec import EngineSpec, Quantization
from build_engines.topology import Topology

GIB = 1024**3


@dataclass(frozen=True)
class Target:
    """A model to place: its shape, precision and the load it is sized for."""

    name: str
    arch: Architecture
    weight_bytes_per_param: float
    kv_bytes_per_value: float
    concurrency: int
    context: int
    precision: str
    tp: int | None = None  # pinned by a built engine; None lets the planner choose
    pp: int = 1

    @classmethod
    def from_spec(cls, spec: EngineSpec) -> Target:
        precision = (
            spec.dtype.value
            if spec.quantization is Quantization.NONE
            else (f"{spec.quantization.value} weights, {spec.dtype.value} activations")
        )
        return cls(
            spec.tier,
            spec.architecture,
            spec.weight_bytes_per_param,
            spec.kv_bytes_per_value,
            spec.serving.target_concurrency,
            spec.serving.target_context,
            precision,
            spec.tp,
            spec.pp,
        )

    @property
    def weight_bytes(self) -> float:
        return self.arch.params_b * 1e9 * self.weight_bytes_per_param

    @property
    def kv_bytes(self) -> float:
        """KV cache for ``concurrency`` sequences of ``context`` tokens, whole model."""
        per_token = self.arch.kv_bytes_per_token(self.kv_bytes_per_value)
        return per_token * self.concurrency * self.context

    def need_gib_per_gpu(self, world: int, overhead_gib: float) -> float:
        """Memory each GPU of a ``world``-GPU instance must hold."""
        return (self.weight_bytes + self.kv_bytes) / world / GIB + overhead_gib


@dataclass(frozen=True)
class PlanOptions:
    headroom: float = 0.9  # plan at most this fraction of each GPU's memory
    overhead_gib: float = 3.0  # CUDA context, cuBLAS/NCCL workspaces, activations
    aux_gib: float = 2.0  # embedding + intent_encoder instances on the shared GPU
    gpu_hour_price: float | None = None
    max_replicas: int | None = None


@dataclass
class Replica:
    target: str
    gpus: list[int]
    nvlink: bool


@dataclass
class Estimate:
    """Roofline decode ceilings for one replica (estimates, not measurements)."""

    single_stream_tok_s: float
    batch_tok_s: float
    cost_per_million: float | None


@dataclass
class TargetPlan:
    target: Target
    tp: int | None = None
    replicas: list[Replica] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    estimate: Estimate | None = None

    @property
    def gpu_device_ids(self) -> str:
        """tensorrtllm_backend format: GPUs of one instance by comma, instances by ';'."""
        return ";".join(",".join(map(str, r.gpus)) for r in self.replicas)


@dataclass
class Plan:
    topology: Topology
    options: PlanOptions
    targets: list[TargetPlan]
    aux_gpu: int | None = None
    idle: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def for_target(self, name: str) -> TargetPlan:
        return next(tp for tp in self.targets if tp.target.name == name)

    @property
    def used_gpus(self) -> list[int]:
        used = {g for t in self.targets for r in t.replicas for g in r.gpus}
        if self.aux_gpu is not None:
            used.add(self.aux_gpu)
        return sorted(used)

    def gpu_usage(self) -> dict[int, list[tuple[str, float]]]:
        """Per GPU: what runs there and the GiB planned for it (who shares which GPU)."""
        usage: dict[int, list[tuple[str, float]]] = {g.index: [] for g in self.topology.gpus}
        for tplan in self.targets:
            for n, replica in enumerate(tplan.replicas, 1):
                need = tplan.target.need_gib_per_gpu(len(replica.gpus), self.options.overhead_gib)
                for gpu in replica.gpus:
                    usage[gpu].append((f"{tplan.target.name} replica {n}", need))
        if self.aux_gpu is not None:
            usage[self.aux_gpu].append(("embedding + intent_encoder", self.options.aux_gib))
        return usage


def plan(topology: Topology, targets: list[Target], options: PlanOptions | None = None) -> Plan:
    """Choose TP, replicas and GPUs for every target on ``topology``."""
    options = options or PlanOptions()
    result = Plan(topology, options, [TargetPlan(t) for t in targets])
    free = [g.index for g in topology.gpus]
    groups = topology.nvlink_groups()
    result.notes.append(_describe_groups(topology, groups))

    # First replica of each target, largest first so big TP groups get whole NVLink groups.
    order = sorted(result.targets, key=lambda p: -p.target.weight_bytes)
    for tplan in order:
        _place_first(topology, groups, free, tplan, options)
    # Spare GPUs become replicas, round-robin so every tier gains throughput.
    progress = True
    while progress and free:
        progress = False
        for tplan in result.targets:
            if tplan.tp is None or not tplan.replicas:
                continue
            if options.max_replicas and len(tplan.replicas) >= options.max_replicas:
                continue
            gpus = _find_gpus(
                topology, groups, free, tplan.tp * tplan.target.pp, tplan.target, options
            )
            if gpus is not None:
                _take(topology, free, tplan, gpus)
                progress = True
    for tplan in result.targets:
        _explain_replicas(topology, groups, tplan, options)
    result.aux_gpu, aux_note = _aux_gpu(topology, result, free, options)
    result.notes.append(aux_note)
    result.idle = sorted(set(free) - {result.aux_gpu})
    if result.idle:
        result.notes.append(f"GPUs {result.idle} stay idle: no target fits them")
    return result


def _describe_groups(topology: Topology, groups: list[list[int]]) -> str:
    parts = []
    for group in groups:
        if len(group) == 1:
            parts.append(f"GPU{group[0]} (no NVLink)")
        else:
            links = [topology.nvlinks(a, b) for a in group for b in group if a != b]
            lanes = min(n for n in links if n)  # the weakest NVLink inside the group
            parts.append("GPU" + "+GPU".join(map(str, group)) + f" (NV{lanes})")
    return "NVLink groups: " + ", ".join(parts)


def _find_gpus(
    topology: Topology,
    groups: list[list[int]],
    free: list[int],
    world: int,
    target: Target,
    options: PlanOptions,
) -> list[int] | None:
    """Free GPUs for one instance: inside one NVLink group if any fits, best fit first."""
    need = target.need_gib_per_gpu(world, options.overhead_gib)
    candidates = []
    for group in groups:
        avail = [g for g in group if g in free]
        avail.sort(key=lambda g: topology.gpu(g).memory_mib)
        fitting = [g for g in avail if topology.gpu(g).memory_gib * options.headroom >= need]
        if len(fitting) >= world:
            # Prefer the tightest group (fewest spare GPUs), then the smallest GPUs that fit.
            candidates.append((len(avail), fitting[:world]))
    if candidates:
        return sorted(min(candidates, key=lambda c: (c[0], c[1]))[1])
    if world == 1:
        return None
    fitting = [g for g in free if topology.gpu(g).memory_gib * options.headroom >= need]
    return sorted(fitting[:world]) if len(fitting) >= world else None


def _take(topology: Topology, free: list[int], tplan: TargetPlan, gpus: list[int]) -> None:
    nvlink = all(topology.nvlinks(a, b) for a in gpus for b in gpus if a != b)
    tplan.replicas.append(Replica(tplan.target.name, gpus, nvlink))
    for g in gpus:
        free.remove(g)


def _place_first(
    topology: Topology,
    groups: list[list[int]],
    free: list[int],
    tplan: TargetPlan,
    options: PlanOptions,
) -> None:
    target = tplan.target
    tried = []
    sizes = [target.tp] if target.tp else target.arch.allowed_tp()
    largest = max((g.memory_gib for g in topology.gpus), default=0.0)
    for tp in sizes:
        world = tp * target.pp
        need = target.need_gib_per_gpu(world, options.overhead_gib)
        if world > len(topology.gpus) or need > largest * options.headroom:
            tried.append(f"TP{tp} needs {need:.1f} GiB per GPU")
            continue
        gpus = _find_gpus(topology, groups, free, world, target, options)
        if gpus is None:
            big = [g.index for g in topology.gpus if g.memory_gib * options.headroom >= need]
            why = (
                f"only GPUs {big} can hold it"
                if len(big) < world
                else f"GPUs {sorted(set(big) - set(free))} are taken by larger models"
            )
            tried.append(f"TP{tp} needs {world} GPUs with {need:.1f} GiB each: {why}")
            continue
        tplan.tp = tp
        _take(topology, free, tplan, gpus)
        weights = target.weight_bytes / GIB
        kv = target.kv_bytes / GIB
        why = (
            f"{target.arch.params_b:g}B params in {target.precision}: {weights:.1f} GiB "
            f"weights + {kv:.1f} GiB KV cache ({target.concurrency} seqs x "
            f"{target.context} tokens) + {options.overhead_gib:g} GiB overhead per GPU"
        )
        if target.tp:
            tplan.reasons.append(f"TP{tp} as built (spec); {why}")
            smaller = [
                t
                for t in target.arch.allowed_tp()
                if t < tp
                and target.need_gib_per_gpu(t * target.pp, options.overhead_gib)
                <= largest * options.headroom
            ]
            if smaller:
                tplan.reasons.append(
                    f"TP{smaller[0]} would also fit: rebuilding with it gives "
                    f"{tp // smaller[0]}x the replicas on the same GPUs"
                )
        else:
            tplan.reasons.append(f"TP{tp} is the smallest that fits: {why}")
        if tried:
            tplan.reasons.append(
                "rejected: "
                + "; ".join(tried)
                + f" (usable {largest * options.headroom:.1f} GiB per GPU at "
                f"{options.headroom:.0%} of memory)"
            )
        return
    tplan.reasons.append(
        "NOT PLACED: " + "; ".join(tried) + f"; usable memory is "
        f"{largest * options.headroom:.1f} GiB per GPU. Lower the target "
        f"concurrency/context, quantize, or add GPUs"
    )


def _explain_replicas(
    topology: Topology, groups: list[list[int]], tplan: TargetPlan, options: PlanOptions
) -> None:
    if not tplan.replicas:
        return
    target, n = tplan.target, len(tplan.replicas)
    layout = ", ".join("GPU" + "+GPU".join(map(str, r.gpus)) for r in tplan.replicas)
    tplan.reasons.append(f"{n} replica(s) of TP{tplan.tp}: {layout}")
    if any(not r.nvlink for r in tplan.replicas if len(r.gpus) > 1):
        tplan.reasons.append(
            "WARNING: a TP group spans GPUs without NVLink; its all-reduces "
            "go over PCIe and will dominate decode latency"
        )
    elif tplan.tp and tplan.tp > 1:
        tplan.reasons.append("every TP group sits inside one NVLink group")
    bigger = tplan.tp * n if tplan.tp else 0
    if n > 1 and bigger in target.arch.allowed_tp():
        gpus = sorted(g for r in tplan.replicas for g in r.gpus)
        cross = any(topology.nvlinks(a, b) == 0 for a in gpus for b in gpus if a != b)
        tail = " and its all-reduces would cross links without NVLink" if cross else ""
        tplan.reasons.append(
            f"not 1x TP{bigger}: the model already fits at TP{tplan.tp}, so "
            f"more TP only adds all-reduces (2 per layer per step){tail}; "
            f"{n} replicas behind a balancer serve more. Measured on 4x H100 "
            f"PCIe with NVLink bridge pairs: 2x TP2 beat 1x TP4"
        )
    tplan.estimate = estimate(topology, tplan, options)


def estimate(topology: Topology, tplan: TargetPlan, options: PlanOptions) -> Estimate | None:
    """Roofline decode ceiling of one replica, and the cost per million output tokens."""
    replica = tplan.replicas[0]
    bandwidths = [topology.gpu(g).bandwidth_gbs for g in replica.gpus]
    if None in bandwidths:
        tplan.reasons.append(
            f"no roofline: memory bandwidth of {topology.gpu(replica.gpus[0]).name!r} is unknown"
        )
        return None
    target = tplan.target
    bandwidth = sum(bandwidths) * 1e9 / target.pp  # pipeline stages run one after another
    weights = target.weight_bytes
    kv_per_seq = target.arch.kv_bytes_per_token(target.kv_bytes_per_value) * target.context
    single = bandwidth / (weights + kv_per_seq)
    batch = target.concurrency * bandwidth / (weights + kv_per_seq * target.concurrency)
    cost = None
    if options.gpu_hour_price is not None:
        cost = options.gpu_hour_price * len(replica.gpus) / (batch * 3600) * 1e6
    return Estimate(single, batch, cost)


AUX_NOTE = (
    "intent_head stays KIND_CPU (one numpy [n,1153]x[1153,3] product: a GPU would spend "
    "longer copying than computing)"
)


def _aux_gpu(
    topology: Topology, result: Plan, free: list[int], options: PlanOptions
) -> tuple[int | None, str]:
    """Where the encoders (embedding, intent_encoder) run: an idle GPU, else the one with
    the most spare memory. intent_head stays on the host."""
    if not topology.gpus:
        return None, "no GPU for embedding / intent_encoder / intent_head"
    if free:
        gpu = min(free)
        return gpu, (
            f"embedding, intent_encoder + intent_head: the encoders' KIND_GPU instances on "
            f"GPU{gpu} (otherwise idle); {AUX_NOTE}"
        )
    spare = {}
    for tplan in result.targets:
        for r in tplan.replicas:
            need = tplan.target.need_gib_per_gpu(len(r.gpus), options.overhead_gib)
            for g in r.gpus:
                spare[g] = topology.gpu(g).memory_gib * options.headroom - need
    gpu = max(spare, key=lambda g: (spare[g], -g))
    note = (
        f"embedding, intent_encoder + intent_head: the encoders' KIND_GPU instances share "
        f"GPU{gpu} ({spare[gpu]:.1f} GiB spare after its LLM replica, {options.aux_gib:g} GiB needed); "
        f"{AUX_NOTE}"
    )
    if spare[gpu] < options.aux_gib:
        note += (
            "; WARNING: not enough spare memory, lower that tier's KV budget "
            "(serving.target_concurrency x target_context in its spec)"
        )
    return gpu, note
