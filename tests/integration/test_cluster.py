"""The pools topology through ``gateway.cluster.LocalCluster``; a small replica is killed.

Started with the ``front`` pool (classifier, embeddings) and the two ``small`` replicas
only, to keep CI short: ``model: auto`` then always ends on ``llm_small`` (the policy's
fallbacks skip the tiers no pool serves). While the official ``openai`` SDK streams
completions from several users, one small replica's tritonserver is SIGKILLed: requests
that were not already streaming from it keep succeeding, the gateway ejects it, and after
:meth:`LocalCluster.restart` (same ports) it is back in rotation and serves again.

This replaces the stop-a-replica test that ``test_gateway_pools.py`` had.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import openai
import pytest

from client.loadgen import LoadShape, RunResult
from client.metrics import RequestRecord
from client.openai_load import Api, openai_load
from client.workload import jobs
from gateway.cluster import LocalCluster, Replica

PROMPTS = [
    "Name three rivers in Europe.",
    "Write one sentence about the sea.",
    "What is the capital of France?",
    "Give two tips for learning to cook.",
]
USERS = 4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = LocalCluster(pools=["front", "small"], workdir=tmp_path_factory.mktemp("cluster"))
    local.start()
    try:
        yield local
    finally:
        local.stop()


def _served(replica: Replica) -> float:
    """Requests ``llm_small`` completed on this replica (Triton's own counter)."""
    return replica.launcher.requests_succeeded("llm_small")


def _load(cluster: LocalCluster, seconds: float, seed: int) -> RunResult:
    shape = LoadShape(users=USERS, duration=seconds, seed=seed)
    return asyncio.run(
        openai_load(cluster.base_url, jobs(PROMPTS, [4, 8, 24], seed), shape, endpoint=Api.CHAT)
    )


def _wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting until {what}")


def test_a_killed_small_replica_is_ejected_and_comes_back_after_restart(
    cluster: LocalCluster,
) -> None:
    first, second = cluster.replicas["small"]
    api = openai.OpenAI(base_url=cluster.base_url, api_key="unused", max_retries=0, timeout=300)

    # The pools placement end to end: the classifier on `front` decides, `small` serves.
    raw = api.chat.completions.with_raw_response.create(
        model="auto",
        messages=[{"role": "user", "content": "Summarize: the cat sat on the mat all day."}],
        max_tokens=4,
    )
    assert raw.parse().model == "llm_small"
    assert raw.headers["x-route-intent"] in {"completion", "summarization", "question_answering"}
    assert raw.headers["x-route-reason"] in {"table", "low_confidence"}
    assert len(api.embeddings.create(model="embedding", input="hello").data[0].embedding) == 384

    # Both replicas serve a concurrent load (power_of_two picks the less busy of the two).
    before = [_served(first), _served(second)]
    steady = _load(cluster, 5, seed=1)
    assert steady.records and all(r.ok for r in steady.records), _errors(steady.records)
    assert _served(first) > before[0] and _served(second) > before[1]

    # SIGKILL the second replica while users keep streaming.
    killed_at: list[float] = []
    result: list[RunResult] = []
    origin = time.perf_counter()
    driver = threading.Thread(target=lambda: result.append(_load(cluster, 14, seed=2)))
    driver.start()
    time.sleep(4)
    killed_at.append(time.perf_counter() - origin)
    pid = cluster.kill("small", 1)
    assert pid and second.launcher.process is not None and second.launcher.process.poll() == -9
    driver.join(timeout=120)
    assert not driver.is_alive() and result
    records = result[0].records
    kill = killed_at[0]
    # Record start times are relative to the run's start, a little after `origin`: a
    # request counts as "started after the kill" with a margin of one second.
    after = [r for r in records if r.start > kill + 1.0]
    assert len(after) >= USERS, "the load did not go on after the kill"
    assert all(r.ok for r in after), _errors(after)
    failed = [r for r in records if not r.ok]
    # Only requests in flight at the kill may fail (at most one per user), and only those.
    assert len(failed) <= USERS, _errors(failed)
    assert all(r.start <= kill + 1.0 for r in failed), _errors(failed)

    # The gateway took it out of rotation and says why.
    _wait_for(
        lambda: cluster.healthy("small") == [first.grpc_url], 15, "the killed replica is ejected"
    )
    with urllib.request.urlopen(f"{cluster.gateway_url}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    ejections = f'gateway_ejections_total{{pool="small",replica="{second.grpc_url}"}} '
    found = [line for line in metrics.splitlines() if line.startswith(ejections)]
    assert found == [f"{ejections}1.0"], found
    assert 'gateway_pool_cost_per_million_tokens{pool="small"}' in metrics

    # Restart on the same ports: the static topology sees it come back and it serves again.
    cluster.restart("small", 1)
    assert cluster.replicas["small"][1].pid not in (None, pid)
    _wait_for(
        lambda: sorted(cluster.healthy("small")) == sorted([first.grpc_url, second.grpc_url]),
        30,
        "the restarted replica is back in rotation",
    )
    again = _load(cluster, 5, seed=3)
    assert again.records and all(r.ok for r in again.records), _errors(again.records)
    assert _served(cluster.replicas["small"][1]) > 0  # a fresh process: its own requests
    health = json.loads(urllib.request.urlopen(f"{cluster.gateway_url}/health/ready").read())
    assert health["ready"] is True and not health["pools"]["small"]["ejected"]


def _errors(records: list[RequestRecord]) -> str:
    return "; ".join(f"{r.start:.2f}s {r.error}: {r.error_message}" for r in records if not r.ok)
