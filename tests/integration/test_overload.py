"""Overload answers fast 429s, not growing latency: a gateway whose ``llm_small`` pool
admits 1 request and queues 1 (pools placement over the session's server) gets a burst.

Orderings, not timings: every shed request has its answer before the first admitted one
finishes, and once the load drains a good request succeeds.

The tier's own bound (``llm_small``: 16 slots, ``max_queue_size`` 32, "overloaded: " →
gateway 429) is not covered here: 60 concurrent streams through the session's gateway did
not fill it on this machine (all 60 were served), so triggering it needs a larger burst or
a server started with a smaller queue; the mapping itself is a unit test
(tests/unit/test_gateway_parts.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import pytest

from serving.launcher import TritonLauncher
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
