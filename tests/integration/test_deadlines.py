"""A tier that accepts a request and never answers, behind the real router and server.

``tests/fixtures/hung_repo``: the router's own model.py with 2 s deadlines, in front of
``llm_small`` (holds every request until it is stopped) and ``llm_medium`` (answers).
The request costs a timeout and a fallback, the hung tier is stopped by the request's
own id, and the router keeps serving: no worker is lost.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from serving.launcher import LaunchOptions, TritonLauncher
from tests.conftest import eventually
from tests.integration.test_router import StreamError, grpc_stream, metrics, sample

HUNG_REPO = Path(__file__).resolve().parents[1] / "fixtures" / "hung_repo"
PROMPT = "Summarize this: the meeting moved to Tuesday."


@pytest.fixture(scope="module")
def hung(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonLauncher]:
    log_path = tmp_path_factory.mktemp("hung") / "server.log"
    launcher = TritonLauncher(
        LaunchOptions.on_free_ports(repository=HUNG_REPO, log_path=log_path, ready_timeout=300)
    )
    launcher.start()
    try:
        yield launcher
    finally:
        launcher.stop()


def test_hung_tier_times_out_falls_back_and_is_stopped(hung: TritonLauncher) -> None:
    before = metrics(hung)
    chunks = grpc_stream(hung, PROMPT, intent="summarization", max_tokens=4, stream=True)
    assert {c.model for c in chunks} == {"llm_medium"}  # the fallback answered
    assert chunks[-1].num_output_tokens == 4  # every token the fake tier sent
    after = metrics(hung)

    def delta(name: str, **labels: str) -> float:
        return sample(metrics(hung), name, **labels) - sample(before, name, **labels)

    fallback = {"from_tier": "llm_small", "to_tier": "llm_medium"}
    assert (
        sample(after, "router_fallbacks_total", **fallback)
        - sample(before, "router_fallbacks_total", **fallback)
        == 1
    )
    assert delta("bls_timeouts_total", model="llm_small", phase="first_response") == 1
    # The stop named the held request (same id) and ended it: nothing is left hanging.
    stops = {"model": "llm_small", "matched": "true"}
    assert eventually(lambda: delta("fixture_tier_stops_total", **stops) == 1, 60)
    held = {"model": "llm_small"}
    assert eventually(lambda: sample(metrics(hung), "fixture_tier_held_requests", **held) == 0, 60)
    assert eventually(lambda: sample(metrics(hung), "bls_abandoned_calls", **held) == 0, 60)


def test_forced_hung_tier_is_a_clear_unavailable_and_the_router_serves_on(
    hung: TritonLauncher,
) -> None:
    with pytest.raises(StreamError, match="llm_small: timed out: no first response within 2s"):
        grpc_stream(hung, PROMPT, intent="summarization", model="llm_small", max_tokens=4)
    # More requests than the router has workers (2): none of them was lost to the hang.
    for _ in range(3):
        chunks = grpc_stream(hung, PROMPT, intent="completion", max_tokens=2, stream=True)
        assert {c.model for c in chunks} == {"llm_medium"}
        assert chunks[-1].num_output_tokens == 2
