"""Every transport failure becomes a typed error that carries the server's message."""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from client.errors import (
    Cancelled,
    InvalidInput,
    ModelNotFound,
    Overloaded,
    ServerError,
    ServerUnavailable,
    Timeout,
    error_from_status,
    translate,
)
from client.sdk import TextDecoder
from client.transport import _from_json, _json_value, sse_events


@pytest.mark.parametrize(
    ("status", "message", "expected"),
    [
        ("StatusCode.INVALID_ARGUMENT", "'text_input' is empty or whitespace only", InvalidInput),
        ("StatusCode.NOT_FOUND", "Request for unknown model: 'nope' is not found", ModelNotFound),
        (
            "StatusCode.INVALID_ARGUMENT",
            "Request for unknown model: 'nope' is not found",
            ModelNotFound,
        ),
        ("StatusCode.UNAVAILABLE", "failed to connect to all addresses", ServerUnavailable),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", Timeout),
        ("StatusCode.CANCELLED", "Locally cancelled by application!", Cancelled),
        ("400", "max_tokens must be between 1 and 4096", InvalidInput),
        ("400", "Request for unknown model: 'nope' is not found", ModelNotFound),
        ("503", "Service Unavailable", ServerUnavailable),
        (None, "router: internal error (RuntimeError); see the server log", ServerError),
        # A dead stub's model: another replica can serve it (the pool retries there).
        (None, "Stub process 'llm_small_0_0' is not healthy.", ServerUnavailable),
        ("StatusCode.INTERNAL", "Stub process 'llm_small_0_0' is not healthy.", ServerUnavailable),
        (None, "'max_tokens' must be between 1 and 512", InvalidInput),
        (None, "something odd", ServerError),
        (
            None,
            "unknown model override 'bogus'; use one of ['llm_small'] or leave 'model' unset",
            InvalidInput,
        ),
        (None, "Request for unknown model: 'nope' is not found", ModelNotFound),
        # The project's own marks (serving.errors) decide, whatever else the text says.
        (None, "llm_small: invalid input: prompt is not found in the cache", InvalidInput),
        ("StatusCode.UNAVAILABLE", "overloaded: 32 requests already wait", Overloaded),
        (None, "router: overloaded: 20 router requests are already running", Overloaded),
        ("503", "overloaded: 32 requests already wait for a slot", Overloaded),
    ],
)
def test_status_and_message_pick_the_class(
    status: str | None, message: str, expected: type
) -> None:
    error = error_from_status(status, message)
    assert type(error) is expected
    assert str(error) == message


def test_translate_keeps_the_server_message() -> None:
    exc = InferenceServerException(
        "'text' is not valid UTF-8", status="StatusCode.INVALID_ARGUMENT"
    )
    error = translate(exc)
    assert isinstance(error, InvalidInput) and str(error) == "'text' is not valid UTF-8"


def test_translate_transport_failures() -> None:
    assert isinstance(translate(asyncio.TimeoutError()), Timeout)
    assert isinstance(translate(ConnectionRefusedError("refused")), ServerUnavailable)
    assert isinstance(translate(aiohttp.ServerDisconnectedError()), ServerUnavailable)
    already = InvalidInput("x")
    assert translate(already) is already
    assert isinstance(translate(KeyError("k")), ServerError)


def test_sse_events_keep_partial_tails() -> None:
    buffer = bytearray(b'data: {"text_output": "he"}\n\ndata: {"text_out')
    assert sse_events(buffer) == [{"text_output": "he"}]
    buffer.extend(b'put": "llo"}\n\n')
    assert sse_events(buffer) == [{"text_output": "llo"}]
    assert buffer == bytearray()


def test_sse_events_keep_bytes_that_split_a_character() -> None:
    """Triton writes a BYTES output into the event raw: half of 你 is not valid UTF-8."""
    ni = "你".encode()
    buffer = bytearray(b'data: {"text_output": "a' + ni[:2] + b'"}\n\n')
    buffer += b'data: {"text_output": "' + ni[2:] + b'!"}\n\n'
    events = sse_events(buffer)
    pieces = [_from_json(event["text_output"])[0] for event in events]
    assert pieces == [b"a" + ni[:2], ni[2:] + b"!"]
    decoder = TextDecoder()
    assert "".join(decoder.feed(p) for p in pieces) + decoder.flush() == "a你!"


def test_json_conversion_for_the_generate_endpoints() -> None:
    assert _json_value(np.array([b"hi"], dtype=object)) == "hi"
    assert _json_value(np.array([7], dtype=np.int32)) == 7
    assert _json_value(np.array([True])) is True
    assert _from_json("hé")[0] == "hé".encode()
    assert _from_json(["a", "b"]).tolist() == [b"a", b"b"]
    assert _from_json([0.1, 0.9]).tolist() == [0.1, 0.9]
