"""The OpenAI load adapter over a fake endpoint (httpx's MockTransport): records and outcomes."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai

from client.loadgen import LoadShape, run
from client.metrics import measure, summarize
from client.openai_load import Api, openai_stream
from client.workload import Job


def _sse(*events: object) -> bytes:
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


def _event(kind: str, choices: list[dict], usage: dict | None = None) -> dict:
    event = {"id": "c", "object": kind, "created": 0, "model": "llm_small", "choices": choices}
    return event if usage is None else {**event, "usage": usage}


def _completion(text: str) -> dict:
    return _event("text_completion", [{"index": 0, "text": text, "finish_reason": None}])


def _chat(text: str) -> dict:
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
    return _event("chat.completion.chunk", [choice])


def _usage(completion_tokens: int, kind: str = "text_completion") -> dict:
    usage = {
        "prompt_tokens": 3,
        "completion_tokens": completion_tokens,
        "total_tokens": 3 + completion_tokens,
    }
    return _event(kind, [], usage)


def _api(handler: object) -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))  # type: ignore[arg-type]
    return openai.AsyncOpenAI(base_url="http://gw/v1", api_key="k", max_retries=0, http_client=http)


def _record(handler: object, endpoint: Api = Api.COMPLETIONS, max_tokens: int | None = 4):
    async def go():
        api = _api(handler)
        try:
            stream = openai_stream(api, Job("hi", max_tokens), model="llm_small", endpoint=endpoint)
            return await measure(stream, time.perf_counter(), time.perf_counter())
        finally:
            await api.close()

    return asyncio.run(go())


def test_a_stream_records_each_delta_and_the_usage_count() -> None:
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        body = _sse(_completion("Hel"), _completion("lo"), _completion(""), _usage(3))
        headers = {"content-type": "text/event-stream", "x-route-replica": "127.0.0.1:9001"}
        return httpx.Response(200, content=body, headers=headers)

    record = _record(handler)
    assert record.ok and record.model == "llm_small"
    assert record.replica == "127.0.0.1:9001"  # the gateway's header, kept per request
    assert len(record.token_times) == 2  # two text deltas arrived
    assert record.output_tokens == 3  # the server's usage wins
    assert record.ttft is not None and record.ttft <= record.e2e
    assert seen[0]["stream"] is True and seen[0]["max_tokens"] == 4
    assert seen[0]["stream_options"] == {"include_usage": True}
    assert seen[0]["temperature"] == 0.0


def test_chat_streams_read_the_delta_content() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/chat/completions"
        assert json.loads(request.content)["messages"] == [{"role": "user", "content": "hi"}]
        body = _sse(_chat("a"), _chat("b"), _chat("c"), _usage(3, "chat.completion.chunk"))
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    record = _record(handler, Api.CHAT)
    assert record.ok and len(record.token_times) == 3 and record.output_tokens == 3


def test_an_http_error_before_the_stream_is_its_status() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        error = {"message": "pool 'small' has no healthy replica", "code": "no_healthy_replica"}
        return httpx.Response(503, json={"error": error})

    record = _record(handler)
    assert record.error == "unavailable"
    assert record.error_message == "HTTP 503: pool 'small' has no healthy replica"
    assert record.token_times == []


def test_an_error_event_mid_stream_keeps_its_text_and_the_tokens_before_it() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        error = {"error": {"message": "upstream failed: Socket closed", "type": "server_error"}}
        body = _sse(_completion("a"), _completion("b"), error)
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    record = _record(handler)
    assert record.error == "server_error"
    assert record.error_message == "stream error event: upstream failed: Socket closed"
    assert len(record.token_times) == 2


def test_no_connection_is_unavailable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    record = _record(handler)
    assert record.error == "unavailable" and "cannot connect" in (record.error_message or "")


def test_the_project_runner_drives_it_closed_loop_and_summarizes() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        n = json.loads(request.content)["max_tokens"]
        body = _sse(*[_completion("x") for _ in range(n)], _usage(n))
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    async def go():
        api = _api(handler)
        try:
            jobs = iter([Job("p", 2), Job("p", 5)] * 10)
            return await run(
                lambda job: openai_stream(api, job, model="llm_small"),
                jobs,
                LoadShape(users=3, requests=12),
            )
        finally:
            await api.close()

    result = asyncio.run(go())
    summary = summarize(result.records, result.wall_time)
    assert summary["requests"] == 12 and summary["succeeded"] == 12
    assert sorted({r.output_tokens for r in result.records}) == [2, 5]
