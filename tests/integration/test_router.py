"""The router through the real server: gRPC streaming and HTTP generate_stream.

Each prompt must land on the tier the committed policy names for its intent; the
overrides, the fallback for an unloaded tier, cancellation, bad input and the custom
metrics are checked on the same server. Outputs stay short (SmolLM2 on 2 CPU cores).
"""

from __future__ import annotations

import json
import queue
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from serving.params import Params
from serving.repository import parse_config
from serving.routing import RoutingPolicy
from tests.integration.conftest import post_json

ROOT = Path(__file__).resolve().parents[2]
SUMMARY = (
    "Summarize the following text in one sentence: The city council met on Tuesday and "
    "voted to expand the bike lane network by 40 km over the next three years, citing "
    "safety data collected since 2019."
)
QUESTION = "What is the capital of France?"
STORY = "Write a short story about a dragon who learns to bake bread."
PROMPTS = [(SUMMARY, "summarization"), (QUESTION, "question_answering"), (STORY, "completion")]


@pytest.fixture(scope="module")
def policy(server: Any) -> RoutingPolicy:
    """The committed policy, once every model the router calls is steadily ready.

    Routing to the right tier needs every tier up: wait (bounded) until all of them
    answer ready for several seconds in a row, so a model still settling after start
    shows up as a clear error here rather than as a fallback in some test.
    """
    config = parse_config(ROOT / "model_repository" / "router" / "config.pbtxt")
    raw = {
        "parameters": {k: {"string_value": v.string_value} for k, v in config.parameters.items()}
    }
    policy = RoutingPolicy.from_params(Params(raw, "router"))
    models = ["router", "intent_classifier", "preprocessing", *policy.tiers]
    steady, deadline = 0, time.monotonic() + 600
    while steady < 5:
        if time.monotonic() > deadline:
            pytest.fail(f"models {models} did not stay ready; server log:\n{server.log_tail()}")
        steady = steady + 1 if all(model_ready(server, m) for m in models) else 0
        time.sleep(1)
    return policy


def model_ready(server: Any, model: str) -> bool:
    try:
        url = f"http://{server.http_url}/v2/models/{model}/ready"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status == 200
    except urllib.error.URLError:
        return False


@dataclass
class Chunk:
    text: str
    intent: str
    model: str
    confidence: float
    num_input_tokens: int
    num_output_tokens: int


class StreamError(Exception):
    pass


def _first(result: Any, name: str) -> Any:
    value = result.as_numpy(name).reshape(-1)[0]
    return value.decode() if isinstance(value, bytes) else value.item()


def grpc_stream(
    server: Any,
    text: str | bytes,
    cancel_after: int | None = None,
    **options: Any,
) -> list[Chunk]:
    """Send one request to ``router`` over a gRPC stream and collect its responses."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    raw = text if isinstance(text, bytes) else text.encode()
    arrays = {"text_input": np.array([[raw]], dtype=np.object_)}
    for name, value in options.items():
        if name in ("intent", "model"):
            arrays[name] = np.array([[value.encode()]], dtype=np.object_)
        elif name == "max_tokens":
            arrays[name] = np.array([[value]], dtype=np.int32)
        elif name == "stream":
            arrays[name] = np.array([[value]], dtype=np.bool_)
    inputs = []
    for name, array in arrays.items():
        dtype = {np.object_: "BYTES", np.int32: "INT32", np.bool_: "BOOL"}[array.dtype.type]
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    chunks: list[Chunk] = []
    try:
        client.async_stream_infer("router", inputs, enable_empty_final_response=True)
        while True:
            result, error = responses.get(timeout=300)
            if error is not None:
                raise StreamError(f"{error.status()}: {error.message()}")
            if result.as_numpy("text_output") is not None:
                chunks.append(
                    Chunk(
                        *(_first(result, n) for n in ("text_output", "intent", "model")),
                        *(
                            _first(result, n)
                            for n in ("confidence", "num_input_tokens", "num_output_tokens")
                        ),
                    )
                )
            if cancel_after is not None and len(chunks) >= cancel_after:
                client.stop_stream(cancel_requests=True)
                return chunks
            if result.get_response().parameters["triton_final_response"].bool_param:
                return chunks
    finally:
        client.stop_stream()
        client.close()


def sse_events(body: str) -> Iterator[dict]:
    for line in body.splitlines():
        if line.startswith("data: "):
            yield json.loads(line[len("data: ") :])


def metrics(server: Any) -> dict[tuple[str, frozenset], float]:
    """The metrics port's samples: (name, labels) -> value."""
    with urllib.request.urlopen(server.metrics_url, timeout=30) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if match:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            samples[(match.group(1), labels)] = float(match.group(3))
    return samples


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.mark.parametrize(("prompt", "intent"), PROMPTS, ids=[p[1] for p in PROMPTS])
def test_grpc_stream_lands_on_the_policy_tier(
    server: Any, policy: RoutingPolicy, prompt: str, intent: str
) -> None:
    chunks = grpc_stream(server, prompt, max_tokens=8, stream=True)
    assert chunks, "no response"
    assert {(c.intent, c.model) for c in chunks} == {(intent, policy.table[intent])}
    assert all(c.confidence >= policy.confidence_threshold for c in chunks)
    assert "".join(c.text for c in chunks).strip()
    assert 1 <= chunks[-1].num_output_tokens <= 8  # fewer when the answer ends first
    assert chunks[-1].num_input_tokens > 5


@pytest.mark.parametrize(("prompt", "intent"), PROMPTS, ids=[p[1] for p in PROMPTS])
def test_http_generate_stream_lands_on_the_policy_tier(
    server: Any, policy: RoutingPolicy, prompt: str, intent: str
) -> None:
    status, body = post_json(
        server,
        "/v2/models/router/generate_stream",
        {"text_input": prompt, "max_tokens": 6, "stream": True},
    )
    assert status == 200, body
    events = list(sse_events(body))
    assert len(events) > 1, "the answer should stream in several events"
    assert {(e["intent"], e["model"]) for e in events} == {(intent, policy.table[intent])}
    assert "".join(e["text_output"] for e in events).strip()


def test_stream_concatenation_equals_the_whole_text(server: Any, policy: RoutingPolicy) -> None:
    streamed = grpc_stream(server, QUESTION, max_tokens=10, stream=True)
    (whole,) = grpc_stream(server, QUESTION, max_tokens=10, stream=False)
    assert "".join(c.text for c in streamed) == whole.text
    assert "Paris" in whole.text


def test_intent_override_skips_the_classifier(server: Any, policy: RoutingPolicy) -> None:
    status, body = post_json(
        server,
        "/v2/models/router/generate",
        {"text_input": QUESTION, "max_tokens": 4, "intent": "summarization"},
    )
    assert status == 200, body
    answer = json.loads(body)
    assert answer["intent"] == "summarization"
    assert answer["model"] == policy.table["summarization"]
    assert answer["confidence"] == 1.0


def test_model_override_forces_the_tier(server: Any, policy: RoutingPolicy) -> None:
    chunks = grpc_stream(server, QUESTION, max_tokens=4, model="llm_small", stream=True)
    assert {(c.intent, c.model) for c in chunks} == {("question_answering", "llm_small")}


def test_unloaded_tier_falls_back_and_metrics_count_it(server: Any, policy: RoutingPolicy) -> None:
    chosen = policy.table["question_answering"]
    fallback = policy.chain(chosen)[1]
    before = metrics(server)
    server.unload(chosen)
    try:
        chunks = grpc_stream(server, QUESTION, max_tokens=4, stream=True)
        status, body = post_json(
            server, "/v2/models/router/generate", {"text_input": QUESTION, "max_tokens": 4}
        )
    finally:
        server.load(chosen)
    assert {c.model for c in chunks} == {fallback}
    assert status == 200 and json.loads(body)["model"] == fallback
    after = metrics(server)
    labels = {"from_tier": chosen, "to_tier": fallback}
    assert (
        sample(after, "router_fallbacks_total", **labels)
        - sample(before, "router_fallbacks_total", **labels)
        == 2
    )
    served = {"intent": "question_answering", "tier": fallback, "reason": "table"}
    assert (
        sample(after, "router_requests_total", **served)
        - sample(before, "router_requests_total", **served)
        == 2
    )
    # and the tier serves again once it is back
    assert {c.model for c in grpc_stream(server, QUESTION, max_tokens=2)} == {chosen}


def test_metrics_sit_next_to_tritons_own(server: Any, policy: RoutingPolicy) -> None:
    before = metrics(server)
    grpc_stream(server, STORY, max_tokens=3, stream=True)
    grpc_stream(server, STORY, max_tokens=3, intent="completion")
    after = metrics(server)
    assert sample(after, "nv_inference_request_success", model="router", version="1") > 0
    table = {"intent": "completion", "tier": "llm_medium", "reason": "table"}
    override = {"intent": "completion", "tier": "llm_medium", "reason": "intent_override"}
    for labels in (table, override):
        delta = sample(after, "router_requests_total", **labels) - sample(
            before, "router_requests_total", **labels
        )
        assert delta == 1, labels
    latency = {"model": "intent_classifier"}
    count = sample(after, "router_classifier_latency_us_count", **latency) - sample(
        before, "router_classifier_latency_us_count", **latency
    )
    assert count == 1  # the intent override skipped the second classification
    assert sample(after, "router_classifier_latency_us_sum", **latency) > 0


def test_cancelled_stream_stops_the_tier(server: Any, policy: RoutingPolicy) -> None:
    before = metrics(server)
    chunks = grpc_stream(server, STORY, cancel_after=2, max_tokens=200, stream=True)
    assert len(chunks) == 2
    # The router notices at the tier's next token and asks the tier to stop; poll for it
    # (bounded) rather than assume how long a token takes on a busy machine.
    for _ in range(120):
        after = metrics(server)
        delta = sample(after, "router_cancellations_total", tier="llm_medium") - sample(
            before, "router_cancellations_total", tier="llm_medium"
        )
        if delta:
            break
        time.sleep(0.5)
    assert delta == 1
    # The tier really stopped: its engine's active sequences return to zero (bounded poll)
    # instead of generating the remaining ~198 tokens for nobody.
    for _ in range(120):
        active = sample(metrics(server), "llm_engine_sequences", model="llm_medium", state="active")
        if active == 0:
            break
        time.sleep(0.5)
    assert active == 0
    assert grpc_stream(server, STORY, max_tokens=2)[-1].num_output_tokens == 2
