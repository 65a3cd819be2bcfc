"""The SDK's wire paths against a real tritonserver serving the trivial ``ticker`` model.

The ticker streams a known number of responses at a known pace, so streaming, UTF-8
reassembly, cancellation (seen by the model), timeouts, typed errors and replica
ejection are checked over real gRPC and HTTP without waiting on an LLM.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from client import Client, ModelNotFound, Timeout
from client.balancing import AsyncReplicaPool
from serving.launcher import LaunchOptions, TritonLauncher

TICKER_REPO = Path(__file__).resolve().parents[1] / "fixtures" / "ticker_repo"
PROTOCOLS = ("grpc", "http")


def _launch(tmp: Path, name: str) -> TritonLauncher:
    launcher = TritonLauncher(
        LaunchOptions.on_free_ports(repository=TICKER_REPO, log_path=tmp / f"{name}.log")
    )
    launcher.start()
    return launcher


@pytest.fixture(scope="module")
def ticker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonLauncher]:
    launcher = _launch(tmp_path_factory.mktemp("ticker"), "ticker")
    try:
        yield launcher
    finally:
        launcher.stop()


def _client(server: TritonLauncher, protocol: str, timeout: float = 30.0) -> Client:
    url = server.grpc_url if protocol == "grpc" else server.http_url
    return Client(url, protocol=protocol, timeout=timeout)


def _stats(client: Client) -> dict[str, int]:
    return json.loads(client.generate("__stats__", model="ticker").text)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_stream_delivers_every_response_in_order(ticker: TritonLauncher, protocol: str) -> None:
    with _client(ticker, protocol) as client:
        chunks = list(client.generate("go", stream=True, model="ticker", max_tokens=6))
        assert [c.text for c in chunks] == ["tok "] * 6
        assert client.generate("go", model="ticker", max_tokens=3).text == "tok " * 3


def test_utf8_split_across_responses_is_reassembled(ticker: TritonLauncher) -> None:
    # Only gRPC carries raw bytes; HTTP's JSON events are already text.
    with _client(ticker, "grpc") as client:
        texts = [c.text for c in client.generate("utf8", stream=True, model="ticker", max_tokens=3)]
    assert texts == ["caf", "é ", "tok "]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_breaking_out_cancels_on_the_server(ticker: TritonLauncher, protocol: str) -> None:
    with _client(ticker, protocol) as client:
        before = _stats(client)
        started = time.monotonic()
        for i, _ in enumerate(
            client.generate("long", stream=True, model="ticker", max_tokens=2000)
        ):
            if i == 2:
                break
        assert _wait_cancelled(client, before["cancelled"]) == before["cancelled"] + 1
        after = _stats(client)
    assert after["finished"] == before["finished"]
    assert time.monotonic() - started < 10  # 2000 ticks would take 40 s


def _wait_cancelled(client: Client, before: int) -> int:
    deadline = time.monotonic() + 10
    while _stats(client)["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    return _stats(client)["cancelled"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_timeout_raises_and_frees_the_stream(ticker: TritonLauncher, protocol: str) -> None:
    with _client(ticker, protocol) as observer:
        before = _stats(observer)["cancelled"]
        with _client(ticker, protocol, timeout=0.5) as client, pytest.raises(Timeout):
            client.generate("slow", model="ticker", max_tokens=1000)
        assert _wait_cancelled(observer, before) == before + 1


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_missing_model_is_typed(ticker: TritonLauncher, protocol: str) -> None:
    with _client(ticker, protocol) as client:
        with pytest.raises(ModelNotFound, match="nope"):
            client.generate("hi", model="nope")
        assert [(m.name, m.ready) for m in client.models()] == [("ticker", True)]


def test_pool_ejects_a_stopped_replica_and_keeps_serving(
    ticker: TritonLauncher, tmp_path: Path
) -> None:
    second = _launch(tmp_path, "second")
    stopped = False
    try:
        pool = AsyncReplicaPool(
            [ticker.grpc_url, second.grpc_url],
            health_urls=[ticker.health_url, second.health_url],
            strategy="round_robin",
            probe_interval=0.2,
            timeout=30,
        )
        with Client.over(pool) as client:
            texts = [client.generate("x", model="ticker", max_tokens=2).text for _ in range(4)]
            assert texts == ["tok tok "] * 4
            assert [r.sent for r in pool.replicas] == [2, 2]
            second.stop()
            stopped = True
            time.sleep(1.0)  # the deep readiness probe notices
            assert [r.healthy for r in pool.replicas] == [True, False]
            texts = [client.generate("x", model="ticker", max_tokens=2).text for _ in range(4)]
            assert texts == ["tok tok "] * 4
            assert [r.sent for r in pool.replicas] == [6, 2]
    finally:
        if not stopped:
            second.stop()
