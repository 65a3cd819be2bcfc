"""Per-request timing (measured here and nowhere else) and the statistics over it.

:func:`measure` is the only code that reads the clock inside the timed window. It works on
the SDK's chunk iterator, which is the same for gRPC, HTTP and a replica pool, so every
protocol and target is measured identically and the overhead is paid once.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from client.errors import ClientError, translate
from client.sdk import Chunk

PERCENTILES = (50, 90, 95, 99)


@dataclass
class RequestRecord:
    """What happened to one request. Times are seconds; ``start`` is relative to the run."""

    start: float
    e2e: float = 0.0
    ttft: float | None = None
    token_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None
    error_message: str | None = None
    intent: str | None = None
    model: str | None = None
    replica: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def inter_chunk_latencies(self) -> list[float]:
        """Gaps between consecutive streamed chunks with text (aiperf's inter-chunk latency)."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]

    @property
    def inter_token_latency(self) -> float | None:
        """Time per output token after the first (aiperf's inter-token latency).

        (last chunk - first chunk) / (tokens - 1): the decode window from the first text
        to the last text, over the tokens that arrived after the first. aiperf ends the
        window at the last content response too, not at the end of the stream, so a
        flags-only final response does not count.
        """
        if self.ttft is None or self.output_tokens < 2 or len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("token_times")
        data["inter_token_latency"] = self.inter_token_latency
        return data


async def measure(stream: AsyncIterator[Chunk], started: float, origin: float) -> RequestRecord:
    """Consume one request's chunks, timestamping each on arrival.

    ``started`` is ``time.perf_counter()`` taken just before the request was created;
    ``origin`` is the run's zero. A chunk with text counts as a token arrival unless the
    server reports ``num_output_tokens``, which then wins for the token count.
    """
    record = RequestRecord(start=started - origin)
    reported: int | None = None
    try:
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.text:
                record.token_times.append(now - started)
            if chunk.num_output_tokens is not None:
                reported = int(chunk.num_output_tokens)
            record.intent = chunk.intent or record.intent
            record.model = chunk.model or record.model
            record.replica = chunk.replica or record.replica
    except ClientError as exc:
        record.error, record.error_message = exc.kind, str(exc)
    except Exception as exc:
        error = translate(exc)
        record.error, record.error_message = error.kind, str(error)
    record.e2e = time.perf_counter() - started
    record.output_tokens = reported if reported is not None else len(record.token_times)
    if record.token_times:
        record.ttft = record.token_times[0]
    return record


def distribution(values: Sequence[float], scale: float = 1000.0) -> dict[str, float | None]:
    """p50/p90/p95/p99/mean/count, scaled (default seconds -> milliseconds)."""
    if not values:
        return {**{f"p{p}": None for p in PERCENTILES}, "mean": None, "count": 0}
    array = np.asarray(values, dtype=np.float64) * scale
    stats: dict[str, float | None] = {f"p{p}": float(np.percentile(array, p)) for p in PERCENTILES}
    stats["mean"] = float(array.mean())
    stats["count"] = len(values)
    return stats


def meets_sla(record: RequestRecord, sla_ttft_ms: float | None, sla_itl_ms: float | None) -> bool:
    """A successful request whose TTFT and inter-token latency are within the SLA.

    The same test as aiperf's goodput on ``time_to_first_token`` and
    ``inter_token_latency``.
    """
    if not record.ok:
        return False
    if sla_ttft_ms is not None and (record.ttft is None or record.ttft * 1000 > sla_ttft_ms):
        return False
    itl = record.inter_token_latency
    return not (sla_itl_ms is not None and itl is not None and itl * 1000 > sla_itl_ms)


def summarize(
    records: Sequence[RequestRecord],
    wall_time: float,
    sla_ttft_ms: float | None = None,
    sla_itl_ms: float | None = None,
) -> dict[str, Any]:
    """The numbers a run is judged by (all latencies in ms, rates per second)."""
    ok = [r for r in records if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    itls = [t for r in ok if (t := r.inter_token_latency) is not None]
    per_user_rates = [1.0 / t for t in itls if t > 0]
    good = sum(meets_sla(r, sla_ttft_ms, sla_itl_ms) for r in records)
    wall = max(wall_time, 1e-9)
    return {
        "requests": len(records),
        "succeeded": len(ok),
        "errors": dict(Counter(r.error for r in records if r.error)),
        "wall_time_s": wall_time,
        "requests_per_s": len(ok) / wall,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall,
        "output_tokens_per_s_per_user": distribution(per_user_rates, scale=1.0),
        "ttft_ms": distribution([r.ttft for r in ok if r.ttft is not None]),
        "inter_token_latency_ms": distribution(itls),
        "inter_chunk_latency_ms": distribution([g for r in ok for g in r.inter_chunk_latencies]),
        "e2e_ms": distribution([r.e2e for r in ok]),
        "goodput": {
            "sla_ttft_ms": sla_ttft_ms,
            "sla_itl_ms": sla_itl_ms,
            "good_requests": good,
            "fraction": good / len(records) if records else 0.0,
            "requests_per_s": good / wall,
        },
        "routed": dict(Counter(f"{r.intent}->{r.model}" for r in ok if r.model)),
    }
