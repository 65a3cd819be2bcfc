"""Turn a load-generator run into a summary table, a JSON file and PNG plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from client.metrics import PERCENTILES, RequestRecord

# aiperf's names and short headers: time to first token (TTFT), inter-token latency (ITL:
# decode time per token after the first), inter-chunk latency (ICL: gaps between streamed
# chunks). ``e2e`` ends at the end of the stream, unlike aiperf's request latency.
_LATENCIES = (
    ("ttft_ms", "TTFT"),
    ("inter_token_latency_ms", "ITL"),
    ("inter_chunk_latency_ms", "ICL"),
    ("e2e_ms", "end-to-end"),
)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def summary_table(summary: dict[str, Any], title: str) -> Table:
    """Latency percentiles as rows, followed by throughput, goodput and errors."""
    table = Table(title=title)
    table.add_column("metric")
    for p in PERCENTILES:
        table.add_column(f"p{p}", justify="right")
    table.add_column("mean", justify="right")
    for key, label in _LATENCIES:
        stats = summary[key]
        table.add_row(
            f"{label} (ms)", *(_fmt(stats[f"p{p}"]) for p in PERCENTILES), _fmt(stats["mean"])
        )
    rates = summary["output_tokens_per_s_per_user"]
    table.add_row(
        "output tok/s per user", *(_fmt(rates[f"p{p}"]) for p in PERCENTILES), _fmt(rates["mean"])
    )
    table.add_section()
    good = summary["goodput"]
    errors = ", ".join(f"{k}={v}" for k, v in summary["errors"].items()) or "none"
    sla = f"ttft<={_fmt(good['sla_ttft_ms'], 0)}ms itl<={_fmt(good['sla_itl_ms'], 0)}ms"
    for label, value in (
        ("requests (ok/total)", f"{summary['succeeded']}/{summary['requests']}"),
        ("requests/s", _fmt(summary["requests_per_s"], 2)),
        ("output tok/s (aggregate)", _fmt(summary["output_tokens_per_s"], 1)),
        (
            f"goodput ({sla})",
            f"{_fmt(good['requests_per_s'], 2)} req/s ({100 * good['fraction']:.0f}%)",
        ),
        ("errors", errors),
        ("wall time (s)", _fmt(summary["wall_time_s"], 1)),
    ):
        table.add_row(label, value, *([""] * len(PERCENTILES)))
    return table


def write_json(
    path: Path, summary: dict[str, Any], config: dict[str, Any], records: Sequence[RequestRecord]
) -> None:
    """The summary, the exact configuration, and every request (for re-analysis)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config": config, "summary": summary, "requests": [r.to_json() for r in records]}
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def write_plots(
    directory: Path,
    records: Sequence[RequestRecord],
    title: str,
    marks: Sequence[tuple[float, str]] = (),
) -> list[Path]:
    """``latency_cdf.png`` (TTFT, ICL, e2e) and ``ttft_over_time.png``; returns the paths.

    ``marks`` are ``(seconds since the run began, label)`` events (a soak's faults), drawn
    as labelled vertical lines on the plot over time.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    directory.mkdir(parents=True, exist_ok=True)
    ok = [r for r in records if r.ok]
    series = {
        "TTFT": [r.ttft * 1000 for r in ok if r.ttft is not None],
        "ICL": [gap * 1000 for r in ok for gap in r.inter_chunk_latencies],
        "end-to-end": [r.e2e * 1000 for r in ok],
    }
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, values in series.items():
        if values:
            xs = np.sort(np.asarray(values))
            ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=f"{label} (n={len(xs)})")
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("fraction of samples ≤ x")
    ax.set_title(f"Latency CDF: {title}")
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax)
    cdf = _save(fig, directory / "latency_cdf.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    timed = sorted((r for r in ok if r.ttft is not None), key=lambda r: r.start)
    starts = np.array([r.start for r in timed])
    ttfts = np.array([r.ttft * 1000 for r in timed])
    ax.scatter(starts, ttfts, s=8, alpha=0.5, label="TTFT")
    if len(timed) >= 10:
        # Percentiles per time bin make a drift (queues building up) visible in the noise.
        edges = np.linspace(0.0, float(starts.max()) + 1e-9, min(25, len(timed) // 4) + 1)
        which = np.digitize(starts, edges) - 1
        bins = [(edges[i : i + 2].mean(), ttfts[which == i]) for i in range(len(edges) - 1)]
        bins = [(t, v) for t, v in bins if len(v) >= 3]
        centres = [t for t, _ in bins]
        ax.plot(centres, [np.percentile(v, 50) for _, v in bins], "k-o", ms=3, label="p50 per bin")
        ax.plot(
            centres,
            [np.percentile(v, 90) for _, v in bins],
            "-o",
            color="orange",
            ms=3,
            label="p90 per bin",
        )
    failed = [r for r in records if not r.ok]
    if failed:
        ax.scatter(
            [r.start for r in failed],
            [0] * len(failed),
            marker="x",
            color="red",
            label=f"errors (n={len(failed)})",
        )
    ax.set_xlabel("request start (s since the run began)")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title(f"TTFT over time: {title}")
    ax.grid(True, alpha=0.3)
    mark_events(ax, marks)
    _legend(ax)
    return [cdf, _save(fig, directory / "ttft_over_time.png")]


def mark_events(ax: Any, marks: Sequence[tuple[float, str]]) -> None:
    """Labelled vertical lines at ``(x, label)``: faults on a plot over time."""
    for at, label in marks:
        ax.axvline(at, color="grey", ls=":", lw=1)
        ax.annotate(
            label,
            (at, 1.0),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="top",
            ha="right",
            fontsize=7,
        )


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
