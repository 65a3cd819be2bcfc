"""The gateway over HTTP, in process, against fake Triton servers (tests/unit/gateway_fakes.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from client.errors import ServerError
from client.transport import Tensors
from gateway.app import create_app
from gateway.config import Topology
from tests.unit.gateway_fakes import ROUTING, FakeTriton, key_store, make_gateway, tokenizer

CHAT = {
    "model": "auto",
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
}


def _client(
    servers: dict[str, FakeTriton], topology: Topology | None = None, keys=None, **kw
) -> TestClient:
    max_body = kw.pop("max_body_bytes", 1 << 20)
    return TestClient(
        create_app(make_gateway(servers, topology, **kw), keys, max_body_bytes=max_body)
    )


def _events(text: str) -> list[object]:
    out: list[object] = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_single_placement_auto_goes_to_the_router_and_reports_the_route() -> None:
    server = FakeTriton()
    with _client({"fake:1": server}) as c:
        r = c.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "llm_large" and body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == server.answer
    assert r.headers["x-route-intent"] == "question_answering"
    assert float(r.headers["x-route-confidence"]) == 0.9
    prompt = tokenizer().encode_chat(CHAT["messages"])
    assert body["usage"]["prompt_tokens"] == len(prompt)
    assert body["usage"]["completion_tokens"] == len(tokenizer().encode(server.answer))
    model, _, request_id = server.calls[0]
    assert model == "router" and request_id == r.headers["x-request-id"]


def test_forced_tier_streams_with_usage_stop_and_done() -> None:
    server = FakeTriton(answer="one two three four")
    body = {
        **CHAT,
        "model": "llama-3.1-8b-instruct",
        "stream": True,
        "stream_options": {"include_usage": True},
        "stop": [" three"],
        "seed": 1,
        "top_p": 0.5,
    }
    with _client({"fake:1": server}) as c:
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in chunks)
    assert text == "one two" and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(e["model"] == "llm_small" for e in chunks)
    usage = events[-2]["usage"]
    assert usage["prompt_tokens"] == len(tokenizer().encode_chat(CHAT["messages"]))
    model, inputs, _ = server.calls[0]
    assert model == "llm_small"
    assert inputs["seed"].dtype == np.uint64 and float(inputs["runtime_top_p"][0]) == 0.5
    assert server.cancelled == 1  # the stop sequence ended the upstream request


def test_length_finish_and_text_completions() -> None:
    server = FakeTriton(answer="a b c d e f g")
    with _client({"fake:1": server}) as c:
        r = c.post("/v1/completions", json={"model": "llm_medium", "prompt": "x", "max_tokens": 2})
    body = r.json()
    assert body["object"] == "text_completion" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2


def test_multi_message_auto_is_routed_by_the_gateway_with_the_policy() -> None:
    server = FakeTriton(intent="summarization", confidence=0.95)
    messages = [
        {"role": "system", "content": "Be short."},
        {"role": "user", "content": "Summarize: the council voted for bike lanes."},
    ]
    with _client({"fake:1": server}) as c:
        r = c.post("/v1/chat/completions", json={"model": "auto", "messages": messages})
    assert r.status_code == 200
    assert [call[0] for call in server.calls] == ["intent_classifier", "llm_small"]
    assert r.json()["model"] == "llm_small" and r.headers["x-route-reason"] == "table"
    # a forced intent skips the classifier
    server.calls.clear()
    with _client({"fake:1": server}) as c:
        r = c.post(
            "/v1/chat/completions",
            json={"model": "auto", "messages": messages, "intent": "completion"},
        )
    assert [call[0] for call in server.calls] == ["llm_medium"]
    assert (
        r.headers["x-route-intent"] == "completion"
        and r.headers["x-route-reason"] == "intent_override"
    )


def test_errors_have_the_openai_body_and_status(tmp_path: Path) -> None:
    keys, key = key_store(tmp_path)
    server = FakeTriton()
    auth = {"Authorization": f"Bearer {key}"}
    with _client({"fake:1": server}, keys=keys, max_body_bytes=2000) as c:
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 401
        assert (
            c.post(
                "/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer x"}
            ).status_code
            == 401
        )
        cases = [
            ({**CHAT, "model": "gpt-9"}, 404, "model"),
            ({**CHAT, "n": 2}, 400, "n"),
            ({**CHAT, "max_tokens": 100000}, 400, "max_tokens"),
            ({**CHAT, "intent": "poetry"}, 400, "intent"),
            ({**CHAT, "model": "embedding"}, 400, "model"),
        ]
        for body, status, param in cases:
            r = c.post("/v1/chat/completions", json=body, headers=auth)
            assert r.status_code == status, (body, r.text)
            assert r.json()["error"]["param"] == param
        r = c.post("/v1/chat/completions", content=b"{oops", headers=auth)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
        assert c.post("/v1/chat/completions", json=big, headers=auth).status_code == 413
        r = c.post(
            "/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers={**auth, "x-priority": "vip"},
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "x-priority"
        assert c.get("/v1/nothing", headers=auth).json()["error"]["code"] == "not_found"
        assert (
            c.post("/v1/chat/completions", json=CHAT, headers=auth).status_code == 200
        )  # still up


def test_stream_metrics_are_inter_token_per_request_and_inter_chunk_per_gap() -> None:
    """Named as aiperf names them: one inter-token value per streamed request, one
    inter-chunk value per gap between chunks."""
    server = FakeTriton(answer="one two three four five")
    with _client({"fake:1": server}) as c:
        r = c.post(
            "/v1/completions", json={"model": "llm_small", "prompt": "Count", "stream": True}
        )
        assert r.status_code == 200
        chunks = [e for e in _events(r.text)[:-1] if e["choices"][0]["text"]]
        text = c.get("/metrics").text
    counts = {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.endswith("_count") and s.labels.get("model") == "llm_small"
    }
    assert len(chunks) > 2
    assert counts["gateway_inter_token_seconds_count"] == 1
    assert counts["gateway_inter_chunk_seconds_count"] == len(chunks) - 1


def test_context_length_is_checked_before_any_server_works() -> None:
    server = FakeTriton()
    long_prompt = "word " * 1100
    with _client({"fake:1": server}) as c:
        r = c.post("/v1/completions", json={"model": "llm_small", "prompt": long_prompt})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert server.calls == []


def test_an_error_after_the_stream_started_is_one_event_then_done() -> None:
    class Breaks(FakeTriton):
        async def stream_tensors(
            self, model: str, inputs: Tensors, request_id: str = ""
        ) -> AsyncIterator[Tensors]:
            ids = tokenizer().encode("Hello there")
            yield {"output_ids": np.array([[[ids[0]]]], dtype=np.int32)}
            raise ServerError("Stub process 'llm_small_0_0' is not healthy")

    with _client({"fake:1": Breaks()}) as c:
        r = c.post("/v1/chat/completions", json={**CHAT, "model": "llm_small", "stream": True})
    events = _events(r.text)
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert "error" in events[-2] and "not healthy" in events[-2]["error"]["message"]


def test_no_healthy_replica_is_503_and_health_fails() -> None:
    server = FakeTriton(down=True)
    with _client({"fake:1": server}) as c:
        r = c.post("/v1/chat/completions", json={**CHAT, "model": "llm_small"})
        assert r.status_code == 503 and "Retry-After" in r.headers
        assert c.get("/health/ready").status_code == 503
        assert c.get("/health/live").status_code == 200


def test_pools_follow_the_policy_fallback_when_a_tier_pool_is_down(tmp_path: Path) -> None:
    servers = {
        "front:1": FakeTriton("front:1"),
        "big:1": FakeTriton("big:1", down=True),
        "rest-a:1": FakeTriton("rest-a:1"),
        "rest-b:1": FakeTriton("rest-b:1"),
    }
    topo = Topology.from_dict(
        {
            "pools": [
                {
                    "name": "front",
                    "models": ["intent_classifier", "embedding"],
                    "replicas": ["front:1"],
                },
                {"name": "big", "models": ["llm_large"], "replicas": ["big:1"]},
                {
                    "name": "rest",
                    "models": ["llm_small", "llm_medium"],
                    "replicas": ["rest-a:1", "rest-b:1"],
                    "strategy": "round_robin",
                },
            ]
        }
    )
    with _client(servers, topo) as c:
        r = c.post("/v1/chat/completions", json=CHAT)  # question -> llm_large, which is down
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "llm_medium"  # llm_large -> llm_medium, the policy's fallback
        r2 = c.post("/v1/chat/completions", json=CHAT)
        assert r2.status_code == 200
        served = [s.url for s in servers.values() if any(m == "llm_medium" for m, _, _ in s.calls)]
        assert sorted(served) == ["rest-a:1", "rest-b:1"]  # round robin over the pool
        # Each answer names the replica that sent it (round robin: one each).
        assert sorted(x.headers["x-route-replica"] for x in (r, r2)) == served
        r = c.post("/v1/chat/completions", json={**CHAT, "model": "llm_large"})
        assert r.status_code == 503  # a forced tier gets no fallback
        assert (
            c.post("/v1/embeddings", json={"model": "embedding", "input": "hi"}).status_code == 200
        )
        metrics = c.get("/metrics").text
        assert (
            'gateway_routing_decisions_total{intent="question_answering",reason="table",tier="llm_large"}'
            in metrics
        )
        assert 'gateway_replica_healthy{pool="big",replica="big:1"} 0.0' in metrics
        assert (
            "gateway_ttft_seconds_bucket" in metrics
            and "gateway_pool_cost_per_million_tokens" in metrics
        )


@pytest.mark.parametrize("fault", ["down", "slow"])
def test_auto_routes_as_low_confidence_when_the_classifier_cannot_answer(fault: str) -> None:
    """Routing degrades, availability does not: a classifier that is down or slower than
    --classify-timeout sends ``auto`` to the low-confidence tier, and says so."""
    front = FakeTriton("front:1", down=fault == "down", delay=5.0 if fault == "slow" else 0.0)
    servers = {"front:1": front, "tiers:1": FakeTriton("tiers:1")}
    topo = Topology.from_dict(
        {
            "pools": [
                {"name": "front", "models": ["intent_classifier"], "replicas": ["front:1"]},
                {
                    "name": "tiers",
                    "models": ["llm_small", "llm_medium", "llm_large"],
                    "replicas": ["tiers:1"],
                },
            ]
        }
    )
    with _client(servers, topo, classify_timeout=0.2) as c:
        r = c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == ROUTING.policy.low_confidence_tier
        assert r.headers["x-route-intent"] == "unknown"
        assert r.headers["x-route-reason"] == "classifier_unavailable"
        assert float(r.headers["x-route-confidence"]) == 0.0
        forced = c.post("/v1/chat/completions", json={**CHAT, "model": "llm_small"})
        assert forced.status_code == 200 and forced.json()["model"] == "llm_small"
        metrics = c.get("/metrics").text
        tier = ROUTING.policy.low_confidence_tier
        assert (
            'gateway_routing_decisions_total{intent="unknown",'
            f'reason="classifier_unavailable",tier="{tier}"}} 1.0'
        ) in metrics


def test_ab_split_is_sticky_per_header_and_labelled() -> None:
    servers = {u: FakeTriton(u) for u in ("a:1", "b:1")}
    topo = Topology.from_dict(
        {
            "pools": [
                {"name": "stable", "models": ["llm_small"], "replicas": ["a:1"]},
                {"name": "canary", "models": ["llm_small"], "replicas": ["b:1"]},
            ],
            "splits": {
                "llm_small": {
                    "sticky_header": "x-user",
                    "arms": [
                        {"name": "stable", "pool": "stable", "weight": 50},
                        {"name": "canary", "pool": "canary", "weight": 50},
                    ],
                }
            },
        }
    )
    body = {**CHAT, "model": "llm_small"}
    with _client(servers, topo) as c:
        arms = {
            c.post("/v1/chat/completions", json=body, headers={"x-user": "alice"}).headers[
                "x-route-arm"
            ]
            for _ in range(5)
        }
        assert len(arms) == 1
        seen = {
            c.post("/v1/chat/completions", json=body, headers={"x-user": f"u{i}"}).headers[
                "x-route-arm"
            ]
            for i in range(30)
        }
        assert seen == {"stable", "canary"}
        metrics = c.get("/metrics").text
    assert 'arm="canary"' in metrics and 'arm="stable"' in metrics


def test_models_list_and_embeddings_formats() -> None:
    with _client({"fake:1": FakeTriton()}) as c:
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert ids[:4] == ["auto", "llm_small", "llm_medium", "llm_large"]
        assert "llama-3.1-8b-instruct" in ids and "embedding" in ids
        assert c.get("/v1/models/llama-3.1-8b-instruct").json()["root"] == "llm_small"
        floats = c.post("/v1/embeddings", json={"model": "embedding", "input": ["a", "b"]}).json()
        b64 = c.post(
            "/v1/embeddings", json={"model": "embedding", "input": "a", "encoding_format": "base64"}
        ).json()
    assert len(floats["data"]) == 2 and len(floats["data"][0]["embedding"]) == 384
    import base64

    decoded = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, floats["data"][0]["embedding"])
    assert floats["usage"]["prompt_tokens"] > 0


def test_an_upstream_silent_mid_stream_ends_with_a_504_event() -> None:
    import asyncio

    class Hangs(FakeTriton):
        async def stream_tensors(
            self, model: str, inputs: Tensors, request_id: str = ""
        ) -> AsyncIterator[Tensors]:
            ids = tokenizer().encode("Hello there")
            yield {"output_ids": np.array([[[ids[0]]]], dtype=np.int32)}
            await asyncio.sleep(3600)

    with _client({"fake:1": Hangs()}, first_token_timeout=0.3) as c:
        r = c.post("/v1/chat/completions", json={**CHAT, "model": "llm_small", "stream": True})
        events = _events(r.text)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "upstream_timeout"
        whole = c.post("/v1/chat/completions", json={**CHAT, "model": "llm_small"})
        assert whole.status_code == 504
        assert c.get("/health/live").status_code == 200


def test_a_stream_whose_stub_dies_ends_at_once_with_an_error_event() -> None:
    """Triton 2.51 never answers the requests a dead stub held: when the replica's deep
    health reports the model STUB_DEAD, its streams there end with an error event at once
    instead of hanging until the idle timeout (here an hour)."""
    import asyncio

    class StubDiesAfterOneToken(FakeTriton):
        pool: Any = None

        async def stream_tensors(
            self, model: str, inputs: Tensors, request_id: str = ""
        ) -> AsyncIterator[Tensors]:
            ids = tokenizer().encode("Hello there")
            yield {"output_ids": np.array([[[ids[0]]]], dtype=np.int32)}
            # What the pool's health probe does when the launcher reports STUB_DEAD.
            (replica,) = self.pool.replicas.replicas
            self.pool.replicas.note_dead_models(replica, frozenset({model}))
            await asyncio.sleep(3600)

    fake = StubDiesAfterOneToken()
    gateway = make_gateway({"fake:1": fake}, first_token_timeout=3600)
    (fake.pool,) = gateway.pools.values()
    with TestClient(create_app(gateway)) as c:
        r = c.post("/v1/chat/completions", json={**CHAT, "model": "llm_small", "stream": True})
        events = _events(r.text)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "upstream_lost"
        assert "llm_small on fake:1 lost its Python stub" in events[-2]["error"]["message"]
        assert fake.pool.replicas._streams == {}  # nothing left registered
        assert c.get("/health/live").status_code == 200


def test_a_client_that_leaves_mid_stream_frees_its_slot_and_cancels_upstream() -> None:
    import asyncio

    from gateway.app import create_app

    server = FakeTriton(answer="word " * 200, delay=0.02)
    gateway = make_gateway({"fake:1": server})
    app = create_app(gateway)
    body = json.dumps({**CHAT, "model": "llm_small", "stream": True, "max_tokens": 200}).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }

    async def scenario() -> None:
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        sent: list[dict] = []

        async def receive() -> dict:
            if messages:
                return messages.pop(0)
            await asyncio.sleep(0.3)
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        await app(scope, receive, send)
        assert sent[0]["status"] == 200
        assert 1 < len(sent) < 150  # it stopped early
        pool = gateway.pools["local"]
        assert pool.admission.in_use == 0 and server.cancelled == 1
        await gateway.close()

    asyncio.run(scenario())
