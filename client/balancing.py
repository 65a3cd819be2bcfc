"""Client-side balancing across replicas: strategies, health ejection, the replica pool.

The strategies are plain objects that pick one of the healthy replicas from what the
client knows (requests it has in flight per replica), so they are unit-tested without
any server:

- ``round_robin``: each replica in turn. Fair in request count, blind to request length.
- ``least_requests``: the replica with the fewest requests in flight (ties rotate).
- ``power_of_two``: two random replicas, the one with fewer in flight. Nearly as good as
  least_requests with many clients, without every client herding onto the same replica.

A replica is ejected when a call to it fails to connect, when it fails several requests
in a row on its side (model missing or mid-reload, dead stub), or when its health URL
(the launcher's deep readiness endpoint, ``GET /health/ready``: 200 ready, 503 not) says
it is not ready; a background probe puts it back once the health check passes again.

This module is the one balancing implementation of the project: the gateway
(``gateway.pools``) builds its per-pool balancing on :class:`AsyncReplicaPool` too. It
imports only the client's own light dependencies (tritonclient, aiohttp, numpy), never
torch or the server's packages.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from client.errors import ModelNotFound, Overloaded, ServerError, ServerUnavailable, StreamLost
from client.sdk import AsyncClient, BaseAsyncClient
from client.transport import ModelStatus, Protocol, Tensors

log = logging.getLogger(__name__)


class Strategy(str, enum.Enum):
    """How the pool picks a replica for each request."""

    ROUND_ROBIN = "round_robin"
    LEAST_REQUESTS = "least_requests"
    POWER_OF_TWO = "power_of_two"


@dataclass(eq=False)
class Replica:
    """One server as the pool sees it."""

    url: str
    health_url: str | None = None
    in_flight: int = 0
    healthy: bool = True
    sent: int = 0
    failures: int = 0  # consecutive replica-side failures (reset by a success)
    last_error: str = ""
    ejections: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    #: Models whose Python stub died on this server, from the launcher's deep health
    #: (``STUB_DEAD`` until the supervisor has reloaded them): their requests in flight
    #: there are lost, since Triton 2.51 never answers them.
    dead_models: frozenset[str] = frozenset()
    slow_probes: int = 0  # health probes in a row that got no answer in time
    #: Calls of :meth:`AsyncReplicaPool.eject` so far: a probe begun before the latest
    #: one is stale, whatever it says.
    marked_down: int = 0


class Picker:
    """Chooses one replica from the healthy candidates (never empty)."""

    def choose(self, candidates: Sequence[Replica]) -> Replica:
        raise NotImplementedError


class RoundRobin(Picker):
    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[Replica]) -> Replica:
        return candidates[next(self._counter) % len(candidates)]


class LeastRequests(Picker):
    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[Replica]) -> Replica:
        # Rotate the starting point so ties do not always land on the first replica.
        start = next(self._counter) % len(candidates)
        rotated = list(candidates[start:]) + list(candidates[:start])
        return min(rotated, key=lambda r: r.in_flight)


class PowerOfTwo(Picker):
    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, candidates: Sequence[Replica]) -> Replica:
        if len(candidates) == 1:
            return candidates[0]
        first, second = self._rng.sample(list(candidates), 2)
        return second if second.in_flight < first.in_flight else first


def make_picker(strategy: Strategy | str, rng: random.Random | None = None) -> Picker:
    """The picker object for a strategy name."""
    strategy = Strategy(strategy)
    if strategy is Strategy.ROUND_ROBIN:
        return RoundRobin()
    if strategy is Strategy.LEAST_REQUESTS:
        return LeastRequests()
    return PowerOfTwo(rng)


@dataclass(frozen=True)
class Probe:
    """One deep-readiness probe: ``ok`` (200), ``slow`` (no answer within the timeout,
    which a saturated but healthy server also does), and the models the launcher's
    report calls ``STUB_DEAD``."""

    ok: bool
    slow: bool = False
    dead: frozenset[str] = frozenset()


async def probe_health(session: aiohttp.ClientSession, url: str, timeout: float) -> Probe:
    """Probe the deep readiness endpoint at ``url`` within ``timeout`` seconds."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            try:
                report = await response.json(content_type=None)
            except ValueError:
                report = None
            models = report.get("models") if isinstance(report, dict) else None
            dead = frozenset(str(m) for m, state in (models or {}).items() if state == "STUB_DEAD")
            return Probe(response.status == 200, dead=dead)
    except TimeoutError:
        return Probe(False, slow=True)
    except aiohttp.ClientError:
        return Probe(False)


class _StreamWatch:
    """One stream in flight on a replica's model, ended at once if that model's stub dies.

    Triton 2.51 never answers the requests a dead stub held, so such a stream would wait
    out its deadline. :meth:`lose` cancels the consumer's task, but only while it awaits
    the upstream in :meth:`next` (never while it is, say, writing to a slow client; its
    next read then fails at once). No task of its own per request.
    """

    def __init__(self, url: str, model: str) -> None:
        self.url = url
        self.model = model
        self.started = False  # a response was yielded: from here on, no retry elsewhere
        self.lost = False
        self._task: asyncio.Task[Any] | None = None

    def lose(self) -> None:
        if not self.lost:
            self.lost = True
            if self._task is not None:
                self._task.cancel()

    def _error(self) -> ServerUnavailable:
        if self.started:
            return StreamLost(
                f"{self.model} on {self.url} lost its Python stub mid-stream "
                "(the server restarts it; this answer cannot be finished)"
            )
        return ServerUnavailable(f"{self.model} on {self.url} lost its stub before answering")

    async def next(self, stream: AsyncIterator[Tensors]) -> Tensors:
        """The stream's next response (StopAsyncIteration at its end)."""
        if self.lost:
            raise self._error()
        self._task = asyncio.current_task()  # the consumer's task (it may change)
        try:
            return await anext(stream)
        except asyncio.CancelledError:
            if not self.lost or self._task is None:
                raise
            self._task.uncancel()
            raise self._error() from None
        finally:
            self._task = None


class AsyncReplicaPool(BaseAsyncClient):
    """The SDK's methods, balanced over several servers.

    Args:
        urls: ``host:port`` of each replica (gRPC or HTTP port, per ``protocol``).
        strategy: see :class:`Strategy`.
        health_urls: per replica, the launcher's ``http://host:port/health/ready`` (or
            None to probe with Triton's own ``server_ready``).
        probe_interval: seconds between health probes.
        probe_timeout: seconds a deep-health probe waits for its answer.
        client_factory: builds the client for one url (tests pass fakes).
        eject_after: consecutive ModelNotFound / ServerError answers, or deep-health
            probes without an answer in time, that eject a replica until a probe passes
            (refused connections and a 503 from deep health eject at once).
        max_in_flight: requests per replica the pool prefers not to exceed: a full
            replica is picked only when every healthy one is full (the gateway's
            admission queue keeps the total under the pool's capacity).
        max_attempts: replicas tried for a request that fails before its first response
            (None: every healthy replica once; the gateway retries once, so 2).
        on_event: called with ``("eject" | "back" | "retry" | "lost", replica)`` (metrics,
            logs; ``lost``: a model's stub died there, see ``Replica.dead_models``).
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        protocol: Protocol | str = Protocol.GRPC,
        strategy: Strategy | str = Strategy.ROUND_ROBIN,
        health_urls: Sequence[str | None] | None = None,
        timeout: float | None = None,
        probe_interval: float = 1.0,
        probe_timeout: float = 2.0,
        rng: random.Random | None = None,
        client_factory: Callable[[str], AsyncClient] | None = None,
        eject_after: int = 3,
        max_in_flight: int | None = None,
        max_attempts: int | None = None,
        on_event: Callable[[str, Replica], None] | None = None,
        allow_empty: bool = False,
    ) -> None:
        super().__init__(timeout)
        if not urls and not allow_empty:
            raise ValueError("a replica pool needs at least one url")
        health = list(health_urls) if health_urls is not None else [None] * len(urls)
        if len(health) != len(urls):
            raise ValueError(f"got {len(urls)} replica urls but {len(health)} health urls")
        self._factory = client_factory or (lambda url: AsyncClient(url, protocol))
        self.replicas: list[Replica] = []
        self._clients: dict[Replica, AsyncClient] = {}
        self.set_replicas(list(zip(urls, health, strict=True)))
        self.max_in_flight = max_in_flight
        self.max_attempts = max_attempts
        self._on_event = on_event or (lambda _kind, _replica: None)
        self.strategy = Strategy(strategy)
        self._picker = make_picker(self.strategy, rng)
        self._probe_interval = probe_interval
        self._probe_timeout = probe_timeout
        self.eject_after = eject_after
        self._probe_task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        #: Streams in flight, by (replica url, model): ended when that model's stub dies.
        self._streams: dict[tuple[str, str], set[_StreamWatch]] = {}

    def set_replicas(self, entries: Sequence[tuple[str, str | None]]) -> list[Replica]:
        """Make the replica list ``(url, health_url)`` entries (a DNS re-resolution).

        Known replicas keep their state and counters; new ones start healthy; removed
        ones leave the list at once (their streams in flight finish) and their clients
        are returned for the caller to close once idle.
        """
        wanted = {url: health for url, health in entries}
        removed = [r for r in self.replicas if r.url not in wanted]
        known = {r.url for r in self.replicas}
        for url, health in entries:
            if url not in known:
                replica = Replica(url=url, health_url=health)
                self._clients[replica] = self._factory(url)
                self.replicas.append(replica)
                known.add(url)
        self.replicas = [r for r in self.replicas if r.url in wanted]
        return removed

    def client_of(self, replica: Replica) -> AsyncClient:
        return self._clients[replica]

    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas if r.healthy]

    def start_probing(self) -> None:
        """Start the background health probe (idempotent; needs a running loop)."""
        if self._probe_task is None:
            self._probe_task = asyncio.get_running_loop().create_task(self._probe_loop())

    def pick(self, exclude: Sequence[Replica] = ()) -> Replica:
        """The replica for the next request; starts health probing on first use."""
        self.start_probing()
        candidates = [r for r in self.replicas if r.healthy and r not in exclude]
        if not candidates:
            raise ServerUnavailable(
                "no healthy replica: "
                + "; ".join(f"{r.url} ({r.last_error or 'not ready'})" for r in self.replicas)
                if self.replicas
                else "no replica is known (none configured or resolved yet)"
            )
        if self.max_in_flight is not None:
            room = [r for r in candidates if r.in_flight < self.max_in_flight]
            candidates = room or candidates
        return self._picker.choose(candidates)

    def eject(self, replica: Replica, reason: str) -> None:
        replica.marked_down += 1
        if replica.healthy:
            log.warning("ejecting replica %s: %s", replica.url, reason)
            replica.ejections += 1
            self._on_event("eject", replica)
        replica.healthy = False
        replica.last_error = reason

    def _may_retry(self, tried: Sequence[Replica]) -> bool:
        """Whether to send again elsewhere: attempts are left and a healthy replica not yet
        tried exists (else the caller gets the real error, not "no healthy replica")."""
        if self.max_attempts is not None and len(tried) >= self.max_attempts:
            return False
        return any(r.healthy and r not in tried for r in self.replicas)

    async def check(self, replica: Replica) -> bool:
        """Probe one replica now and update its health."""
        marked = replica.marked_down
        if replica.health_url is not None:
            if self._session is None:
                self._session = aiohttp.ClientSession()
            probe = await probe_health(self._session, replica.health_url, self._probe_timeout)
            if probe.slow and replica.healthy:
                # Two saturated cores delay a healthy launcher's answer past the timeout
                # now and then (the replica benchmark saw healthy replicas ejected that
                # way): only eject_after slow probes in a row count as a failure.
                replica.slow_probes += 1
                if replica.slow_probes < self.eject_after:
                    return True
            else:
                replica.slow_probes = 0
            ok = probe.ok
            self.note_dead_models(replica, probe.dead)
        else:
            try:
                ok = await self._clients[replica].server_ready()
            except Exception:
                ok = False
        if ok and replica.marked_down != marked:
            # A request failed there while this probe was in flight (a SIGKILLed server
            # answered the probe just before it died): the failure is the newer news.
            # Readmitting it would send it requests until the next probe, and count a
            # second ejection for one failure.
            return False
        if ok and not replica.healthy:
            log.info("replica %s is back", replica.url)
            replica.failures = 0
            self._on_event("back", replica)
        if not ok:
            self.eject(replica, "health check failed")
        replica.healthy = ok
        return ok

    def note_dead_models(self, replica: Replica, dead: frozenset[str]) -> None:
        """``dead``: the models whose stub is dead on ``replica`` (its deep health says so).

        Streams of a newly dead model there end at once: before their first response
        with :class:`ServerUnavailable` (the pool sends them elsewhere), after it with
        :class:`StreamLost`."""
        fresh = dead - replica.dead_models
        replica.dead_models = dead
        if fresh:
            for model in fresh:
                for watch in list(self._streams.get((replica.url, model), ())):
                    watch.lose()
            self._on_event("lost", replica)

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self._probe_interval)
            # Replicas with a deep readiness URL are checked continuously (a stub can die
            # while Triton still answers); others only when ejected, to be let back in.
            due = [r for r in self.replicas if r.health_url is not None or not r.healthy]
            await asyncio.gather(*(self.check(r) for r in due), return_exceptions=True)

    @contextlib.contextmanager
    def _lease(self, replica: Replica) -> Iterator[Replica]:
        replica.in_flight += 1
        replica.sent += 1
        try:
            yield replica
        except Overloaded:
            raise  # a full queue is a busy replica, not a broken one: it stays in rotation
        except ServerUnavailable as exc:
            self.eject(replica, str(exc))
            raise
        except (ModelNotFound, ServerError) as exc:
            # Outlier detection: a replica that keeps failing fast (a model mid-reload, a
            # dead stub) would otherwise attract every request under least_requests and
            # power_of_two, since it never has any in flight.
            replica.failures += 1
            if replica.failures >= self.eject_after:
                self.eject(replica, f"{replica.failures} failures in a row: {exc}")
            raise
        else:
            replica.failures = 0
        finally:
            replica.in_flight -= 1

    async def infer_tensors(
        self, model: str, inputs: Tensors, outputs: list[str], request_id: str = ""
    ) -> Tensors:
        tried: list[Replica] = []
        while True:
            replica = self.pick(tried)
            try:
                with self._lease(replica):
                    return await self._clients[replica].infer_tensors(
                        model, inputs, outputs, request_id
                    )
            except ServerUnavailable:
                tried.append(replica)  # never reached a server: safe to send elsewhere
                if not self._may_retry(tried):
                    raise
                self._on_event("retry", replica)

    async def stream_tensors(
        self,
        model: str,
        inputs: Tensors,
        request_id: str = "",
        *,
        on_replica: Callable[[Replica], None] | None = None,
    ) -> AsyncIterator[Tensors]:
        """Stream from one replica, retrying another before the first response.

        ``on_replica`` is told which replica answers, just before its first response is
        yielded (the gateway puts it in a header and its request log).
        """
        tried: list[Replica] = []
        while True:
            replica = self.pick(tried)
            stream = self._clients[replica].stream_tensors(model, inputs, request_id)
            watch = _StreamWatch(replica.url, model)
            watches = self._streams.setdefault((replica.url, model), set())
            watches.add(watch)
            try:
                with self._lease(replica):
                    async with contextlib.aclosing(stream):
                        while True:
                            try:
                                tensors = await watch.next(stream)
                            except StopAsyncIteration:
                                return
                            if not watch.started and on_replica is not None:
                                on_replica(replica)
                            watch.started = True
                            yield tensors
            except ServerUnavailable:
                if watch.started:
                    raise  # part of the answer was delivered; a retry would repeat it
                tried.append(replica)
                if not self._may_retry(tried):
                    raise
                self._on_event("retry", replica)
            finally:
                watches.discard(watch)
                if not watches:
                    self._streams.pop((replica.url, model), None)

    async def models(self) -> list[ModelStatus]:
        """The models of the first healthy replica (replicas serve the same repository)."""
        replica = self.pick()
        with self._lease(replica):
            return await self._clients[replica].models()

    async def close(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe_task
            self._probe_task = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        for client in self._clients.values():
            await client.close()
