"""``benchmarks/gateway.py``'s bookkeeping: where each latency run is kept, how it reads."""

from __future__ import annotations

from benchmarks.gateway import latency_key, markdown


def _row(concurrency: int, added: float) -> dict:
    row = {"concurrency": concurrency, "pairs": 8, "paired_added_p50_ms": added}
    for q in (50, 90, 99):
        row |= {f"gateway_p{q}_ms": 20.0 + added, f"direct_p{q}_ms": 20.0}
        row[f"added_p{q}_ms"] = added
    return row


def test_every_latency_configuration_has_its_own_key() -> None:
    keys = {
        latency_key(isolate, upstream, stagger)
        for isolate in (False, True)
        for upstream in ("llm_small", "ticker")
        for stagger in (0.0, 2.6)
    }
    # The stagger only matters for the paced upstream: 2 (llm_small) + 4 (ticker) runs.
    assert len(keys) == 6
    assert latency_key(True, "llm_small") == "latency_isolated"  # committed before: kept
    assert latency_key(True, "ticker", 2.6) == "latency_isolated_ticker_staggered"


def test_markdown_shows_lockstep_and_staggered_ticker_runs_apart() -> None:
    base = {"isolated": True, "upstream": "ticker", "max_tokens": 64, "note": ""}
    report = {
        "machine": "x86_64, 2 cores",
        "when": "now",
        "latency_isolated_ticker": {
            **base,
            "command": "lockstep",
            "stagger_s": 0.0,
            "rows": [_row(32, 24.6)],
        },
        "latency_isolated_ticker_staggered": {
            **base,
            "command": "staggered",
            "stagger_s": 2.6,
            "rows": [_row(1, 3.0), _row(32, 7.5)],
        },
    }
    text = markdown(report)
    lockstep = text.index("paced upstream, lockstep, gateway on its own core")
    staggered = text.index("paced upstream, staggered, gateway on its own core")
    assert lockstep < staggered
    assert "spread over 2.6 s" in text[staggered:]
    assert "keeps them in lockstep" in text[lockstep:staggered]
    assert "| 32 | 8 | 44.6 | 20.0 | **+24.6** | +24.6 |" in text
    assert "| 32 | 8 | 27.5 | 20.0 | **+7.5** | +7.5 |" in text
    assert "Triton on core 1, the gateway" in text  # no torch thread for the stand-in
