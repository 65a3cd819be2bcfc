"""The gateway's parts without HTTP: schemas, SSE framing, stops, admission, keys, topology,
the pool's balancing, and the chat template against transformers' own rendering."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from client.balancing import AsyncReplicaPool
from client.errors import ServerUnavailable, error_from_status
from gateway.admission import Admission
from gateway.auth import Bucket, KeyStore, parse_keys
from gateway.config import (
    DEFAULT_ROUTER_CONFIG,
    Placement,
    RoutingSettings,
    Split,
    Topology,
)
from gateway.errors import APIError, from_upstream
from gateway.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, parse
from gateway.sse import DONE, StopScanner, event
from serving.errors import ConfigError
from serving.params import Params
from serving.repository import parse_config
from serving.routing import RoutingPolicy
from tests.unit.gateway_fakes import FakeTriton, key_store, tokenizer

CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}


def _error(model: type, body: object) -> APIError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(APIError) as info:
        parse(model, raw)
    return info.value


# ---------------------------------------------------------------- request validation
@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"priority": "urgent"}, "priority"),
    ],
)
def test_unsupported_or_invalid_fields_are_400s_naming_the_field(extra: dict, param: str) -> None:
    error = _error(ChatCompletionRequest, {**CHAT, **extra})
    assert error.status == 400 and error.param == param
    assert error.body()["error"]["type"] == "invalid_request_error"


def test_malformed_json_and_non_objects_are_400() -> None:
    assert _error(ChatCompletionRequest, b"{not json").code == "invalid_json"
    assert _error(ChatCompletionRequest, b"[1, 2]").status == 400
    assert _error(ChatCompletionRequest, b"\xff\xfe").status == 400


@pytest.mark.parametrize(
    "raw",
    [
        # each of these was a 500 with json.loads: TypeError/UnicodeEncodeError in the
        # tokenizer, RecursionError, ValueError (int digits limit)
        b'{"model": "auto", "messages": [{"role": "user", "content": "hi \\ud800"}]}',
        b"[" * 30000,
        b'{"model": "auto", "max_tokens": 1' + b"0" * 5000 + b"}",
        b'{"model": "auto", "temperature": NaN}',
    ],
    ids=["lone-surrogate", "deep-nesting", "5000-digit-number", "nan"],
)
def test_json_that_python_accepts_or_chokes_on_is_a_400(raw: bytes) -> None:
    error = _error(ChatCompletionRequest, raw)
    assert error.status == 400 and error.code == "invalid_json"
    assert error.message.startswith("the request body is not valid JSON")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"max_tokens": "10"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 2.0}, "max_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"seed": "7"}, "seed"),
    ],
)
def test_wrong_types_are_refused_not_coerced(extra: dict, param: str) -> None:
    error = _error(ChatCompletionRequest, {**CHAT, **extra})
    assert error.status == 400 and error.param == param


def test_valid_requests_keep_their_options() -> None:
    body = {
        **CHAT,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_completion_tokens": 7,
        "max_tokens": 99,
        "stop": "END",
        "n": 1,
        "logprobs": False,
        "seed": 3,
    }
    req = parse(ChatCompletionRequest, json.dumps(body).encode())
    assert req.wanted_tokens() == 7 and req.include_usage() and req.stops() == ["END"]
    parts = {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}
    assert (
        parse(ChatCompletionRequest, json.dumps(parts).encode()).conversation()[0]["content"] == "a"
    )
    completion = parse(CompletionRequest, b'{"model": "auto", "prompt": "once"}')
    assert completion.prompt == "once"


def test_embedding_inputs() -> None:
    req = parse(EmbeddingRequest, b'{"model": "embedding", "input": ["a", "b"]}')
    assert req.texts() == ["a", "b"]
    with pytest.raises(APIError, match="item 1"):
        parse(EmbeddingRequest, b'{"model": "embedding", "input": ["a", " "]}').texts()
    assert (
        _error(
            EmbeddingRequest, {"model": "embedding", "input": "a", "encoding_format": "hex"}
        ).param
        == "encoding_format"
    )


# ---------------------------------------------------------------- chat templating
def test_chat_template_matches_transformers_apply_chat_template() -> None:
    """The gateway renders the tiers' own template: same ids as the server's tokenizer."""
    from serving.llm.tokenizer import tokenizer_for

    reference = tokenizer_for(None)
    ours = tokenizer()
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Bonjour, ça va ? 日本語"},
            {"role": "assistant", "content": "Oui."},
            {"role": "user", "content": "Et toi ?"},
        ],
    ]
    for messages in conversations:
        expected = reference.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
        )
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        assert ours.encode_chat(messages) == [int(t) for t in expected]
    assert ours.end_id == reference.eos_token_id


def test_detokenizer_is_exact_across_split_characters() -> None:
    tok = tokenizer()
    text = " naïve café 日本語 🙂 done"
    ids = tok.encode(text)
    detok = tok.detokenizer()
    out = "".join(detok.push([i]) for i in ids) + detok.flush()
    assert out == text


# ---------------------------------------------------------------- SSE and stops
def test_sse_framing() -> None:
    frame = event({"a": "line\nbreak", "b": "é"})
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    assert frame.count(b"\n") == 2  # one data line: newlines inside JSON are escaped
    assert json.loads(frame[6:]) == {"a": "line\nbreak", "b": "é"}
    assert DONE == b"data: [DONE]\n\n"


def test_stop_sequences_across_chunks() -> None:
    scanner = StopScanner(["END", "\n\n"])
    out = []
    for piece in ["Hello E", "N", "D more"]:
        text, stopped = scanner.push(piece)
        out.append(text)
        if stopped:
            break
    assert "".join(out) == "Hello " and stopped
    scanner = StopScanner(["xyz"])
    assert scanner.push("abcx") == ("ab", False)
    assert scanner.push("y") == ("c", False)  # "xy" could still start "xyz"
    assert scanner.push("z!") == ("", True)
    assert StopScanner([]).push("anything") == ("anything", False)


# ---------------------------------------------------------------- admission
def test_admission_grants_interactive_before_batch_and_sheds() -> None:
    async def scenario() -> None:
        adm = Admission("p", capacity=lambda: 1, max_queue=2, max_wait=5)
        await adm.acquire()
        order: list[str] = []

        async def wait(name: str, priority: str) -> None:
            await adm.acquire(priority)
            order.append(name)

        batch = asyncio.create_task(wait("batch", "batch"))
        await asyncio.sleep(0)
        interactive = asyncio.create_task(wait("interactive", "interactive"))
        await asyncio.sleep(0)
        with pytest.raises(APIError) as full:
            await adm.acquire("interactive")
        assert full.value.status == 429 and full.value.retry_after is not None
        adm.release()
        await interactive
        adm.release()
        await batch
        assert order == ["interactive", "batch"] and adm.queued == 0

    asyncio.run(scenario())


def test_admission_wait_is_bounded() -> None:
    async def scenario() -> None:
        adm = Admission("p", capacity=lambda: 1, max_queue=8, max_wait=0.05)
        await adm.acquire()
        with pytest.raises(APIError) as late:
            await adm.acquire("batch")
        assert late.value.status == 429 and late.value.code == "queue_timeout"
        assert adm.queued == 0 and adm.in_use == 1
        adm.release()
        await adm.acquire()  # the abandoned waiter does not hold a slot
        assert adm.in_use == 1

    asyncio.run(scenario())


# ---------------------------------------------------------------- keys and limits
def test_keys_are_checked_against_their_hashes(tmp_path: Path) -> None:
    keys, key = key_store(tmp_path)
    assert keys.authenticate(f"Bearer {key}").name == "team"
    for header, code in [
        (None, "missing_api_key"),
        ("Bearer nope", "invalid_api_key"),
        (key, "invalid_api_key"),
    ]:
        with pytest.raises(APIError) as info:
            keys.authenticate(header)
        assert info.value.status == 401 and info.value.code == code


def test_request_and_token_limits_answer_429_with_retry_after(tmp_path: Path) -> None:
    keys, key = key_store(tmp_path, requests_per_minute=2, tokens_per_minute=100)
    api_key = keys.authenticate(f"Bearer {key}")
    keys.admit(api_key)
    keys.admit(api_key)
    with pytest.raises(APIError) as info:
        keys.admit(api_key)
    assert info.value.status == 429 and info.value.code == "requests_per_minute"
    assert 0 < info.value.retry_after <= 30
    keys2, key2 = key_store(tmp_path, tokens_per_minute=100)
    api_key2 = keys2.authenticate(f"Bearer {key2}")
    keys2.admit(api_key2)
    keys2.charge_tokens(api_key2, 160)  # usage is charged after the fact; now in debt
    with pytest.raises(APIError) as info:
        keys2.admit(api_key2)
    assert info.value.code == "tokens_per_minute" and info.value.headers()["Retry-After"] == "37"


def test_bucket_refills_over_a_minute() -> None:
    now = [0.0]
    bucket = Bucket(60, clock=lambda: now[0])
    bucket.take(60)
    assert bucket.wait_for(1) == pytest.approx(1.0)
    now[0] = 30
    assert bucket.wait_for(30) == 0.0


def test_key_file_errors_are_clear() -> None:
    with pytest.raises(ConfigError, match="64 hex"):
        parse_keys({"keys": [{"name": "a", "sha256": "abc"}]}, "f")
    with pytest.raises(ConfigError, match="requests_per_minute"):
        parse_keys({"keys": [{"name": "a", "sha256": "0" * 64, "requests_per_minute": 0}]}, "f")
    assert len(KeyStore(parse_keys({"keys": []}, "f"))) == 0


# ---------------------------------------------------------------- topology
TOPOLOGY = """
aliases: {small-model: llm_small}
pools:
  - name: front
    models: [intent_classifier, embedding]
    replicas: ["10.0.0.1:8001", {url: "10.0.0.2:8001", health_url: "http://10.0.0.2:8003/health/ready"}]
    health_port: 8003
    strategy: power_of_two
    max_in_flight: 4
  - name: small-a
    models: [llm_small]
    dns: {name: llm-small.default.svc.cluster.local, port: 8001, interval_s: 2}
    health_port: 8003
    gpu_hour_price: 3.5
  - name: small-b
    models: [llm_small, llm_medium, llm_large]
    replicas: ["10.0.1.1:8001"]
splits:
  llm_small:
    sticky_header: x-user
    arms: [{name: stable, pool: small-a, weight: 90}, {name: canary, pool: small-b, weight: 10}]
"""


def test_topology_file(tmp_path: Path) -> None:
    path = tmp_path / "topology.yaml"
    path.write_text(TOPOLOGY)
    topo = Topology.load(path)
    assert topo.placement is Placement.POOLS
    front = topo.pool("front")
    assert front.replicas[0].health_url == "http://10.0.0.1:8003/health/ready"
    assert front.replicas[1].url == "10.0.0.2:8001" and front.max_in_flight == 4
    assert topo.pool("small-a").dns.interval == 2 and topo.pool("small-a").gpu_hour_price == 3.5
    assert [p.name for p in topo.pools_serving("llm_small")] == ["small-a", "small-b"]
    assert topo.aliases["small-model"] == "llm_small"
    assert topo.aliases["llama-3.1-8b-instruct"] == "llm_small"  # defaults stay
    assert topo.routing_config == DEFAULT_ROUTER_CONFIG


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pools: []", "non-empty"),
        ("pools: [{name: a, models: [x]}]", "replicas"),
        ("pools: [{name: a, models: [x], replicas: ['nohost']}]", "host:port"),
        (
            "pools: [{name: a, models: [x], replicas: ['h:1'], strategy: random}]",
            "unknown strategy",
        ),
        ("pools: [{name: a, models: [x], replicas: ['h:1'], max_in_flight: 0}]", "max_in_flight"),
        (
            "pools: [{name: a, models: [x], replicas: ['h:1']}, {name: a, models: [y], replicas: ['h:2']}]",
            "unique",
        ),
        ("pools: [{name: a, models: [x], replicas: ['h:1'], colour: red}]", "unknown key"),
        (
            "pools: [{name: a, models: [x], replicas: ['h:1']}]\nsplits: {x: {arms: [{pool: b}]}}",
            "one of the pools",
        ),
        ("pools: [oops", "not valid YAML"),
    ],
)
def test_topology_errors_are_clear(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        Topology.load(path)


def test_split_is_sticky_and_weighted() -> None:
    from gateway.config import Arm

    split = Split("llm_small", (Arm("stable", "a", 90), Arm("canary", "b", 10)))
    assert len({split.arm_for("user-1", random.random()).name for _ in range(20)}) == 1
    rng = random.Random(0)
    canary = sum(split.arm_for(None, rng.random()).name == "canary" for _ in range(5000))
    assert 350 < canary < 650
    keys = sum(split.arm_for(f"key-{i}", 0.0).name == "canary" for i in range(5000))
    assert 350 < keys < 650


def test_routing_policy_comes_from_the_router_config() -> None:
    """One source of truth: the gateway's policy is the router model's, not a copy."""
    settings = RoutingSettings.from_file(DEFAULT_ROUTER_CONFIG)
    from google.protobuf import json_format

    raw = json_format.MessageToDict(
        parse_config(DEFAULT_ROUTER_CONFIG), preserving_proto_field_name=True
    )
    assert settings.policy == RoutingPolicy.from_params(Params(raw, "router"))
    assert settings.classifier == "intent_classifier" and settings.max_context > 0


# ---------------------------------------------------------------- pool and picker
def test_pool_respects_max_in_flight_and_follows_replica_changes() -> None:
    servers = {u: FakeTriton(u) for u in ("a:1", "b:1", "c:1")}

    async def scenario() -> None:
        pool = AsyncReplicaPool(
            ["a:1", "b:1"],
            strategy="round_robin",
            client_factory=lambda u: servers[u],
            max_in_flight=1,
        )
        first = pool.pick()
        first.in_flight = 1
        assert pool.pick() is not first  # the full replica is skipped by round robin
        removed = pool.set_replicas([("b:1", None), ("c:1", None)])
        assert [r.url for r in removed] == ["a:1"]
        assert [r.url for r in pool.replicas] == ["b:1", "c:1"]
        await pool.close()

    asyncio.run(scenario())


def test_pool_retries_once_then_gives_up() -> None:
    servers = {u: FakeTriton(u, down=True) for u in ("a:1", "b:1", "c:1")}
    events: list[tuple[str, str]] = []

    async def scenario() -> None:
        pool = AsyncReplicaPool(
            list(servers),
            client_factory=lambda u: servers[u],
            max_attempts=2,
            on_event=lambda kind, r: events.append((kind, r.url)),
        )
        with pytest.raises(ServerUnavailable):
            async for _ in pool.stream_tensors("llm_small", {}, "rid"):
                pass
        tried = [s for s in servers.values() if s.calls]
        assert len(tried) == 2 and all(s.calls[0][2] == "rid" for s in tried)
        assert [k for k, _ in events].count("retry") == 1
        assert [k for k, _ in events].count("eject") == 2
        await pool.close()

    asyncio.run(scenario())


# ---------------------------------------------------------------- DNS and binding
def test_dns_pool_follows_the_name_and_keeps_the_last_list_on_failure() -> None:
    from gateway.config import DnsSpec, PoolSpec
    from gateway.metrics import GatewayMetrics
    from gateway.pools import Pool

    answers: list[object] = [["10.0.0.2", "10.0.0.1"], ["10.0.0.2", "10.0.0.3"], OSError("no DNS")]

    async def resolver(name: str, port: int) -> list[str]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return sorted(answer)

    servers: dict[str, FakeTriton] = {}

    def factory(url: str) -> FakeTriton:
        servers[url] = FakeTriton(url)
        return servers[url]

    spec = PoolSpec(
        name="small",
        models=("llm_small",),
        dns=DnsSpec("llm-small.svc", 8001, health_port=8003, interval=3600),
    )

    async def scenario() -> None:
        pool = Pool(spec, GatewayMetrics(), client_factory=factory, resolver=resolver)
        await pool.resolve_once()
        assert [r.url for r in pool.replicas.replicas] == ["10.0.0.1:8001", "10.0.0.2:8001"]
        assert pool.replicas.replicas[0].health_url == "http://10.0.0.1:8003/health/ready"
        assert pool.capacity() == 2 * spec.max_in_flight
        await pool.resolve_once()
        assert [r.url for r in pool.replicas.replicas] == ["10.0.0.2:8001", "10.0.0.3:8001"]
        await pool.resolve_once()  # a failed lookup keeps the list
        assert [r.url for r in pool.replicas.replicas] == ["10.0.0.2:8001", "10.0.0.3:8001"]
        await pool.close()

    asyncio.run(scenario())


def test_an_open_gateway_refuses_a_non_loopback_address(capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.__main__ import is_loopback, main

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert main(["--host", "0.0.0.0"]) == 2
    assert "refusing to bind 0.0.0.0 without --api-keys" in capsys.readouterr().err


def test_the_example_topology_loads_and_builds_a_gateway() -> None:
    from collections import defaultdict

    from gateway.config import REPO_ROOT
    from tests.unit.gateway_fakes import make_gateway

    topo = Topology.load(REPO_ROOT / "gateway" / "topology.example.yaml")
    assert topo.routing_config.resolve() == DEFAULT_ROUTER_CONFIG.resolve()
    assert [p.name for p in topo.pools] == ["front", "small", "small-canary", "big"]
    servers = defaultdict(FakeTriton)
    gateway = make_gateway(servers, topo)  # checks aliases and splits against the policy
    assert set(gateway.pools) == {"front", "small", "small-canary", "big"}


@pytest.mark.parametrize(
    ("status", "message", "http", "retry_after"),
    [
        ("StatusCode.UNAVAILABLE", "overloaded: 32 requests already wait", 429, True),
        (None, "invalid input: 'max_tokens' must be between 1 and 512", 400, False),
        ("StatusCode.UNAVAILABLE", "failed to connect to all addresses", 503, True),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", 504, False),
    ],
)
def test_upstream_errors_map_to_openai_statuses(
    status: str | None, message: str, http: int, retry_after: bool
) -> None:
    """A full server queue is the client's 429 with Retry-After, not a 503 or a 400."""
    error = from_upstream(error_from_status(status, message), "llm_small")
    assert error.status == http and message in error.message
    assert ("Retry-After" in error.headers()) is retry_after
