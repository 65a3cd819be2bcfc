"""A pool of Triton replicas: balancing, health, DNS discovery, admission, cost.

Balancing, ejection, probing back in and the retry before the first response are the
client's :class:`client.balancing.AsyncReplicaPool` (one implementation for the SDK and
the gateway). This module adds what only a frontend needs: the admission queue sized
by the healthy replicas, replicas found by re-resolving a DNS name (a Kubernetes
headless Service lists its ready pods that way), and the pool's token and cost
accounting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from client.balancing import AsyncReplicaPool, Replica
from client.sdk import BaseAsyncClient
from client.transport import Tensors
from gateway.admission import Admission
from gateway.config import DnsSpec, PoolSpec
from gateway.errors import APIError
from gateway.metrics import GatewayMetrics

log = logging.getLogger("gateway.pools")

Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve_addresses(name: str, port: int) -> list[str]:
    """Every address ``name`` resolves to right now (sorted, unique)."""
    infos = await asyncio.get_running_loop().getaddrinfo(name, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def _entry(address: str, dns: DnsSpec) -> tuple[str, str | None]:
    host = f"[{address}]" if ":" in address else address
    health = f"http://{host}:{dns.health_port}/health/ready" if dns.health_port else None
    return f"{host}:{dns.port}", health


class Pool:
    def __init__(
        self,
        spec: PoolSpec,
        metrics: GatewayMetrics,
        *,
        client_factory: Callable[[str], BaseAsyncClient] | None = None,
        resolver: Resolver = resolve_addresses,
        probe_interval: float = 1.0,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.metrics = metrics
        self.replicas = AsyncReplicaPool(
            [r.url for r in spec.replicas],
            health_urls=[r.health_url for r in spec.replicas],
            strategy=spec.strategy,
            client_factory=client_factory,  # type: ignore[arg-type]
            max_in_flight=spec.max_in_flight,
            max_attempts=2,  # the first replica and one retry elsewhere
            on_event=self._on_event,
            probe_interval=probe_interval,
            allow_empty=spec.dns is not None,
        )
        self.admission = Admission(spec.name, self.capacity, spec.max_queue, spec.max_wait)
        self.tokens_served = 0
        self._resolver = resolver
        self._started = time.monotonic()
        self._dns_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ state
    def capacity(self) -> int:
        return len(self.replicas.healthy()) * self.spec.max_in_flight

    def has_healthy(self) -> bool:
        return bool(self.replicas.healthy())

    def _on_event(self, kind: str, replica: Replica) -> None:
        if kind == "eject":
            self.metrics.ejections.labels(pool=self.name, replica=replica.url).inc()
        elif kind == "retry":
            self.metrics.retries.labels(pool=self.name).inc()
        elif kind == "back":
            self.admission.wake()

    def cost_per_million_tokens(self, now: float) -> float:
        """Configured GPU price x replicas x hours since start, per million tokens served."""
        if self.spec.gpu_hour_price <= 0 or self.tokens_served == 0:
            return 0.0
        hours = (now - self._started) / 3600
        spent = self.spec.gpu_hour_price * len(self.replicas.replicas) * hours
        return spent / self.tokens_served * 1e6

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self.spec.dns is not None:
            await self.resolve_once()
            self._dns_task = asyncio.get_running_loop().create_task(self._dns_loop(self.spec.dns))
        self.replicas.start_probing()

    async def resolve_once(self) -> None:
        dns = self.spec.dns
        if dns is None:
            return
        try:
            addresses = await self._resolver(dns.name, dns.port)
        except OSError as exc:
            # Keep the last known replicas: a DNS hiccup must not empty the pool.
            log.warning("pool %s: cannot resolve %s: %s", self.name, dns.name, exc)
            return
        removed = self.replicas.set_replicas([_entry(a, dns) for a in addresses])
        for replica in removed:
            log.info("pool %s: replica %s left DNS", self.name, replica.url)
            client = self.replicas.client_of(replica)
            asyncio.get_running_loop().create_task(self._close_when_idle(replica, client))
        self.admission.wake()

    async def _close_when_idle(self, replica: Replica, client: BaseAsyncClient) -> None:
        while replica.in_flight:
            await asyncio.sleep(0.5)
        await client.close()

    async def _dns_loop(self, dns: DnsSpec) -> None:
        while True:
            await asyncio.sleep(dns.interval)
            await self.resolve_once()

    async def close(self) -> None:
        if self._dns_task is not None:
            self._dns_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dns_task
        await self.replicas.close()

    # ------------------------------------------------------------------ requests
    @contextlib.asynccontextmanager
    async def slot(self, priority: str) -> AsyncIterator[None]:
        """Hold one of the pool's slots (queueing by priority); 503 with no healthy replica."""
        if not self.has_healthy():
            raise APIError(
                503,
                f"pool '{self.name}' has no healthy replica: "
                + "; ".join(
                    f"{r.url} ({r.last_error or 'not ready'})" for r in self.replicas.replicas
                ),
                code="no_healthy_replica",
                retry_after=1.0,
            )
        try:
            await self.admission.acquire(priority)
        except APIError:
            self.metrics.shed.labels(pool=self.name, priority=priority).inc()
            raise
        try:
            yield
        finally:
            self.admission.release()

    def stream(
        self,
        model: str,
        inputs: Tensors,
        request_id: str,
        on_replica: Callable[[Replica], None] | None = None,
    ) -> AsyncIterator[Tensors]:
        return self.replicas.stream_tensors(model, inputs, request_id, on_replica=on_replica)

    async def infer(
        self, model: str, inputs: Tensors, outputs: list[str], request_id: str
    ) -> dict[str, Any]:
        return await self.replicas.infer_tensors(model, inputs, outputs, request_id)
