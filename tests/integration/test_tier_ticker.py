"""The paced tier stand-in (``tests/fixtures/tier_ticker_repo``) that
``benchmarks/gateway.py latency --upstream ticker`` measures the gateway against.

It must be a tier the gateway cannot tell from ``llm_small``: the tier's tensor
interface over gRPC, one output id per response at its interval, and the gateway's
OpenAI path on top of it counting those tokens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from client import AsyncClient
from client.errors import InvalidInput
from gateway.service import tier_inputs
from serving.launcher import LaunchOptions, TritonLauncher
from tests.integration.conftest import running_gateway

REPO = Path(__file__).resolve().parents[1] / "fixtures" / "tier_ticker_repo"
INTERVAL_S = 0.020  # the fixture's interval_ms
TOKEN_ID = 1000  # the fixture's token_id


@pytest.fixture(scope="module")
def ticker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonLauncher]:
    log = tmp_path_factory.mktemp("tier_ticker") / "triton.log"
    with TritonLauncher(LaunchOptions.on_free_ports(repository=REPO, log_path=log)) as launcher:
        yield launcher


def test_streams_one_output_id_per_interval_over_grpc(ticker: TritonLauncher) -> None:
    async def stream() -> list[tuple[float, list]]:
        client = AsyncClient(ticker.grpc_url)
        try:
            start = time.perf_counter()
            return [
                (time.perf_counter() - start, tensors["output_ids"].tolist())
                async for tensors in client.stream_tensors(
                    "llm_small", tier_inputs([1, 2, 3], 6, end_id=2, pad_id=2)
                )
            ]
        finally:
            await client.close()

    got = asyncio.run(stream())
    assert [ids for _, ids in got] == [[[[TOKEN_ID]]]] * 6
    # Paced, not instant: the stand-in sleeps one interval before each token, so the
    # last one cannot arrive earlier than six intervals after the request (sleeps never
    # return early; a late token can only make this longer).
    assert got[-1][0] >= 6 * INTERVAL_S


def test_the_gateway_routes_to_it_as_to_the_tier(ticker: TritonLauncher, tmp_path: Path) -> None:
    args = ["--triton-grpc", ticker.grpc_url, "--triton-health", ticker.health_url]
    with running_gateway(tmp_path, *args) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0)
        stream = client.chat.completions.create(
            model="llm_small",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "()" * 5
    assert chunks[-1].usage.completion_tokens == 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_a_bad_length_is_named_and_the_next_request_works(ticker: TritonLauncher) -> None:
    async def tokens(length: int) -> int:
        client = AsyncClient(ticker.grpc_url)
        try:
            inputs = tier_inputs([1, 2, 3], length, end_id=2, pad_id=2)
            return len([t async for t in client.stream_tensors("llm_small", inputs)])
        finally:
            await client.close()

    with pytest.raises(InvalidInput, match="'request_output_len' must be at least 1, got 0"):
        asyncio.run(tokens(0))
    assert asyncio.run(tokens(2)) == 2
