"""The gateway's pools placement over two Triton servers; one of them is stopped mid-test.

The session's server serves everything; a second server (started here with ``llm_small``
only, to keep the test short) is the second replica of the ``small`` pool. The gateway
routes ``auto`` itself (classifier on ``front``, the router's policy), balances
``llm_small`` over both replicas, and keeps answering when one replica goes away.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator

import openai
import pytest

from serving.launcher import LaunchOptions, TritonLauncher
from tests.integration.conftest import pools_gateway, replica

TIERS = {"llm_small", "llm_medium", "llm_large"}


@pytest.fixture(scope="module")
def second(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonLauncher]:
    log_path = tmp_path_factory.mktemp("triton2") / "server.log"
    launcher = TritonLauncher(
        LaunchOptions.on_free_ports(models=["llm_small"], log_path=log_path, ready_timeout=900)
    )
    launcher.start()
    try:
        yield launcher
    finally:
        launcher.stop()


@pytest.fixture(scope="module")
def pooled(
    server: TritonLauncher, second: TritonLauncher, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("gateway-pools")
    small = {
        "replicas": [replica(server), replica(second)],
        "strategy": "round_robin",
        "max_in_flight": 4,
        "gpu_hour_price": 2.5,
    }
    with pools_gateway(folder, server, small) as url:
        yield url


def _served_by(launcher: TritonLauncher) -> float:
    with urllib.request.urlopen(launcher.metrics_url, timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('nv_inference_request_success{model="llm_small"')
    )


def test_pools_route_balance_and_survive_a_replica_stopping(
    pooled: str, server: TritonLauncher, second: TritonLauncher
) -> None:
    client = openai.OpenAI(base_url=pooled, api_key="unused", max_retries=0, timeout=300)
    messages = [{"role": "user", "content": "What is the capital of France?"}]

    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=messages, max_tokens=4
    )
    assert raw.parse().model in TIERS and raw.headers["x-route-reason"] in {
        "table",
        "low_confidence",
    }

    before = _served_by(second)
    for _ in range(4):
        done = client.chat.completions.create(model="llm_small", messages=messages, max_tokens=2)
        assert done.model == "llm_small"
    assert _served_by(second) > before  # round robin reached the second replica

    second.stop()
    for _ in range(4):  # the dead replica is retried away from, then ejected
        done = client.chat.completions.create(model="llm_small", messages=messages, max_tokens=2)
        assert done.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(
        model="llm_small", messages=messages, max_tokens=2, stream=True
    )
    assert [c for c in stream]

    root = pooled[: -len("/v1")]
    with urllib.request.urlopen(f"{root}/health/ready", timeout=10) as response:
        health = json.loads(response.read())
    assert health["ready"] is True
    assert health["pools"]["small"]["healthy"] == [server.grpc_url]
    with urllib.request.urlopen(f"{root}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert f'gateway_ejections_total{{pool="small",replica="{second.grpc_url}"}} 1.0' in metrics
    assert 'gateway_pool_cost_per_million_tokens{pool="small"}' in metrics
