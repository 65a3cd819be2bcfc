"""The bad-input corpus: one table of bad requests and what each front end must answer.

Each row is one kind of mistake, with the requests that make it to the gateway (OpenAI
HTTP API), to Triton's HTTP port (``generate`` extension and KServe ``infer``) and to
Triton's gRPC port, each with the status it must get and a fragment of its message.
``tests/integration/test_bad_inputs.py`` sends every one, checks the answer, and then
checks that the same front end still serves a good request.

Where Triton's own front end decides (malformed JSON, wrong types, a very long header,
a client that stalls), the row states what Triton 2.51 really does, in ``note``.

gRPC codes: a decoupled model (``router``, the tiers, the tier ensembles) is called over
the bidirectional stream, where an error arrives inside the stream as a message with no
code (``code=None``); ``embedding`` and ``intent_classifier`` are called unary, with a code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

KEY = "sk-integration-test"
#: What the session's gateway is started with (tests/integration/conftest.py).
GATEWAY_MAX_BODY = 65536
GATEWAY_CLIENT_TIMEOUT = 2.0
LONG_HEADER = "a" * 100_000
QUESTION = "What is the capital of France?"
OVER_CONTEXT = "word " * 3000
INVALID = "StatusCode.INVALID_ARGUMENT"


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def chat(content: Any = QUESTION, **fields: Any) -> bytes:
    fields.setdefault("model", "llm_small")
    return body(messages=[{"role": "user", "content": content}], **fields)


def text(value: str | bytes) -> np.ndarray:
    return np.array([[value.encode() if isinstance(value, str) else value]], dtype=object)


def int32(value: int) -> np.ndarray:
    return np.array([[value]], dtype=np.int32)


def tier_inputs(ids: list[int], output_len: int = 4, **extra: np.ndarray) -> dict[str, Any]:
    return {
        "input_ids": np.array([ids], dtype=np.int32),
        "input_lengths": int32(len(ids)),
        "request_output_len": int32(output_len),
        **extra,
    }


@dataclass(frozen=True)
class Http:
    """One HTTP request: to the gateway (``path`` under its root, sent with ``key``) or to
    Triton's HTTP port. ``status`` 0: the server closes the connection without answering."""

    path: str
    body: bytes | None
    status: int
    message: str
    headers: Mapping[str, str] = field(default_factory=dict)
    key: str | None = KEY
    method: str = "POST"


@dataclass(frozen=True)
class Grpc:
    """One gRPC request to Triton; ``code`` None: an in-stream error (no code)."""

    model: str
    inputs: Mapping[str, np.ndarray]
    code: str | None
    message: str
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Stall:
    """Raw bytes on a socket, then silence. ``status`` 0: Triton does not cut the client
    off; the test checks it stays open and the server keeps answering others meanwhile."""

    data: bytes
    status: int
    message: str


@dataclass(frozen=True)
class Row:
    name: str
    gateway: tuple[Http | Stall, ...] = ()
    triton_http: tuple[Http | Stall, ...] = ()
    triton_grpc: tuple[Grpc, ...] = ()
    note: str = ""


def _gen(model: str, payload: bytes, status: int, message: str, **kw: Any) -> Http:
    return Http(f"/v2/models/{model}/generate", payload, status, message, **kw)


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
JSON_BUFFER = "failed to parse the request JSON buffer"
#: Triton 2.51's HTTP front end answers a body it cannot parse (bad JSON, a JSON value
#: of the wrong type for an input) with 500, not 400: its decision, not a model's.
TRITON_PARSE = 500
#: Complete headers (with the API key, so the gateway waits for the body), then no body.
HEADERS_ONLY = (
    b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    + b"Authorization: Bearer "
    + KEY.encode()
    + b"\r\nContent-Length: 100\r\n\r\n"
)

ROWS: tuple[Row, ...] = (
    Row(
        "malformed-json",
        gateway=(
            Http(CHAT, b'{"model": "auto", messages: []}', 400, "not valid JSON"),
            Http(EMBEDDINGS, b"{model}", 400, "not valid JSON"),
        ),
        triton_http=(
            _gen("router", b'{"text_input": hi}', TRITON_PARSE, JSON_BUFFER),
            Http("/v2/models/embedding/infer", b'{"inputs": [}', TRITON_PARSE, JSON_BUFFER),
        ),
        note="Triton's HTTP front end parses the JSON itself and answers 500 (seen in 2.51).",
    ),
    Row(
        "truncated-json",
        gateway=(Http(CHAT, chat()[:40], 400, "not valid JSON"),),
        triton_http=(_gen("llm_small_text", b'{"text_input": "Wha', TRITON_PARSE, JSON_BUFFER),),
    ),
    Row(
        "not-an-object",
        gateway=(Http(COMPLETIONS, b"[1, 2]", 400, "must be a JSON object"),),
        triton_http=(_gen("router", b"[1, 2]", TRITON_PARSE, "non-object"),),
    ),
    Row(
        "deep-nesting",
        gateway=(Http(CHAT, b"[" * 20000, 400, "not valid JSON"),),
        triton_http=(_gen("router", b'{"text_input": ' + b"[" * 2000, TRITON_PARSE, JSON_BUFFER),),
        note="Triton gets 2,000 levels, not 20,000: one session server serves the whole run.",
    ),
    Row(
        "wrong-types",
        gateway=(
            Http(CHAT, chat(max_tokens="ten"), 400, "'max_tokens'"),
            Http(CHAT, chat(max_tokens=True), 400, "'max_tokens'"),
            Http(CHAT, body(model="auto", messages="hi"), 400, "'messages'"),
            Http(COMPLETIONS, body(model="llm_small", prompt=["a", 1]), 400, "'prompt'"),
            Http(EMBEDDINGS, body(model="embedding", input=[1, 2]), 400, "'input"),
        ),
        triton_http=(
            _gen("router", body(text_input=QUESTION, max_tokens="ten"), TRITON_PARSE, "'data'"),
            _gen("router", body(text_input=5), TRITON_PARSE, "non-string as string"),
        ),
        triton_grpc=(
            Grpc(
                "router",
                {"text_input": text(QUESTION), "max_tokens": np.array([[4.0]], np.float32)},
                None,
                "data-type is 'FP32', but model 'router' expects 'INT32'",
            ),
            Grpc("embedding", {"text": int32(5)}, INVALID, "text"),
            Grpc(
                "llm_small",
                {**tier_inputs([1, 2, 3]), "input_ids": np.array([[1.0, 2.0]], np.float32)},
                None,
                "'input_ids' data-type is 'FP32'",
            ),
        ),
    ),
    Row(
        "missing-fields",
        gateway=(
            Http(CHAT, body(model="auto"), 400, "'messages': Field required"),
            Http(CHAT, body(messages=[{"role": "user", "content": "hi"}]), 400, "'model'"),
            Http(EMBEDDINGS, body(model="embedding"), 400, "'input'"),
        ),
        triton_http=(_gen("router", body(max_tokens=4), 400, "text_input"),),
        triton_grpc=(
            Grpc("router", {"max_tokens": int32(4)}, None, "input 'text_input' is required"),
            Grpc(
                "llm_small",
                {"input_ids": np.array([[1, 2]], np.int32)},
                None,
                "missing required input",
            ),
        ),
    ),
    Row(
        "empty-text",
        gateway=(
            Http(CHAT, chat(""), 400, "needs a non-empty user message"),
            Http(COMPLETIONS, body(model="llm_small", prompt=""), 400, "'prompt' is empty"),
            Http(EMBEDDINGS, body(model="embedding", input=""), 400, "empty"),
        ),
        triton_http=(
            _gen("router", body(text_input=""), 400, "empty"),
            _gen("llm_small_text", body(text_input=""), 400, "empty"),
        ),
        triton_grpc=(
            Grpc("router", {"text_input": text("")}, None, "invalid input: "),
            Grpc("embedding", {"text": text("")}, INVALID, "is empty"),
            Grpc("llm_small", tier_inputs([]), None, "empty"),
        ),
    ),
    Row(
        "whitespace-only-text",
        gateway=(
            Http(CHAT, chat(" \n\t "), 400, "needs a non-empty user message"),
            Http(EMBEDDINGS, body(model="embedding", input=["ok", "  "]), 400, "item 1"),
        ),
        triton_http=(_gen("llm_small_text", body(text_input=" \n\t "), 400, "empty"),),
        triton_grpc=(
            Grpc("router", {"text_input": text(" \n\t ")}, None, "empty"),
            Grpc("intent_classifier", {"text": text("   ")}, INVALID, "is empty"),
        ),
    ),
    Row(
        "invalid-utf8",
        gateway=(
            Http(CHAT, chat("caf").replace(b"caf", b"caf\xc3"), 400, "not valid JSON"),
            Http(CHAT, chat("x").replace(b'"x"', b'"\\ud800"'), 400, "not valid JSON"),
        ),
        triton_http=(
            _gen("router", b'{"text_input": "caf\xc3"}', 400, "UTF-8"),
            _gen("router", b'{"text_input": "\\ud800"}', TRITON_PARSE, "surrogate pair"),
        ),
        triton_grpc=(
            Grpc("router", {"text_input": text(b"caf\xc3")}, None, "UTF-8"),
            Grpc("embedding", {"text": text(b"\xff\xfe")}, INVALID, "not valid UTF-8"),
        ),
        note="A lone surrogate escape is valid JSON syntax but no UTF-8 text.",
    ),
    Row(
        "prompt-over-context",
        gateway=(
            Http(CHAT, chat(OVER_CONTEXT), 400, "exceeds the context"),
            Http(COMPLETIONS, body(model="llm_small", prompt=OVER_CONTEXT), 400, "exceeds"),
        ),
        triton_http=(
            _gen("router", body(text_input=OVER_CONTEXT), 400, "exceeds the context"),
            _gen("llm_small_text", body(text_input=OVER_CONTEXT), 400, "shorten the prompt"),
        ),
        triton_grpc=(Grpc("llm_small", tier_inputs([1] * 3000), None, "shorten the prompt"),),
    ),
    Row(
        "max-tokens-negative",
        gateway=(
            Http(CHAT, chat(max_tokens=-1), 400, "'max_tokens'"),
            Http(CHAT, chat(max_completion_tokens=-5), 400, "'max_completion_tokens'"),
        ),
        triton_http=(
            _gen(
                "router",
                body(text_input="hi", max_tokens=-1),
                400,
                "'max_tokens' must be at least 1",
            ),
        ),
        triton_grpc=(Grpc("llm_small", tier_inputs([1, 2, 3], -1), None, "request_output_len"),),
    ),
    Row(
        "max-tokens-zero",
        gateway=(Http(CHAT, chat(max_tokens=0), 400, "'max_tokens'"),),
        triton_http=(_gen("router", body(text_input="hi", max_tokens=0), 400, "max_tokens"),),
        triton_grpc=(
            Grpc("llm_small", tier_inputs([1, 2, 3], 0), None, "request_output_len"),
            Grpc("router", {"text_input": text("hi"), "max_tokens": int32(0)}, None, "max_tokens"),
        ),
    ),
    Row(
        "max-tokens-huge",
        gateway=(
            Http(CHAT, chat(max_tokens=1_000_000), 400, "allows at most"),
            Http(CHAT, chat(max_tokens=2**70), 400, "allows at most"),
        ),
        triton_http=(
            _gen("router", body(text_input="hi", max_tokens=1_000_000), 400, "max_tokens"),
            _gen("router", body(text_input="hi", max_tokens=2**40), 400, "max_tokens"),
        ),
        triton_grpc=(Grpc("llm_small", tier_inputs([1, 2, 3], 5000), None, "request_output_len"),),
    ),
    Row(
        "sampling-out-of-range",
        gateway=(
            Http(CHAT, chat(temperature=5), 400, "'temperature'"),
            Http(CHAT, chat(top_p=0), 400, "'top_p'"),
        ),
        triton_http=(
            _gen("llm_small_text", body(text_input="hi", temperature=-1.0), 400, "temperature"),
        ),
        triton_grpc=(
            Grpc(
                "llm_small",
                tier_inputs([1, 2, 3], temperature=np.array([[-1.0]], np.float32)),
                None,
                "temperature",
            ),
        ),
    ),
    Row(
        "unknown-model",
        gateway=(
            Http(CHAT, chat(model="gpt-4o"), 404, "does not exist"),
            Http(EMBEDDINGS, body(model="nope", input="hi"), 404, "does not exist"),
            Http(CHAT, chat(model="embedding"), 400, "embedding model"),
        ),
        triton_http=(_gen("no_such_model", body(text_input="hi"), 404, "unknown model"),),
        triton_grpc=(
            Grpc("no_such_model", {"text": text("hi")}, "StatusCode.NOT_FOUND", "unknown model"),
            Grpc(
                "router",
                {"text_input": text("hi"), "model": text("llm_xl")},
                None,
                "unknown model override 'llm_xl'",
            ),
        ),
    ),
    Row(
        "unknown-intent",
        gateway=(
            Http(CHAT, chat(model="auto", intent="poetry"), 400, "poetry"),
            Http(CHAT, chat(intent="summarization"), 400, "only applies to model 'auto'"),
        ),
        triton_http=(
            _gen(
                "router", body(text_input="hi", intent="chitchat"), 400, "unknown intent override"
            ),
            _gen("router", body(text_input="hi", model="llm_xl"), 400, "unknown model override"),
        ),
        triton_grpc=(
            Grpc(
                "router",
                {"text_input": text("hi"), "intent": text("chitchat")},
                None,
                "unknown intent override 'chitchat'",
            ),
        ),
    ),
    Row(
        "body-over-limit",
        gateway=(
            Http(CHAT, chat("x" * (GATEWAY_MAX_BODY + 10)), 413, "larger than 65536 bytes"),
            Http(EMBEDDINGS, body(model="embedding", input=["x" * 40000] * 2), 413, "larger"),
        ),
        note="Triton 2.51's HTTP server has no body size option; not sent to it.",
    ),
    Row(
        "api-key",
        gateway=(
            Http(CHAT, chat(), 401, "missing API key", key=None),
            Http(CHAT, chat(), 401, "incorrect API key", key="sk-wrong"),
            Http(CHAT, chat(), 401, "'Bearer <key>'", headers={"Authorization": "Basic eA=="}),
        ),
        note="Triton has no API keys; the gateway is what checks them.",
    ),
    Row(
        "n-2-and-unsupported",
        gateway=(
            Http(CHAT, chat(n=2), 400, "'n' must be 1"),
            Http(CHAT, chat(tools=[{"type": "function"}]), 400, "'tools' is not supported"),
            Http(COMPLETIONS, body(model="llm_small", prompt="hi", echo=True), 400, "'echo'"),
        ),
    ),
    Row(
        "long-header",
        gateway=(Http(CHAT, chat(), 431, "headers are larger", headers={"x-junk": LONG_HEADER}),),
        triton_http=(
            _gen("router", body(text_input="hi"), 0, "", headers={"x-junk": LONG_HEADER}),
        ),
        note="Triton's HTTP server closes the connection on a 100 KB header, without an "
        "answer; gRPC refuses the metadata with RESOURCE_EXHAUSTED.",
        triton_grpc=(
            Grpc(
                "embedding",
                {"text": text("hi")},
                "StatusCode.RESOURCE_EXHAUSTED",
                "",
                headers={"x-junk": LONG_HEADER},
            ),
        ),
    ),
    Row(
        "headers-then-nothing",
        gateway=(
            Stall(HEADERS_ONLY % CHAT.encode(), 408, "body did not arrive"),
            Stall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n", 408, "headers did not"),
        ),
        triton_http=(Stall(HEADERS_ONLY % b"/v2/models/router/generate", 0, ""),),
    ),
    Row(
        "wrong-method-or-path",
        gateway=(
            Http(CHAT, None, 405, "Method Not Allowed", method="GET"),
            Http("/v1/nope", chat(), 404, "Not Found"),
        ),
    ),
)
