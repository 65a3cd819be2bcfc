"""Property-based fuzzing of the gateway's request handling (hypothesis), in process over
the fake upstream (tests/unit/gateway_fakes.py).

- Arbitrary JSON-ish bodies, near-valid bodies with one field of any type, and raw bytes
  to every endpoint never give a 5xx; every 4xx has OpenAI's error body.
- Valid requests, generated from what docs/gateway.md says is accepted, get a 200.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import create_app
from gateway.service import AUTO
from tests.unit.gateway_fakes import ROUTING, FakeTriton, make_gateway

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
MODELS = (AUTO, *ROUTING.policy.tiers, "llama-3.1-8b-instruct")
INTENTS = ("completion", "summarization", "question_answering")
FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
VALID = settings(max_examples=40, deadline=None, database=None)


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    server = FakeTriton(answer="one two three")
    with TestClient(create_app(make_gateway({"fake:1": server}), max_body_bytes=1 << 16)) as c:
        yield c


# ------------------------------------------------------------------ strategies
# Text includes lone surrogates: JSON can escape them ("\\ud800"), no tokenizer can encode them.
characters = st.characters() | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(characters, max_size=30)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = (
    "model",
    "messages",
    "prompt",
    "input",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "intent",
    "priority",
    "encoding_format",
    "tools",
    "logprobs",
)
GOOD = {
    "model": "llm_small",
    "messages": [{"role": "user", "content": "Hello there"}],
    "prompt": "Hello there",
    "input": "Hello there",
    "max_tokens": 2,
}


@st.composite
def near_valid(draw: st.DrawFn) -> dict[str, Any]:
    """A good body with a few fields replaced by anything (the likeliest real mistakes)."""
    body = dict(GOOD)
    for name in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True)):
        body[name] = draw(json_values)
    if draw(st.booleans()):
        body["model"] = draw(st.sampled_from((*MODELS, "embedding", "gpt-4o")))
    return body


def encode(value: Any) -> bytes:
    # NaN and Infinity come out as Python's non-standard literals: bad JSON on purpose.
    return json.dumps(value).encode()


# What the standard library's JSON reader chokes on: deep nesting, numbers too long.
pathological = st.integers(1000, 20000).map(lambda n: b"[" * n) | st.integers(4400, 6000).map(
    lambda n: b'{"model": "auto", "max_tokens": 1' + b"0" * n + b"}"
)
bodies = (
    json_values.map(encode)
    | pathological
    | near_valid().map(encode)
    | st.binary(max_size=200)
    | near_valid().map(lambda b: encode(b)[: len(encode(b)) // 2])  # truncated
)


def assert_openai_error(response: Any) -> None:
    assert response.status_code < 500, (response.status_code, response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert error["type"] == "invalid_request_error"
        assert set(error) == {"message", "type", "param", "code"}
        assert error["param"] is None or isinstance(error["param"], str)


# ------------------------------------------------------------------ properties
@FUZZ
@given(route=st.sampled_from(ROUTES), body=bodies)
def test_any_body_is_answered_without_a_5xx_and_errors_have_openais_shape(
    client: TestClient, route: str, body: bytes
) -> None:
    response = client.post(route, content=body)
    assert_openai_error(response)


texts = st.text(min_size=1, max_size=80).filter(lambda t: t.strip())
options = st.fixed_dictionaries(
    {},
    optional={
        "max_tokens": st.integers(1, 64),
        "temperature": st.floats(0.0, 2.0),
        "top_p": st.floats(0.01, 1.0),
        "seed": st.integers(0, 2**64 - 1),
        "stop": st.lists(st.text(min_size=1, max_size=8), max_size=4),
        "n": st.just(1),
        "user": st.text(max_size=10),
        "priority": st.sampled_from(("interactive", "batch")),
    },
)


@st.composite
def valid_generation(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    body = draw(options)
    body["model"] = draw(st.sampled_from(MODELS))
    if body["model"] == AUTO and draw(st.booleans()):
        body["intent"] = draw(st.sampled_from(INTENTS))
    if draw(st.booleans()):
        body["stream"] = True
        if draw(st.booleans()):
            body["stream_options"] = {"include_usage": draw(st.booleans())}
    if draw(st.booleans()):
        roles = st.sampled_from(("system", "developer", "assistant", "user"))
        history = draw(
            st.lists(st.fixed_dictionaries({"role": roles, "content": texts}), max_size=3)
        )
        body["messages"] = [*history, {"role": "user", "content": draw(texts)}]
        return "/v1/chat/completions", body
    body["prompt"] = draw(texts)
    return "/v1/completions", body


@VALID
@given(request=valid_generation())
def test_valid_generated_requests_are_accepted(
    client: TestClient, request: tuple[str, dict[str, Any]]
) -> None:
    route, body = request
    response = client.post(route, json=body)
    assert response.status_code == 200, (body, response.text)
    if body.get("stream"):
        assert response.text.rstrip().endswith("data: [DONE]")
        assert '"error"' not in response.text
    else:
        assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")


@VALID
@given(inputs=texts | st.lists(texts, min_size=1, max_size=4))
def test_valid_embedding_requests_are_accepted(client: TestClient, inputs: Any) -> None:
    response = client.post("/v1/embeddings", json={"model": "embedding", "input": inputs})
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == (1 if isinstance(inputs, str) else len(inputs))
