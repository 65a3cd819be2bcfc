"""The gateway in front of the real stack, through the official ``openai`` SDK.

The session's gateway (``python -m gateway``, single placement, with an API key file;
tests/integration/conftest.py) fronts the session's Triton server. Text content from the CPU tiers is not asserted
(bfloat16 answers differ between CPUs); structure, routing, usage and errors are.
"""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import openai
import pytest

from gateway.config import DEFAULT_ROUTER_CONFIG, RoutingSettings
from gateway.tokenizer import load as load_tokenizer
from tests.integration.bad_inputs import KEY

TIERS = {"llm_small", "llm_medium", "llm_large"}
PROMPT = "What is the capital of France?"
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def client(gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway, api_key=KEY, max_retries=0, timeout=300)


def prompt_tokens(messages: list[dict[str, str]]) -> int:
    """The tiers' tokenizer count for a conversation (chat template applied)."""
    routing = RoutingSettings.from_file(DEFAULT_ROUTER_CONFIG)
    return len(load_tokenizer(None, routing.tokenizer_dir).encode_chat(messages))


def _post(url: str, data: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_whole_chat_with_auto_is_routed_and_counts_usage(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=messages, max_tokens=MAX_TOKENS
    )
    completion = raw.parse()
    assert completion.model in TIERS
    assert raw.headers["x-route-intent"] in {"completion", "summarization", "question_answering"}
    assert 0.0 <= float(raw.headers["x-route-confidence"]) <= 1.0
    assert raw.headers["x-route-tier"] == completion.model
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage.prompt_tokens == prompt_tokens(messages)
    assert 1 <= usage.completion_tokens <= MAX_TOKENS
    assert (choice.finish_reason == "length") == (usage.completion_tokens == MAX_TOKENS)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_chat_with_a_forced_tier_and_usage(client: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": PROMPT},
    ]
    stream = client.chat.completions.create(
        model="llama-3.1-8b-instruct",
        messages=messages,
        max_completion_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
        temperature=0.7,
        top_p=0.9,
        seed=7,
    )
    chunks = list(stream)
    assert all(c.model == "llm_small" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes in (["stop"], ["length"])
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.prompt_tokens == prompt_tokens(messages)
    assert 1 <= usage.completion_tokens <= MAX_TOKENS


def test_async_streamed_auto_chat_and_whole_completion(gateway: str) -> None:
    async def scenario() -> None:
        async with openai.AsyncOpenAI(base_url=gateway, api_key=KEY, max_retries=0) as aclient:
            stream = await aclient.chat.completions.create(
                model="auto",
                messages=[
                    {
                        "role": "user",
                        "content": "Summarize: the council approved 40 km of bike lanes.",
                    }
                ],
                max_tokens=MAX_TOKENS,
                stream=True,
            )
            chunks = [c async for c in stream]
            assert chunks and all(c.model in TIERS for c in chunks)
            assert chunks[-1].choices[0].finish_reason in ("stop", "length")
            text = await aclient.completions.create(
                model="llm_medium", prompt="Once upon a time", max_tokens=MAX_TOKENS
            )
            assert text.model == "llm_medium" and text.choices[0].finish_reason in (
                "stop",
                "length",
            )
            assert 1 <= text.usage.completion_tokens <= MAX_TOKENS

    asyncio.run(scenario())


def test_embeddings_float_and_base64(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model="embedding", input=["hello world", "goodbye"])
    assert [d.index for d in result.data] == [0, 1]
    vectors = np.array([d.embedding for d in result.data], dtype=np.float32)
    assert vectors.shape == (2, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    assert result.usage.prompt_tokens > 0
    raw = client.embeddings.with_raw_response.create(
        model="embedding", input="hello world", encoding_format="base64"
    )
    data = json.loads(raw.text)["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(data), dtype="<f4")
    assert np.allclose(decoded, vectors[0], atol=1e-5)


def test_model_list(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list().data}
    assert {"auto", "embedding", "llama-3.1-8b-instruct"} | TIERS <= ids


def test_every_error_has_its_status_and_the_gateway_stays_up(
    client: openai.OpenAI, gateway: str
) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    bad = openai.OpenAI(base_url=gateway, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="auto", messages=messages)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=messages)
    assert missing.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as two:
        client.chat.completions.create(model="auto", messages=messages, n=2)
    assert two.value.body["param"] == "n"
    with pytest.raises(openai.APIStatusError) as large:
        client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "x" * 70000}]
        )
    assert large.value.status_code == 413
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    status, body = _post(f"{gateway}/chat/completions", b'{"model": "auto", "messages": [', headers)
    assert status == 400 and body["error"]["code"] == "invalid_json"
    done = client.chat.completions.create(model="llm_small", messages=messages, max_tokens=2)
    assert done.choices[0].finish_reason in ("stop", "length")


def test_health_and_metrics(gateway: str) -> None:
    root = gateway[: -len("/v1")]
    with urllib.request.urlopen(f"{root}/health/ready", timeout=10) as response:
        assert json.loads(response.read())["ready"] is True
    with urllib.request.urlopen(f"{root}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert "gateway_requests_total" in text and "gateway_ttft_seconds_bucket" in text
    assert 'gateway_replica_healthy{pool="local"' in text


def test_request_id_reaches_triton(client: openai.OpenAI, tmp_path: Path) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="llm_small",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=2,
        extra_headers={"x-request-id": "trace-me-42"},
    )
    assert raw.headers["x-request-id"] == "trace-me-42"
