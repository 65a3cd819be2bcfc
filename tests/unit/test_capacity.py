"""`python -m build_engines capacity` against a plan worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from build_engines import capacity
from build_engines.__main__ import main
from serving.errors import ConfigError

TRAFFIC = """
requests_per_month: 2592000   # 1 request/s on average over 30 days
peak_to_mean: 2.0
prompts: prompts.jsonl
output_tokens:
  - {share: 1, tokens: 100}
  - {share: 1, tokens: 300}
tier_mix: {llm_small: 1, llm_large: 3}
ttft_target_s: {llm_small: 1.0, llm_large: 1.0}
gpu_hour_price: 2.0
"""
THROUGHPUT = {
    "llm_small": capacity.TierThroughput(1, ((128, 128, 1000.0), (2048, 2048, 10.0)), 0.1),
    "llm_large": capacity.TierThroughput(8, ((128, 128, 800.0),), 0.5),
}


@pytest.fixture
def traffic(tmp_path: Path) -> capacity.Traffic:
    # 400 and 398 + 2 (the joining blank line) + 400 = 800 bytes: 100 and 200 tokens, mean 150
    rows = [{"instruction": "a" * 400}, {"instruction": "b" * 398, "context": "cc" * 200}]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "traffic.yaml").write_text(TRAFFIC)
    return capacity.load_traffic(tmp_path / "traffic.yaml", root=tmp_path)


def test_plan_matches_the_hand_calculation(traffic: capacity.Traffic) -> None:
    # 2 req/s at peak; 150 input and (100 + 300) / 2 = 200 output tokens; shares 1/4, 3/4
    assert traffic.peak_rps == pytest.approx(2.0)
    assert traffic.input_tokens == pytest.approx(150.0)
    assert traffic.output_tokens == pytest.approx(200.0)
    plan = capacity.plan_capacity(traffic, THROUGHPUT, {"llm_small": 1, "llm_large": 4})
    small, large = plan.tiers
    # small: row 128/128 (nearest to 150/200) = 1000 tok/s/GPU x TP1; rho = 1 - 0.1/1 = 0.9
    # demand 2 x 0.25 x 200 = 100 tok/s -> ceil(100 / 900) = 1 replica, 1 GPU
    assert (small.demand_tps, small.ceiling_tps, small.utilization) == pytest.approx(
        (100.0, 1000.0, 0.9)
    )
    assert (small.replicas, small.gpus) == (1, 1)
    # large: 800 / 8 = 100 tok/s/GPU x our TP4 = 400; rho = 1 - 0.5/1 = 0.5
    # demand 2 x 0.75 x 200 = 300 -> ceil(300 / 200) = 2 replicas, 8 GPUs
    assert (large.demand_tps, large.ceiling_tps, large.utilization) == pytest.approx(
        (300.0, 400.0, 0.5)
    )
    assert (large.replicas, large.gpus) == (2, 8)
    # 9 GPUs x $2 x 730 h = $13,140 a month; 2.592 M requests; 2.592 M x 350 tokens
    assert plan.gpus == 9
    assert plan.monthly_cost == pytest.approx(13140.0)
    assert plan.cost_per_million_requests == pytest.approx(13140.0 / 2.592)
    assert plan.cost_per_million_tokens == pytest.approx(13140.0 / (2.592 * 350))


def test_a_looser_ttft_target_never_costs_more(traffic: capacity.Traffic) -> None:
    tp = {"llm_small": 1, "llm_large": 4}
    points = capacity.cost_curve(traffic, THROUGHPUT, tp, [0.4, 0.6, 1.0, 2.0, 5.0])
    assert [s for s, _ in points] == [0.6, 1.0, 2.0, 5.0]  # 0.4 s is below large's idle TTFT
    costs = [c for _, c in points]
    assert costs == sorted(costs, reverse=True) and costs[0] > costs[-1]
    with pytest.raises(ConfigError, match="idle TTFT"):
        capacity.utilization(0.5, 0.4)


def test_tp_comes_from_the_planner() -> None:
    node = Path(__file__).resolve().parents[1] / "fixtures" / "topologies" / "8x-h100-sxm.txt"
    assert capacity.planner_tp(node) == {"llm_small": 1, "llm_medium": 2, "llm_large": 4}


def test_cli_prints_the_400m_plan_and_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["capacity", "--plot", str(tmp_path / "cost.png"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out.split("\nplot:")[0])
    assert data["traffic"]["requests_per_month"] == 400e6
    assert {t["tier"] for t in data["tiers"]} == {"llm_small", "llm_medium", "llm_large"}
    assert data["gpus"] == sum(t["gpus"] for t in data["tiers"]) > 0
    assert (tmp_path / "cost.png").read_bytes()[:4] == b"\x89PNG"
