"""The gateway's connection limits over a real socket: uvicorn with the gateway's protocol
(``gateway.http``) in a thread, in front of the fake upstream. No Triton."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from gateway.app import create_app
from gateway.http import GuardedHttpToolsProtocol
from serving.launcher import free_port
from tests.sockets import send_and_read
from tests.unit.gateway_fakes import FakeTriton, make_gateway

TIMEOUT = 0.5
MAX_HEADER = 4096
BODY = json.dumps(
    {"model": "llm_small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
).encode()


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    port = free_port()
    app = create_app(make_gateway({"fake:1": FakeTriton()}), client_timeout=TIMEOUT)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_config=None,
        http=GuardedHttpToolsProtocol.with_limits(TIMEOUT, MAX_HEADER),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(10)


def exchange(port: int, data: bytes, wait: float = 5.0) -> tuple[bytes, float]:
    """Send ``data``, read until the server closes; (what came back, seconds it took)."""
    started = time.monotonic()
    got = send_and_read("127.0.0.1", port, data, wait)
    return got or b"", time.monotonic() - started


def request(*headers: bytes, body: bytes = BODY) -> bytes:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
    head += b"".join(h + b"\r\n" for h in headers)
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


def status_and_error(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


def test_a_good_request_passes(port: int) -> None:
    raw, _ = exchange(port, request())
    assert raw.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize(
    "data",
    [
        b"",  # connects, sends nothing
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n",  # half the headers
    ],
    ids=["nothing", "half-headers"],
)
def test_headers_that_do_not_arrive_get_408_and_the_connection_closes(
    port: int, data: bytes
) -> None:
    raw, took = exchange(port, data)
    status, error = status_and_error(raw)
    assert status == 408 and error["code"] == "request_timeout"
    assert "headers did not arrive" in error["message"]
    assert TIMEOUT <= took < TIMEOUT + 3


def test_a_body_that_does_not_arrive_gets_408_and_the_connection_closes(port: int) -> None:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n"
    raw, took = exchange(port, head + b'{"model":')
    status, error = status_and_error(raw)
    assert status == 408 and "body did not arrive" in error["message"]
    assert b"connection: close" in raw.lower()
    assert TIMEOUT <= took < TIMEOUT + 3


@pytest.mark.parametrize(
    "headers",
    [
        (b"x-junk: " + b"a" * 200_000,),  # one huge header, read in several chunks
        tuple(b"x-h%d: v" % i for i in range(1000)),  # many small ones, in one chunk
    ],
    ids=["one-huge", "many"],
)
def test_headers_over_the_cap_get_431(port: int, headers: tuple[bytes, ...]) -> None:
    raw, _ = exchange(port, request(*headers))
    status, error = status_and_error(raw)
    assert status == 431 and error["type"] == "invalid_request_error"
    assert f"larger than {MAX_HEADER} bytes" in error["message"]
    assert exchange(port, request())[0].startswith(b"HTTP/1.1 200")  # still serving


def test_a_kept_alive_connection_gets_the_header_deadline_again(port: int) -> None:
    keep = b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
    keep += b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY
    raw, took = exchange(port, keep + b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert raw.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in raw
    assert took < TIMEOUT + 3


def test_a_wrong_method_is_a_405_in_openais_shape(port: int) -> None:
    raw, _ = exchange(
        port, b"GET /v1/chat/completions HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    status, error = status_and_error(raw)
    assert status == 405 and error["code"] == "method_not_allowed"
    assert error["type"] == "invalid_request_error"
