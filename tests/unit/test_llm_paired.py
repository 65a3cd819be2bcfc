"""``benchmarks/llm_paired.py``'s bookkeeping: the rotation, the per-round ratios, the report."""

from __future__ import annotations

import pytest

from benchmarks.llm_paired import busy_share, engine_order, markdown, paired_ratios


def test_every_engine_leads_one_round_in_turn() -> None:
    engines = ["served (float32)", "served (int8)", "vLLM (float32)"]
    orders = [engine_order(engines, i) for i in range(4)]
    assert [o[0] for o in orders] == [*engines, engines[0]]
    assert all(sorted(o) == sorted(engines) for o in orders)


def test_ratios_are_paired_within_each_round() -> None:
    # The VM halves its speed in round 1: both engines slow down, the ratio does not.
    rounds = [
        {"ours": {"1": 10.0, "16": 90.0}, "theirs": {"1": 10.0, "16": 100.0}},
        {"ours": {"1": 5.0, "16": 55.0}, "theirs": {"1": 4.0, "16": 50.0}},
        {"ours": {"1": 12.0, "16": 95.0}, "theirs": {"1": 10.0, "16": 100.0}},
    ]
    ratios = paired_ratios(rounds, "ours", "theirs")
    assert ratios["16"]["per_round"] == pytest.approx([0.9, 1.1, 0.95])
    assert ratios["16"]["median"] == pytest.approx(0.95)
    assert (ratios["16"]["min"], ratios["16"]["max"]) == pytest.approx((0.9, 1.1))
    assert ratios["16"]["rounds_at_least_1"] == 1
    assert ratios["1"]["median"] == pytest.approx(1.2)
    assert ratios["1"]["rounds_at_least_1"] == 3


def test_busy_share_is_a_share() -> None:
    assert 0.0 <= busy_share(0.05) <= 1.0


def test_markdown_shows_rounds_ratios_and_latencies() -> None:
    def run(round_: int, engine: str, streams: str, ttft: float) -> dict:
        name = f"round {round_} {engine}, {streams} stream" + "s" * (streams != "1")
        return {
            "name": name,
            "ttft_ms": {"p50": ttft},
            "inter_chunk_latency_ms": {"p50": ttft / 10},
        }

    rates = {
        "served (float32)": {"1": 11.0, "16": 90.0},
        "vLLM (float32)": {"1": 10.0, "16": 100.0},
    }
    report = {
        "command": "benchmarks/llm_paired.py --rounds 1",
        "checkpoint": "SmolLM2",
        "tokens_per_request": 64,
        "streams": ["1", "16"],
        "machine": {
            "cpus": 2,
            "cpu_model": "AMD EPYC (avx2 fma)",
            "torch": "2.13.0",
            "load_average_at_end": [1.0, 1.0, 1.0],
        },
        "idle_busy_share": 0.02,
        "pause_busy_share": {"median": 0.01, "max": 0.11},
        "settle_s": 10.0,
        "rounds": [rates],
        "pairs": {
            "served (float32) / vLLM (float32)": paired_ratios(
                [rates], "served (float32)", "vLLM (float32)"
            )
        },
        "results": [
            run(0, e, s, ttft)
            for e, ttft in (("served (float32)", 900.0), ("vLLM (float32)", 1500.0))
            for s in ("1", "16")
        ],
    }
    text = markdown(report)
    assert "| 0 | 11.0 | 90.0 | 10.0 | 100.0 |" in text
    assert (
        "| served (float32) / vLLM (float32) | 16 | **0.90x** | 0.90x | 0.90x | 0/1 | 0.90 |"
        in text
    )
    assert "| vLLM (float32) | 16 | 1500 | 150.0 |" in text
    assert "2.0% busy" in text and "at most 11.0%" in text
