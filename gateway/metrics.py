"""The gateway's Prometheus metrics (``GET /metrics``), in a registry of its own.

Counters and histograms are updated per request; pool and replica state (in flight,
queued, healthy, cost) is read from the pools when Prometheus scrapes, so it can never
drift from what the balancer sees. Every request metric carries the A/B ``arm`` label
(``-`` outside a split).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from gateway.pools import Pool

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gateway_requests",
            "Requests by route, model asked for, HTTP status and A/B arm",
            ["route", "model", "status", "arm"],
            registry=r,
        )

        def latency(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, ["model", "arm"], buckets=buckets, registry=r)

        self.ttft = latency(
            "gateway_ttft_seconds",
            "Time from the request to its first generated token, by tier and arm",
            TTFT_BUCKETS,
        )
        # Named as aiperf names them: inter-token latency is per request, (last chunk -
        # first chunk) / (completion tokens - 1); inter-chunk latency is every gap between
        # streamed chunks (the same thing only when every chunk holds one token).
        self.itl = latency(
            "gateway_inter_token_seconds",
            "Per streamed request: (last chunk - first chunk) / (completion tokens - 1)",
            ITL_BUCKETS,
        )
        self.icl = latency(
            "gateway_inter_chunk_seconds",
            "Time between streamed chunks after the first, by tier and arm",
            ITL_BUCKETS,
        )
        self.decisions = Counter(
            "gateway_routing_decisions",
            "model=auto decisions by intent, tier chosen and reason",
            ["intent", "tier", "reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "gateway_prompt_tokens", "Prompt tokens served", ["model", "arm"], registry=r
        )
        self.completion_tokens = Counter(
            "gateway_completion_tokens", "Completion tokens served", ["model", "arm"], registry=r
        )
        self.retries = Counter(
            "gateway_retries",
            "Requests retried on another replica after failing before their first response",
            ["pool"],
            registry=r,
        )
        self.ejections = Counter(
            "gateway_ejections",
            "Replicas ejected from a pool (connection failure, failed deep health check)",
            ["pool", "replica"],
            registry=r,
        )
        self.shed = Counter(
            "gateway_shed",
            "Requests refused with 429 by a pool's admission queue, by priority",
            ["pool", "priority"],
            registry=r,
        )

    def watch_pools(self, pools: Callable[[], Iterable[Pool]]) -> None:
        self.registry.register(_PoolCollector(pools))


class _PoolCollector(Collector):
    def __init__(self, pools: Callable[[], Iterable[Pool]]) -> None:
        self._pools = pools

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily(
            "gateway_replica_in_flight",
            "Requests in flight per replica",
            labels=["pool", "replica"],
        )
        healthy = GaugeMetricFamily(
            "gateway_replica_healthy",
            "1 when the replica is in rotation",
            labels=["pool", "replica"],
        )
        pool_in_flight = GaugeMetricFamily(
            "gateway_pool_in_flight", "Requests admitted and running per pool", labels=["pool"]
        )
        queued = GaugeMetricFamily(
            "gateway_pool_queued", "Requests waiting in the pool's admission queue", labels=["pool"]
        )
        tokens = CounterMetricFamily(
            "gateway_pool_tokens",
            "Prompt plus completion tokens served by the pool",
            labels=["pool"],
        )
        cost = GaugeMetricFamily(
            "gateway_pool_cost_per_million_tokens",
            "GPU cost per million tokens served since start: gpu_hour_price x replicas x "
            "hours / tokens x 1e6 (the pool's configured price; 0 when not set)",
            labels=["pool"],
        )
        for pool in self._pools():
            for replica in pool.replicas.replicas:
                in_flight.add_metric([pool.name, replica.url], replica.in_flight)
                healthy.add_metric([pool.name, replica.url], 1.0 if replica.healthy else 0.0)
            pool_in_flight.add_metric([pool.name], pool.admission.in_use)
            queued.add_metric([pool.name], pool.admission.queued)
            tokens.add_metric([pool.name], pool.tokens_served)
            cost.add_metric([pool.name], pool.cost_per_million_tokens(time.monotonic()))
        yield from (in_flight, healthy, pool_in_flight, queued, tokens, cost)
