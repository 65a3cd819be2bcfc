"""Admission per pool: a bounded priority queue in front of the replicas' capacity.

A pool has room for ``max_in_flight`` requests per healthy replica. A request beyond
that waits in the pool's queue, interactive before batch (then first come, first
served), for at most ``max_wait`` seconds; a full queue or a wait that runs out is a 429
with ``Retry-After``. Latency stays bounded by ``max_wait`` plus the service time
instead of growing with the backlog.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable

from gateway.errors import APIError

PRIORITIES = {"interactive": 0, "batch": 1}


class Admission:
    """Slots = ``capacity()``; waiters are granted in (priority, arrival) order."""

    def __init__(
        self, name: str, capacity: Callable[[], int], max_queue: int, max_wait: float
    ) -> None:
        self.name = name
        self._capacity = capacity
        self.max_queue = max_queue
        self.max_wait = max_wait
        self.in_use = 0
        self.queued = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def _rank(self, priority: str) -> int:
        return PRIORITIES.get(priority, PRIORITIES["interactive"])

    async def acquire(self, priority: str = "interactive") -> None:
        """Take a slot, waiting in the queue if needed; raise a 429 APIError when shed."""
        if self.queued == 0 and self.in_use < self._capacity():
            self.in_use += 1
            return
        if self.queued >= self.max_queue:
            raise APIError(
                429,
                f"pool '{self.name}' is at capacity and its queue is full "
                f"({self.max_queue} waiting); retry later",
                code="queue_full",
                retry_after=max(1.0, self.max_wait / 4),
            )
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (self._rank(priority), next(self._seq), future))
        self.queued += 1
        try:
            await asyncio.wait_for(asyncio.shield(future), self.max_wait)
        except TimeoutError:
            if not self._abandon(future):
                return  # granted at the last moment: keep the slot
            raise APIError(
                429,
                f"pool '{self.name}' had no free replica for {self.max_wait:g}s; retry later",
                code="queue_timeout",
                retry_after=max(1.0, self.max_wait / 4),
            ) from None
        except asyncio.CancelledError:
            if not self._abandon(future):
                self.release()
            raise

    def _abandon(self, future: asyncio.Future[None]) -> bool:
        """Leave the queue; False when the slot was already granted."""
        if future.done():
            return False
        future.cancel()
        self.queued -= 1
        return True

    def release(self) -> None:
        self.in_use -= 1
        self.wake()

    def wake(self) -> None:
        """Grant queued requests while there is room (also after a replica comes back)."""
        while self._waiters and self.in_use < self._capacity():
            _, _, future = heapq.heappop(self._waiters)
            if future.done():  # abandoned
                continue
            self.queued -= 1
            self.in_use += 1
            future.set_result(None)
