"""The LLM tiers, pre/postprocessing and tier ensembles through the real server."""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.error
import urllib.request
from functools import partial

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from serving.launcher import TritonLauncher
from tests.integration.conftest import grpc_input, grpc_stream, post_json, stream_outputs

TIMEOUT = 300
QUESTION = "What is the capital of France?"
TIERS = ("llm_small", "llm_medium", "llm_large")


def _text_inputs(text: str, max_tokens: int, stream: bool) -> list[grpcclient.InferInput]:
    values = {
        "text_input": np.array([[text.encode()]], dtype=np.object_),
        "max_tokens": np.array([[max_tokens]], dtype=np.int32),
        "temperature": np.array([[0.0]], dtype=np.float32),
        "stream": np.array([[stream]], dtype=np.bool_),
    }
    return [grpc_input(name, array) for name, array in values.items()]


def _tier_inputs(ids: list[int], output_len: int, stream: bool, **extra: np.ndarray) -> list:
    values = {
        "input_ids": np.array([ids], dtype=np.int32),
        "input_lengths": np.array([[len(ids)]], dtype=np.int32),
        "request_output_len": np.array([[output_len]], dtype=np.int32),
        "streaming": np.array([[stream]], dtype=np.bool_),
        **extra,
    }
    return [grpc_input(name, array) for name, array in values.items()]


def _stream_text(server: TritonLauncher, model: str, text: str, max_tokens: int, stream: bool):
    with grpc_stream(server) as (client, results):
        client.async_stream_infer(
            model, _text_inputs(text, max_tokens, stream), enable_empty_final_response=True
        )
        chunks = [a.reshape(-1)[0] for a in stream_outputs(results, "text_output")]
    return [c.decode("utf-8") for c in chunks]  # strict: a split character fails here


@pytest.mark.parametrize("tier", TIERS)
def test_each_tier_ensemble_answers_paris(server: TritonLauncher, tier: str) -> None:
    chunks = _stream_text(server, f"{tier}_text", QUESTION, 32, stream=True)
    assert len(chunks) > 1
    assert "Paris" in "".join(chunks)


@pytest.mark.parametrize(
    "prompt",
    [
        QUESTION,
        "Write the French word for coffee, then a coffee emoji.",  # accents, emoji
        "Translate 'hello world' into Chinese.",  # CJK
    ],
)
def test_grpc_stream_concatenates_to_the_non_streamed_text(
    server: TritonLauncher, prompt: str
) -> None:
    streamed = _stream_text(server, "llm_small_text", prompt, 48, stream=True)
    (whole,) = _stream_text(server, "llm_small_text", prompt, 48, stream=False)
    assert "".join(streamed) == whole
    assert whole.strip()


def test_http_generate_and_generate_stream(server: TritonLauncher) -> None:
    body = {"text_input": QUESTION, "max_tokens": 32, "temperature": 0.0}
    status, text = post_json(server, "/v2/models/llm_small_text/generate", body)
    assert status == 200, text
    whole = json.loads(text)["text_output"]
    assert "Paris" in whole

    status, text = post_json(
        server, "/v2/models/llm_small_text/generate_stream", {**body, "stream": True}
    )
    assert status == 200, text
    events = [json.loads(line[len("data: ") :]) for line in text.splitlines() if line]
    assert len(events) > 1
    assert "".join(e["text_output"] for e in events) == whole


def test_eight_concurrent_streams_complete(server: TritonLauncher) -> None:
    prompts = [f"Give me fact number {i} about the ocean." for i in range(8)]
    texts: dict[int, str] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            texts[i] = "".join(_stream_text(server, "llm_medium_text", prompts[i], 24, True))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=partial(run, i)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert errors == []
    assert sorted(texts) == list(range(8))
    assert all(t.strip() for t in texts.values())


def _metric(server: TritonLauncher, name: str, **labels: str) -> float:
    """The value of ``name``'s series with these labels on the metrics page (0 if none)."""
    with urllib.request.urlopen(server.metrics_url, timeout=30) as r:
        metrics = r.read().decode()
    for line in metrics.splitlines():
        matches = all(f'{key}="{value}"' in line for key, value in labels.items())
        if line.startswith(f"{name}{{") and matches:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _active_sequences(server: TritonLauncher, model: str) -> float:
    return _metric(server, "llm_engine_sequences", model=model, state="active")


def test_a_repeated_prompt_reuses_its_kv_cache(server: TritonLauncher) -> None:
    """The same chat prompt twice: the second prefill copies all but its last token from
    the first one's KV cache (``llm_engine_prompt_tokens{source="reused"}``), and the
    answer is the same."""
    counter = "llm_engine_prompt_tokens"

    def counts() -> tuple[float, float]:
        return tuple(
            _metric(server, counter, model="llm_small", source=source)
            for source in ("computed", "reused")
        )

    computed, reused = counts()
    answers = [_stream_text(server, "llm_small_text", QUESTION, 8, False) for _ in range(2)]
    assert answers[0] == answers[1] and "".join(answers[0]).strip()
    computed_after, reused_after = counts()
    assert computed_after - computed >= 2  # each request computes at least its last token
    assert reused_after - reused >= 16  # at least the chat template's system prompt


def _wait_for(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_cancelled_stream_frees_its_slot_for_the_next(server: TritonLauncher) -> None:
    model = "llm_large"
    # end_id -1 never matches: only the cancellation can end this 500-token request.
    long = _tier_inputs([1, 4093, 198], 500, True, end_id=np.array([[-1]], dtype=np.int32))
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(model, long)
        for _ in range(3):
            _, error = results.get(timeout=TIMEOUT)
            assert error is None, error
        assert _active_sequences(server, model) == 1
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    assert _wait_for(lambda: _active_sequences(server, model) == 0)
    # The freed slot serves the next request.
    with grpc_stream(server) as (client, results):
        client.async_stream_infer(model, _tier_inputs([1, 4093, 198], 4, True))
        chunks = stream_outputs(results, "output_ids")
    assert sum(c.size for c in chunks) == 4
