"""Limits on the HTTP connection that uvicorn does not have: header time and size.

uvicorn (0.54, httptools) waits forever for a request's headers: a client that opens a
connection and sends nothing, or half a request line, or one header byte every few
seconds, holds its connection and its memory until it leaves, and one header of any size
is read whole. Its keep-alive timeout only runs *between* requests. This protocol adds:

- a deadline for the request's headers, from the moment the connection opens (and, on a
  kept-alive connection, from the first byte of the next request): past it the client
  gets a 408 with OpenAI's error body and the connection is closed;
- a cap on the bytes of a request's headers: over it, a 431 and the connection is closed.

The request *body* has its own deadline in the app (``gateway.app``), where a 408 can
name it. Both are set from ``python -m gateway --client-timeout / --max-header-bytes``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.errors import APIError

DEFAULT_CLIENT_TIMEOUT = 30.0
DEFAULT_MAX_HEADER_BYTES = 32 * 1024

_LINGER = 2.0

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


def raw_error_response(error: APIError) -> bytes:
    """A whole HTTP/1.1 response for an error raised before the app sees the request."""
    body = json.dumps(error.body()).encode()
    head = (
        b"HTTP/1.1 %d %s\r\n" % (error.status, _REASONS.get(error.status, b"Error"))
        + b"content-type: application/json\r\n"
        + b"content-length: %d\r\n" % len(body)
        + b"connection: close\r\n\r\n"
    )
    return head + body


def header_timeout_error(seconds: float) -> APIError:
    return APIError(
        408,
        f"the request's headers did not arrive within {seconds:g}s",
        code="request_timeout",
    )


def header_too_large_error(limit: int) -> APIError:
    return APIError(
        431,
        f"the request's headers are larger than {limit} bytes",
        code="request_header_fields_too_large",
    )


class _HeadersTooLarge(Exception):
    pass


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline and a header size cap."""

    header_timeout: float = DEFAULT_CLIENT_TIMEOUT
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0  # raw bytes of chunks that ended inside the headers
        self._parsed_bytes = 0  # request line and headers as parsed
        self._rejected = False

    @classmethod
    def with_limits(cls, header_timeout: float, max_header_bytes: int) -> type:
        """A subclass with these limits (uvicorn takes a protocol class, not an instance)."""
        return type(
            cls.__name__,
            (cls,),
            {"header_timeout": header_timeout, "max_header_bytes": max_header_bytes},
        )

    # -- the deadline
    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_bytes = 0
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _reject(self, error: APIError) -> None:
        """Answer ``error`` and end the connection.

        Closing a socket with the client's unread bytes in it sends a reset, which can
        destroy the answer before the client reads it; so the answer is followed by a
        half-close, what the client still sends is read and dropped, and the socket is
        closed when the client closes its side (or after ``_LINGER`` seconds).
        """
        self._disarm()
        if self._rejected or self.transport.is_closing():
            return
        self._rejected = True
        self.logger.info("closing a connection: %s", error.message)
        self.transport.write(raw_error_response(error))
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(_LINGER, self.transport.close)
        else:
            self.transport.close()

    def _headers_late(self) -> None:
        self._header_timer = None
        self._reject(header_timeout_error(self.header_timeout))

    # -- uvicorn's hooks
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._parsed_bytes = 0
        self._arm()  # a kept-alive connection's next request: its headers have a deadline

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._count(len(name) + len(value) + 4)

    def _count(self, size: int) -> None:
        """Headers that arrive in one piece are counted as the parser reads them."""
        self._parsed_bytes += size
        if self._parsed_bytes > self.max_header_bytes:
            self._reject(header_too_large_error(self.max_header_bytes))
            raise _HeadersTooLarge  # stops the parser; uvicorn's 400 is then skipped

    def send_400_response(self, msg: str) -> None:
        if not self._rejected:  # not after this protocol's own 408/431
            super().send_400_response(msg)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return  # answered already: drop what the client still sends
        reading_headers = self._header_timer is not None
        super().data_received(data)
        # Still in the headers after this chunk: every byte of it was header.
        if reading_headers and self._header_timer is not None:
            self._header_bytes += len(data)
            if self._header_bytes > self.max_header_bytes:
                self._reject(header_too_large_error(self.max_header_bytes))
