"""Capacity and cost of serving a traffic description on H100 tiers (``python -m build_engines capacity``).

The model, every step of which the unit test redoes by hand (docs/capacity.md):

1. Peak rate: ``requests_per_month / (30 days) * peak_to_mean`` requests per second.
2. Tokens: the mean input length of the prompts file (UTF-8 bytes / 4, the usual
   English ratio for Llama 3's tokenizer: an approximation, no tokenizer is loaded) and the
   mean of the output-length mix.
3. Each tier's share of requests from the tier mix (the classifier's choices on Dolly);
   its peak demand is ``peak * share * mean output tokens`` output tokens per second.
4. A replica's ceiling: the published throughput row nearest the traffic's (input,
   output) lengths, per GPU, times the tier's TP. TP is the planner's: the smallest that
   fits the spec on one node (``plan``'s rule: TP only to fit, otherwise replicas).
5. The TTFT target derates it. A replica at utilization ``rho`` answers first tokens in
   ``ttft_floor / (1 - rho)`` (an M/M/1-style wait, a model, not a measurement), so the
   target allows ``rho = 1 - ttft_floor / target`` (at most ``MAX_UTILIZATION``).
6. Replicas = ceil(demand / (ceiling * rho)); GPUs = replicas * TP; provisioned for the
   peak all month (730 h) at ``gpu_hour_price``. Autoscaling (KEDA) spends less off-peak;
   the provisioned figure is the budget's upper bound.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from build_engines.render import REPO_ROOT
from serving.errors import ConfigError

THROUGHPUT = Path(__file__).with_name("throughput.h100.yaml")
HOURS_PER_MONTH = 730.0
SECONDS_PER_MONTH = 30 * 86400
BYTES_PER_TOKEN = 4.0
#: Never plan a replica hotter than this, whatever the target: bursts within the hour.
MAX_UTILIZATION = 0.9


@dataclass(frozen=True)
class Traffic:
    requests_per_month: float
    peak_to_mean: float
    input_tokens: float  # mean
    output_tokens: float  # mean
    tier_mix: dict[str, float]  # shares, summing to 1
    ttft_target_s: dict[str, float]
    gpu_hour_price: float

    @property
    def peak_rps(self) -> float:
        return self.requests_per_month / SECONDS_PER_MONTH * self.peak_to_mean


@dataclass(frozen=True)
class TierThroughput:
    tp: int  # TP of the published measurement
    rows: tuple[tuple[int, int, float], ...]  # input, output, total output tokens/s
    ttft_floor_s: float

    def per_gpu(self, input_tokens: float, output_tokens: float) -> tuple[float, tuple]:
        """Output tokens/s per GPU of the row nearest (log distance) to these lengths."""
        row = min(
            self.rows,
            key=lambda r: math.log(r[0] / input_tokens) ** 2 + math.log(r[1] / output_tokens) ** 2,
        )
        return row[2] / self.tp, row


@dataclass(frozen=True)
class TierPlan:
    tier: str
    share: float
    tp: int
    demand_tps: float  # output tokens/s at peak
    ceiling_tps: float  # per replica, at saturation
    utilization: float
    replicas: int
    gpus: int
    row: tuple

    @property
    def capacity_tps(self) -> float:
        return self.ceiling_tps * self.utilization


@dataclass(frozen=True)
class CapacityPlan:
    traffic: Traffic
    tiers: tuple[TierPlan, ...]

    @property
    def gpus(self) -> int:
        return sum(t.gpus for t in self.tiers)

    @property
    def monthly_cost(self) -> float:
        return self.gpus * self.traffic.gpu_hour_price * HOURS_PER_MONTH

    @property
    def cost_per_million_requests(self) -> float:
        return self.monthly_cost / (self.traffic.requests_per_month / 1e6)

    @property
    def cost_per_million_tokens(self) -> float:
        t = self.traffic
        tokens = t.requests_per_month * (t.input_tokens + t.output_tokens)
        return self.monthly_cost / (tokens / 1e6)


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{what}: expected a non-empty mapping")
    return value


def mean_input_tokens(prompts: Path) -> float:
    """Mean prompt length in tokens (bytes / 4) of a JSONL of {instruction, context}."""
    sizes = []
    try:
        lines = prompts.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read prompts {prompts}: {exc.strerror}") from None
    for line in lines:
        if line.strip():
            row = json.loads(line)
            text = "\n\n".join(row.get(k, "") for k in ("instruction", "context") if row.get(k))
            sizes.append(len(text.encode("utf-8")) / BYTES_PER_TOKEN)
    if not sizes:
        raise ConfigError(f"{prompts}: no prompts")
    return sum(sizes) / len(sizes)


def load_traffic(path: Path, root: Path = REPO_ROOT) -> Traffic:
    import yaml

    raw = _mapping(yaml.safe_load(path.read_text()), str(path))
    mix = {k: float(v) for k, v in _mapping(raw.get("tier_mix"), "tier_mix").items()}
    total = sum(mix.values())
    outputs = raw.get("output_tokens")
    if not isinstance(outputs, list) or not outputs:
        raise ConfigError(f"{path}: output_tokens must be a list of {{share, tokens}}")
    shares = sum(float(o["share"]) for o in outputs)
    prompts = Path(raw["prompts"])
    return Traffic(
        requests_per_month=float(raw["requests_per_month"]),
        peak_to_mean=float(raw.get("peak_to_mean", 1.0)),
        input_tokens=mean_input_tokens(prompts if prompts.is_absolute() else root / prompts),
        output_tokens=sum(float(o["share"]) * float(o["tokens"]) for o in outputs) / shares,
        tier_mix={k: v / total for k, v in mix.items()},
        ttft_target_s={
            k: float(v) for k, v in _mapping(raw.get("ttft_target_s"), "ttft_target_s").items()
        },
        gpu_hour_price=float(raw["gpu_hour_price"]),
    )


def load_throughput(path: Path = THROUGHPUT) -> dict[str, TierThroughput]:
    import yaml

    raw = yaml.safe_load(path.read_text())
    floors = raw["ttft_floor_s"]
    return {
        tier: TierThroughput(
            tp=int(entry["tp"]),
            rows=tuple((int(a), int(b), float(c)) for a, b, c in entry["rows"]),
            ttft_floor_s=float(floors[tier]),
        )
        for tier, entry in raw["tiers"].items()
    }


def utilization(ttft_floor: float, target: float) -> float:
    """The highest utilization whose modelled TTFT (floor / (1 - rho)) meets the target."""
    if target <= ttft_floor:
        raise ConfigError(
            f"TTFT target {target}s is at or below the idle TTFT {ttft_floor}s: no load meets it"
        )
    return min(MAX_UTILIZATION, 1.0 - ttft_floor / target)


def plan_capacity(
    traffic: Traffic,
    throughput: dict[str, TierThroughput],
    tp: dict[str, int],
    ttft_target_s: dict[str, float] | None = None,
) -> CapacityPlan:
    targets = ttft_target_s or traffic.ttft_target_s
    tiers = []
    for tier, share in traffic.tier_mix.items():
        if tier not in throughput:
            raise ConfigError(f"no throughput for tier {tier} (have {sorted(throughput)})")
        per_gpu, row = throughput[tier].per_gpu(traffic.input_tokens, traffic.output_tokens)
        ceiling = per_gpu * tp[tier]
        rho = utilization(throughput[tier].ttft_floor_s, targets[tier])
        demand = traffic.peak_rps * share * traffic.output_tokens
        replicas = max(1, math.ceil(demand / (ceiling * rho)))
        tiers.append(
            TierPlan(
                tier, share, tp[tier], demand, ceiling, rho, replicas, replicas * tp[tier], row
            )
        )
    return CapacityPlan(traffic, tuple(tiers))


def planner_tp(topology_path: Path) -> dict[str, int]:
    """Each tier's TP as the planner sizes it on one node (smallest TP that fits)."""
    from build_engines.build import plan_tiers
    from build_engines.topology import load_topology

    result = plan_tiers(load_topology(topology_path))
    return {t.target.name: t.tp for t in result.targets}


def report(plan: CapacityPlan) -> str:
    t = plan.traffic
    lines = [
        f"traffic: {t.requests_per_month / 1e6:,.0f}M requests/month, peak x{t.peak_to_mean:g} "
        f"= {t.peak_rps:,.0f} req/s; mean {t.input_tokens:.0f} input + {t.output_tokens:.0f} "
        f"output tokens; GPU ${t.gpu_hour_price:.2f}/h",
        "",
        f"{'tier':<11} {'share':>6} {'TP':>3} {'peak out tok/s':>15} {'replica ceiling':>16} "
        f"{'TTFT target':>12} {'util':>5} {'replicas':>9} {'GPUs':>5}",
    ]
    for p in plan.tiers:
        lines.append(
            f"{p.tier:<11} {p.share:>6.1%} {p.tp:>3} {p.demand_tps:>15,.0f} {p.ceiling_tps:>16,.0f} "
            f"{t.ttft_target_s[p.tier]:>11.2f}s {p.utilization:>5.2f} {p.replicas:>9} {p.gpus:>5}"
        )
    lines += [
        "",
        f"GPUs: {plan.gpus} (provisioned for the peak), ${plan.monthly_cost:,.0f}/month",
        f"cost per million requests: ${plan.cost_per_million_requests:,.2f}",
        f"cost per million tokens (input + output): ${plan.cost_per_million_tokens:,.4f}",
        "",
        "TP per tier: the planner's smallest TP that fits one node; replicas beyond it.",
        "Throughput: published TensorRT-LLM maximum-throughput figures (build_engines/"
        "throughput.h100.yaml names the source), derated for the TTFT target by a queueing "
        "model; idle TTFTs are assumptions. Not a measurement of this stack.",
        "Embedding / classifier pool: not sized (no published figure; MiniLM is small next "
        "to the tiers).",
    ]
    return "\n".join(lines)


def cost_curve(
    traffic: Traffic,
    throughput: dict[str, TierThroughput],
    tp: dict[str, int],
    scales: list[float],
) -> list[tuple[float, float]]:
    """(TTFT-target scale, cost per million tokens): every tier's target times the scale."""
    points = []
    for scale in scales:
        targets = {k: v * scale for k, v in traffic.ttft_target_s.items()}
        try:
            plan = plan_capacity(traffic, throughput, tp, targets)
        except ConfigError:
            continue  # a target below an idle TTFT: unreachable at any cost
        points.append((scale, plan.cost_per_million_tokens))
    return points


def plot_cost_curve(traffic: Traffic, points: list[tuple[float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    base = traffic.ttft_target_s.get("llm_large") or next(iter(traffic.ttft_target_s.values()))
    ax.plot([s * base for s, _ in points], [c for _, c in points], marker="o")
    ax.set_xlabel("TTFT target of llm_large (s); the other tiers' scale with it")
    ax.set_ylabel("USD per million tokens")
    ax.set_title(f"Cost vs TTFT target, {traffic.requests_per_month / 1e6:,.0f}M requests/month")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
