"""Balancing strategies as plain code, and the pool's ejection and probing."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from client.balancing import (
    AsyncReplicaPool,
    LeastRequests,
    PowerOfTwo,
    Replica,
    RoundRobin,
    Strategy,
    make_picker,
)
from client.errors import ModelNotFound, Overloaded, ServerUnavailable, StreamLost
from client.transport import Tensors
from serving.launcher import free_port
from tests.unit.client_fakes import FakeServer, text_chunks


def _replicas(*in_flight: int) -> list[Replica]:
    return [Replica(url=f"r{i}", in_flight=n) for i, n in enumerate(in_flight)]


def test_round_robin_cycles_regardless_of_load() -> None:
    replicas = _replicas(9, 0, 0)
    picker = RoundRobin()
    assert [picker.choose(replicas).url for _ in range(6)] == ["r0", "r1", "r2"] * 2


def test_least_requests_picks_the_idlest_and_rotates_ties() -> None:
    picker = LeastRequests()
    assert picker.choose(_replicas(3, 1, 2)).url == "r1"
    tied = _replicas(0, 0, 5)
    assert {picker.choose(tied).url for _ in range(4)} == {"r0", "r1"}


def test_power_of_two_never_picks_the_busiest_of_its_pair() -> None:
    replicas = _replicas(0, 5, 10)
    picker = PowerOfTwo(random.Random(0))
    counts = Counter(picker.choose(replicas).url for _ in range(3000))
    # r2 is the busiest of any pair it is in, so it is never chosen; r0 wins 2 of 3 pairs.
    assert counts["r2"] == 0
    assert counts["r0"] == pytest.approx(2000, rel=0.1)
    assert PowerOfTwo().choose(_replicas(4)).url == "r0"


def test_make_picker_from_names() -> None:
    assert isinstance(make_picker("round_robin"), RoundRobin)
    assert isinstance(make_picker(Strategy.LEAST_REQUESTS), LeastRequests)
    assert isinstance(make_picker("power_of_two"), PowerOfTwo)
    with pytest.raises(ValueError):
        make_picker("random")


def _pool(servers: dict[str, FakeServer], **kwargs: object) -> AsyncReplicaPool:
    return AsyncReplicaPool(list(servers), client_factory=servers.__getitem__, **kwargs)


async def _health_server(
    ready: Callable[[web.Request], Awaitable[web.Response]],
) -> tuple[web.AppRunner, int]:
    """A launcher-like deep health endpoint on loopback, answered by ``ready``."""
    app = web.Application()
    app.router.add_get("/health/ready", ready)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


@contextlib.asynccontextmanager
async def _probed_replica(
    ready: Callable[[web.Request], Awaitable[web.Response]], **kwargs: object
) -> AsyncIterator[tuple[AsyncReplicaPool, Replica]]:
    """A one-replica pool whose deep health URL ``ready`` answers; closed on exit."""
    runner, port = await _health_server(ready)
    servers = {"a:1": FakeServer("a:1", chunks=text_chunks(b"ok"))}
    pool = _pool(servers, health_urls=[f"http://127.0.0.1:{port}/health/ready"], **kwargs)
    try:
        yield pool, pool.replicas[0]
    finally:
        await pool.close()
        await runner.cleanup()


def test_pool_balances_streams_and_counts_in_flight() -> None:
    servers = {u: FakeServer(u, chunks=text_chunks(b"a", b"b"), delay=0.01) for u in ("a:1", "b:1")}
    pool = _pool(servers, strategy="least_requests")

    async def scenario() -> list[int]:
        seen = []

        async def one() -> None:
            async for _ in pool.generate("hi", stream=True):
                seen.append(sum(r.in_flight for r in pool.replicas))

        await asyncio.gather(*(one() for _ in range(8)))
        await pool.close()
        return seen

    seen = asyncio.run(scenario())
    assert max(seen) <= 8 and all(r.in_flight == 0 for r in pool.replicas)
    assert [r.sent for r in pool.replicas] == [4, 4]
    assert servers["a:1"].in_flight_peak == 4


def test_unreachable_replica_is_ejected_and_probed_back() -> None:
    good = FakeServer("good:1", chunks=text_chunks(b"ok"))
    bad = FakeServer("bad:1", chunks=text_chunks(b"ok"), error=ServerUnavailable("refused"))
    bad.ready = False
    pool = _pool({"good:1": good, "bad:1": bad}, strategy="round_robin", probe_interval=0.02)

    async def scenario() -> None:
        results = []
        for _ in range(4):
            try:
                results.append((await pool.generate("hi")).text)
            except ServerUnavailable:
                results.append("error")
        # The one request that hit the refused replica was sent again to the good one
        # (it never reached a server); the bad replica is ejected.
        assert results == ["ok"] * 4
        assert len(bad.requests) == 1 and len(good.requests) == 4
        assert [r.healthy for r in pool.replicas] == [True, False]
        bad.error, bad.ready = None, True
        await asyncio.sleep(0.1)  # the probe lets it back in
        assert pool.replicas[1].healthy
        texts = [(await pool.generate("hi")).text for _ in range(2)]
        assert texts == ["ok", "ok"] and len(bad.requests) == 2
        await pool.close()

    asyncio.run(scenario())


def test_an_overloaded_replica_is_retried_elsewhere_but_stays_in_rotation() -> None:
    """A full queue is load, not a fault: ejecting for it would take the busiest replicas
    out one by one under overload and answer 503 where 429 is right."""
    busy = FakeServer("busy:1", chunks=text_chunks(b"ok"), error=Overloaded("overloaded: full"))
    good = FakeServer("good:1", chunks=text_chunks(b"ok"))
    pool = _pool({"busy:1": busy, "good:1": good}, strategy="round_robin", max_attempts=2)

    async def scenario() -> None:
        texts = [(await pool.generate("hi")).text for _ in range(4)]
        assert texts == ["ok"] * 4  # the busy replica's requests went to the other one
        assert len(busy.requests) == 4 and len(good.requests) == 4  # tried, then sent on
        assert all(r.healthy for r in pool.replicas)
        busy.error = None
        assert [(await pool.generate("hi")).text for _ in range(2)] == ["ok", "ok"]
        assert len(busy.requests) == 5  # it serves again once it has room
        await pool.close()

    asyncio.run(scenario())


def test_a_lone_overloaded_replica_answers_overloaded_not_no_healthy_replica() -> None:
    busy = FakeServer("busy:1", chunks=text_chunks(b"ok"), error=Overloaded("overloaded: full"))
    pool = _pool({"busy:1": busy}, max_attempts=2)

    async def scenario() -> None:
        for _ in range(2):
            with pytest.raises(Overloaded, match="overloaded: full"):
                await pool.generate("hi")
        assert pool.replicas[0].healthy and len(busy.requests) == 2  # no retry on itself
        await pool.close()

    asyncio.run(scenario())


def test_no_healthy_replica_is_a_clear_error() -> None:
    servers = {"a:1": FakeServer("a:1"), "b:1": FakeServer("b:1")}
    pool = _pool(servers)
    for replica in pool.replicas:
        replica.healthy = False

    async def scenario() -> None:
        with pytest.raises(
            ServerUnavailable, match=r"no healthy replica: a:1 \(not ready\); b:1 \(not ready\)"
        ):
            await pool.generate("hi")
        await pool.close()

    asyncio.run(scenario())


def test_pool_rejects_mismatched_health_urls() -> None:
    with pytest.raises(ValueError, match="2 replica urls but 1 health"):
        AsyncReplicaPool(["a:1", "b:1"], health_urls=["http://a/health/ready"])


def test_deep_readiness_url_ejects_and_readmits() -> None:
    """A replica whose launcher health endpoint says 503 is ejected although it answers."""
    state: dict = {"status": 503, "llm_small": "STUB_DEAD"}
    events: list[tuple[str, str, frozenset[str]]] = []

    async def ready(_: web.Request) -> web.Response:
        # The launcher's report: a model whose stub died is STUB_DEAD until reloaded.
        report = {"server": "ready", "models": {"llm_small": state["llm_small"]}}
        return web.json_response(report, status=state["status"])

    async def scenario() -> None:
        runner, port = await _health_server(ready)
        servers = {u: FakeServer(u, chunks=text_chunks(b"ok")) for u in ("a:1", "b:1")}
        pool = _pool(
            servers,
            health_urls=[f"http://127.0.0.1:{port}/health/ready", None],
            probe_interval=0.02,
            on_event=lambda kind, r: events.append((kind, r.url, r.dead_models)),
        )
        try:
            await pool.generate("hi")  # starts probing
            await asyncio.sleep(0.15)
            assert [r.healthy for r in pool.replicas] == [False, True]
            # Streams of llm_small on a:1 are lost: told once, not at every probe.
            assert [e for e in events if e[0] == "lost"] == [
                ("lost", "a:1", frozenset({"llm_small"}))
            ]
            state["llm_small"] = "LOADING"  # the supervisor reloads it
            await asyncio.sleep(0.1)
            assert pool.replicas[0].dead_models == frozenset()
            before = len(servers["a:1"].requests)
            for _ in range(4):
                await pool.generate("hi")
            assert len(servers["a:1"].requests) == before
            state["status"] = 200
            await asyncio.sleep(0.15)
            assert [r.healthy for r in pool.replicas] == [True, True]
        finally:
            await pool.close()
            await runner.cleanup()

    asyncio.run(scenario())


def test_a_stream_whose_stub_dies_before_answering_is_retried_elsewhere() -> None:
    """Triton never answers what a dead stub held: once deep health reports the model
    STUB_DEAD, a request still waiting for its first response there goes to another
    replica (nothing was sent yet) instead of waiting out its deadline."""
    state = {"llm_small": "READY"}

    async def ready(_: web.Request) -> web.Response:
        dead = state["llm_small"] == "STUB_DEAD"
        return web.json_response({"models": dict(state)}, status=503 if dead else 200)

    async def scenario() -> None:
        runner, port = await _health_server(ready)
        servers = {
            "a:1": FakeServer("a:1", chunks=text_chunks(b"never"), delay=3600),
            "b:1": FakeServer("b:1", chunks=text_chunks(b"ok")),
        }
        pool = _pool(
            servers,
            strategy="round_robin",
            health_urls=[f"http://127.0.0.1:{port}/health/ready", None],
            probe_interval=3600,  # probed by hand below
        )
        try:
            pending = asyncio.ensure_future(pool.generate("hi", model="llm_small"))
            while not servers["a:1"].requests:
                await asyncio.sleep(0.01)  # the request waits on a:1
            state["llm_small"] = "STUB_DEAD"
            await pool.check(pool.replicas[0])
            # (a guard, not a timing claim: without the retry this would wait an hour)
            assert (await asyncio.wait_for(pending, 60)).text == "ok"
            assert len(servers["b:1"].requests) == 1
            assert not pool.replicas[0].healthy and pool._streams == {}
        finally:
            await pool.close()
            await runner.cleanup()

    asyncio.run(scenario())


def test_a_probe_that_answered_before_a_failure_does_not_readmit_the_replica() -> None:
    """The probe's 200 left the launcher just before the server died; a request fails
    (ejection) before that answer arrives. The answer must not bring the replica back
    (nor make the next probe count a second ejection for the one failure)."""
    answer = asyncio.Event()
    events: list[tuple[str, str]] = []

    async def ready(_: web.Request) -> web.Response:
        await answer.wait()
        return web.json_response({"models": {}})

    async def scenario() -> None:
        async with _probed_replica(
            ready,
            probe_interval=3600,  # probed by hand below
            on_event=lambda kind, r: events.append((kind, r.url)),
        ) as (pool, replica):
            probe = asyncio.ensure_future(pool.check(replica))
            await asyncio.sleep(0.1)  # the probe waits for its answer
            pool.eject(replica, "UNAVAILABLE: connection refused")
            answer.set()
            assert await probe is False
            assert not replica.healthy and replica.ejections == 1
            assert replica.last_error == "UNAVAILABLE: connection refused"
            assert events == [("eject", "a:1")]
            # A probe begun after the failure is news again: the replica comes back.
            assert await pool.check(replica) is True
            assert replica.healthy and events == [("eject", "a:1"), ("back", "a:1")]

    asyncio.run(scenario())


def test_a_slow_health_answer_ejects_only_after_several_in_a_row() -> None:
    """A saturated but healthy launcher sometimes answers its probe late: one late answer
    must not eject it; eject_after late answers in a row do."""
    state = {"delay": 0.0}

    async def ready(_: web.Request) -> web.Response:
        await asyncio.sleep(state["delay"])
        return web.json_response({"models": {}})

    async def scenario() -> None:
        async with _probed_replica(ready, probe_timeout=0.05, eject_after=3) as (pool, replica):
            state["delay"] = 0.2  # later than the probe waits
            assert await pool.check(replica) and await pool.check(replica)
            assert replica.healthy and replica.slow_probes == 2
            state["delay"] = 0.0  # an answer in time resets the count
            assert await pool.check(replica) and replica.slow_probes == 0
            state["delay"] = 0.2
            results = [await pool.check(replica) for _ in range(3)]
            assert results == [True, True, False] and not replica.healthy

    asyncio.run(scenario())


class _OneThenSilence(FakeServer):
    """Sends one response, then nothing: what a stream held by a dead stub looks like."""

    async def stream_tensors(self, model: str, inputs: Tensors, request_id: str = ""):  # type: ignore[override]
        self.requests.append((model, inputs))
        yield text_chunks(b"a")[0]
        await asyncio.sleep(3600)


def test_a_stream_whose_stub_dies_mid_stream_ends_at_once_and_is_not_retried() -> None:
    servers = {"a:1": _OneThenSilence("a:1"), "b:1": FakeServer("b:1", chunks=text_chunks(b"b"))}
    pool = _pool(servers, strategy="round_robin", probe_interval=3600)

    async def scenario() -> None:
        got: list[Tensors] = []

        async def consume() -> None:
            async for tensors in pool.stream_tensors("llm_small", {}):
                got.append(tensors)

        task = asyncio.ensure_future(consume())
        while not got:
            await asyncio.sleep(0.01)
        pool.note_dead_models(pool.replicas[0], frozenset({"llm_small"}))
        # (a guard, not a timing claim: without the watch this would wait an hour)
        with pytest.raises(StreamLost, match="llm_small on a:1 lost its Python stub mid-stream"):
            await asyncio.wait_for(task, 60)
        assert len(got) == 1 and not servers["b:1"].requests  # nothing retried after a token
        assert pool._streams == {} and not pool.replicas[0].healthy
        await pool.close()

    asyncio.run(scenario())


def test_a_consumer_busy_elsewhere_is_not_cancelled_when_the_stub_dies() -> None:
    """Only a read of the upstream is interrupted (never, say, a write to a slow client);
    the next read fails at once."""
    pool = _pool({"a:1": _OneThenSilence("a:1")}, probe_interval=3600)

    async def scenario() -> None:
        stream = pool.stream_tensors("llm_small", {})
        await anext(stream)
        pool.note_dead_models(pool.replicas[0], frozenset({"llm_small"}))
        await asyncio.sleep(0.05)  # the consumer's own await: not cancelled
        with pytest.raises(StreamLost):
            await asyncio.wait_for(anext(stream), 60)
        await stream.aclose()
        assert pool._streams == {}
        await pool.close()

    asyncio.run(scenario())


def test_fast_failing_replica_is_ejected_after_consecutive_errors() -> None:
    """Without outlier ejection, power_of_two would send nearly everything to the replica
    that fails instantly (it never has requests in flight)."""
    good = FakeServer("good:1", chunks=text_chunks(b"ok"), delay=0.01)
    bad = FakeServer("bad:1", error=ModelNotFound("Request for unknown model: 'm' is not found"))
    pool = _pool({"good:1": good, "bad:1": bad}, strategy="power_of_two", probe_interval=60)

    async def scenario() -> list[str]:
        async def one() -> str:
            try:
                return (await pool.generate("hi")).text
            except ModelNotFound:
                return "error"

        results = []
        for _ in range(10):
            results += await asyncio.gather(*(one() for _ in range(4)))
        await pool.close()
        return results

    results = asyncio.run(scenario())
    assert results.count("error") == 3  # the three that tripped the ejection
    assert results.count("ok") == 37
    assert not pool.replicas[1].healthy and "3 failures in a row" in pool.replicas[1].last_error


def test_no_healthy_replica_names_the_last_errors() -> None:
    bad = FakeServer("a:1", error=ServerUnavailable("refused"))
    pool = _pool({"a:1": bad})

    async def scenario() -> None:
        with pytest.raises(ServerUnavailable):
            await pool.generate("hi")
        with pytest.raises(ServerUnavailable, match=r"no healthy replica: a:1 \(refused\)"):
            await pool.generate("hi")
        await pool.close()

    asyncio.run(scenario())


def test_a_stream_that_broke_midway_is_not_retried() -> None:
    """Part of the answer was delivered, so sending it elsewhere would repeat it."""

    class Breaks(FakeServer):
        async def stream_tensors(self, model, inputs, request_id=""):  # type: ignore[no-untyped-def]
            self.requests.append((model, inputs))
            yield text_chunks(b"par")[0]
            raise ServerUnavailable("connection reset")

    broken, good = Breaks("a:1"), FakeServer("b:1", chunks=text_chunks(b"ok"))
    pool = _pool({"a:1": broken, "b:1": good}, strategy="round_robin")

    async def scenario() -> None:
        with pytest.raises(ServerUnavailable, match="connection reset"):
            await pool.generate("hi")
        assert good.requests == [] and not pool.replicas[0].healthy
        await pool.close()

    asyncio.run(scenario())
