"""Overload answers fast 429s, not growing latency: a gateway whose ``llm_small`` pool
admits 1 request and queues 1 (pools placement over the session's server) gets a burst.

Orderings, not timings: every shed request has its answer before the first admitted one
finishes, and once the load drains a good request succeeds.

The tier's own bound ("overloaded: " → gateway 429) gets a server of its own: an
``llm_small`` with one generation slot and ``max_queue_size`` 1 behind a gateway pool that
admits plenty, so the tier is what refuses. (The session's ``llm_small``, 16 slots and 32
queued, took 60 concurrent streams on this machine without filling.) A refusal is load,
not a fault: the replica is not ejected.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections.abc import Iterator

import httpx
import pytest

from serving.launcher import DEFAULT_REPOSITORY, LaunchOptions, TritonLauncher
from serving.repository import configured_copy
from tests.integration.bad_inputs import KEY
from tests.integration.conftest import pools_gateway, replica

PROMPT = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]


@pytest.fixture(scope="module")
def tight_gateway(
    server: TritonLauncher, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A gateway whose ``llm_small`` pool admits 1 request and queues 1."""
    folder = tmp_path_factory.mktemp("gateway-tight")
    small = {"replicas": [replica(server)], "max_in_flight": 1, "max_queue": 1, "max_wait_s": 120}
    with pools_gateway(folder, server, small) as url:
        yield url


@pytest.fixture(scope="module")
def bounded_tier_gateway(
    server: TritonLauncher, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A gateway whose ``small`` pool is a server of its own: ``llm_small`` with one slot
    and ``max_queue_size`` 1, under a pool bound it never reaches."""
    folder = tmp_path_factory.mktemp("bounded-tier")
    repo = configured_copy(
        DEFAULT_REPOSITORY,
        folder,
        {"llm_small": {"max_active_sequences": "1", "max_queue_size": "1", "torch_threads": "1"}},
        models=["llm_small"],
    )
    options = LaunchOptions.on_free_ports(
        repository=repo, log_path=folder / "server.log", ready_timeout=600
    )
    with TritonLauncher(options) as tier:
        small = {"replicas": [replica(tier)], "max_in_flight": 16, "max_queue": 16}
        with pools_gateway(folder, server, small) as url:
            yield url


async def _one(client: httpx.AsyncClient, url: str, max_tokens: int) -> tuple[int, float, dict]:
    """One streamed chat; (status, when its whole answer was in, headers and error)."""
    body = {"model": "llm_small", "messages": PROMPT, "max_tokens": max_tokens, "stream": True}
    async with client.stream("POST", f"{url}/chat/completions", json=body) as response:
        raw = await response.aread()
        info = {"retry-after": response.headers.get("retry-after")}
        if response.status_code != 200:
            info["error"] = json.loads(raw)["error"]
        else:
            assert raw.rstrip().endswith(b"data: [DONE]") and b'"error"' not in raw, raw[-300:]
        return response.status_code, time.monotonic(), info


async def _burst(url: str, n: int, max_tokens: int) -> list[tuple[int, float, dict]]:
    headers = {"Authorization": f"Bearer {KEY}"}
    limits = httpx.Limits(max_connections=n + 4)
    async with httpx.AsyncClient(headers=headers, timeout=600, limits=limits) as client:
        return list(await asyncio.gather(*(_one(client, url, max_tokens) for _ in range(n))))


def _check_shed_first(results: list[tuple[int, float, dict]], code: str) -> None:
    admitted = [done for status, done, _ in results if status == 200]
    shed = [(done, info) for status, done, info in results if status == 429]
    assert admitted and shed, [(s, i) for s, _, i in results]
    assert {s for s, _, _ in results} == {200, 429}, [(s, i) for s, _, i in results]
    for _, info in shed:
        assert info["retry-after"] is not None and int(info["retry-after"]) >= 1
        assert info["error"]["type"] == "rate_limit_error" and info["error"]["code"] == code
    # Fast: the excess is refused while the admitted requests still generate.
    assert max(done for done, _ in shed) < min(admitted)


def _good(url: str) -> None:
    status, _, info = asyncio.run(_burst(url, 1, 2))[0]
    assert status == 200, info


def test_a_full_gateway_pool_sheds_the_excess_at_once(tight_gateway: str) -> None:
    results = asyncio.run(_burst(tight_gateway, 6, 24))
    _check_shed_first(results, "queue_full")
    assert sum(status == 200 for status, _, _ in results) == 2  # one running, one queued
    _good(tight_gateway)


def test_a_full_tier_queue_is_a_fast_429_and_the_replica_stays_in(
    bounded_tier_gateway: str,
) -> None:
    url = bounded_tier_gateway
    results = asyncio.run(_burst(url, 6, 48))
    _check_shed_first(results, "overloaded")
    assert sum(status == 200 for status, _, _ in results) in (1, 2)  # one slot, one queued
    for status, _, info in results:
        if status == 429:
            assert "generation slots" in info["error"]["message"], info
    # The refusals did not eject the (only) replica: the next request is served at once.
    with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=30) as response:
        page = response.read().decode()
    assert "gateway_ejections_total" in page  # (the family is there, so is a series once used)
    assert not re.findall(r'^gateway_ejections_total\{pool="small".*', page, re.M)
    _good(url)
