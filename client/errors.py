"""Typed client errors that carry the server's own message.

``tritonclient`` raises one exception type for everything, with a transport-specific
status string (``StatusCode.NOT_FOUND`` over gRPC, ``"400"`` over HTTP) or none at all
for errors that arrive inside a stream. Callers want to tell "fix your input" from "the
server is down" without parsing strings, so every failure is translated here, in one
place, into one of the classes below.
"""

from __future__ import annotations

import asyncio

import aiohttp
import grpc
from tritonclient.utils import InferenceServerException

from serving.errors import INVALID_INPUT, OVERLOADED, ErrorKind, foreign_kind


class ClientError(Exception):
    """Base class: ``str(exc)`` is the server's message (or the transport's) verbatim."""

    kind = "error"


class InvalidInput(ClientError):
    """The server rejected the request (INVALID_ARG / HTTP 400): change the input."""

    kind = "invalid_input"


class ModelNotFound(ClientError):
    """The model is not in the repository or not loaded."""

    kind = "model_not_found"


class ServerUnavailable(ClientError):
    """Nothing answered at the address, or the connection broke."""

    kind = "unavailable"


class Overloaded(ServerUnavailable):
    """A bounded queue on the server is full ("overloaded: …"): retry later or elsewhere."""

    kind = "overloaded"


class StreamLost(ServerUnavailable):
    """The replica lost the model mid-stream (its stub died): the rest of this answer will
    never come, and nothing is retried after tokens were sent."""

    kind = "stream_lost"


class Timeout(ClientError):
    """The client-side deadline passed before the request finished."""

    kind = "timeout"


class Cancelled(ClientError):
    """The request was cancelled (by this client or by the server)."""

    kind = "cancelled"


class ServerError(ClientError):
    """The server failed while running the request (its log has the traceback)."""

    kind = "server_error"


_GRPC_CODES: dict[str, type[ClientError]] = {
    "StatusCode.INVALID_ARGUMENT": InvalidInput,
    "StatusCode.NOT_FOUND": ModelNotFound,
    "StatusCode.UNAVAILABLE": ServerUnavailable,
    "StatusCode.DEADLINE_EXCEEDED": Timeout,
    "StatusCode.CANCELLED": Cancelled,
}

# Errors sent inside a stream (gRPC ``error_message``, HTTP SSE ``{"error": ...}``) have
# no status code, so the class is recovered from Triton's wording. The project's models
# report bad input with messages that name the field; anything unrecognised is a
# ServerError, which is the safe default (retrying elsewhere may help).
_MESSAGE_HINTS: tuple[tuple[str, type[ClientError]], ...] = (
    # The project's own marks come first (serving.errors): they are the server's word.
    (OVERLOADED, Overloaded),
    (INVALID_INPUT, InvalidInput),
    ("internal error", ServerError),
    ("not healthy", ServerError),
    ("request for unknown model", ModelNotFound),
    ("is not found", ModelNotFound),
    ("is not ready", ModelNotFound),
    ("unexpected inference input", InvalidInput),
    ("unexpected shape", InvalidInput),
    ("unexpected datatype", InvalidInput),
    ("expected ", InvalidInput),
    ("invalid", InvalidInput),
    ("must be", InvalidInput),
    ("is empty", InvalidInput),
    ("missing", InvalidInput),
    ("not valid utf-8", InvalidInput),
    ("unknown ", InvalidInput),
    ("use one of", InvalidInput),
    ("cancelled", Cancelled),
)


#: What a backend's own error text (serving.errors.FOREIGN_MESSAGES) means to a client.
_FOREIGN = {
    ErrorKind.INVALID_INPUT: InvalidInput,
    ErrorKind.OVERLOADED: Overloaded,
    ErrorKind.UNAVAILABLE: ServerUnavailable,
}


def _by_message(message: str) -> type[ClientError]:
    if OVERLOADED not in message and INVALID_INPUT not in message:
        kind = foreign_kind(message)  # the server-side table: TensorRT-LLM, Triton queues
        if kind in _FOREIGN:
            return _FOREIGN[kind]
    lowered = message.lower()
    for hint, cls in _MESSAGE_HINTS:
        if hint in lowered:
            return cls
    return ServerError


def _class_of(status: str | None, message: str) -> type[ClientError]:
    if status is None:
        return _by_message(message)
    if OVERLOADED in message.lower():
        return Overloaded
    if foreign_kind(message) is ErrorKind.UNAVAILABLE:
        # A dead stub's model on this replica (Triton calls it INTERNAL): another
        # replica can serve the request, so the pool ejects this one and retries.
        return ServerUnavailable
    if status in _GRPC_CODES:
        cls = _GRPC_CODES[status]
        # Triton answers an unknown model over gRPC with INVALID_ARGUMENT in some paths.
        return ModelNotFound if _by_message(message) is ModelNotFound else cls
    if status == "400":
        return ModelNotFound if _by_message(message) is ModelNotFound else InvalidInput
    if status == "404":
        return ModelNotFound
    if status in ("502", "503", "504"):
        return ServerUnavailable
    return _by_message(message)


def translate(exc: BaseException) -> ClientError:
    """Map any transport exception to the matching :class:`ClientError` subclass."""
    if isinstance(exc, ClientError):
        return exc
    if isinstance(exc, InferenceServerException):
        message = exc.message() or str(exc)
        return error_from_status(exc.status(), message)
    if isinstance(exc, grpc.RpcError):
        code, details = exc.code(), exc.details() or str(exc.code())
        return error_from_status(str(code), details)
    if isinstance(exc, aiohttp.ConnectionTimeoutError):  # a TimeoutError, but nothing ran
        return ServerUnavailable(f"cannot connect: no connection within the timeout ({exc})")
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return Timeout("the request did not finish before the client timeout")
    if isinstance(exc, aiohttp.ClientConnectorError | ConnectionError):
        return ServerUnavailable(f"cannot connect: {exc}")
    if isinstance(exc, aiohttp.ClientResponseError):
        return error_from_status(str(exc.status), exc.message)
    if isinstance(exc, aiohttp.ClientError):
        return ServerUnavailable(f"connection failed: {exc}")
    if isinstance(exc, asyncio.CancelledError):
        return Cancelled("cancelled by the client")
    return ServerError(f"{type(exc).__name__}: {exc}")


def error_from_status(status: str | None, message: str) -> ClientError:
    """The error for a status (gRPC code name or HTTP status) and the server's message.

    ``status`` is None for errors reported inside a stream, which carry only a message.
    """
    return _class_of(status, message)(message)


_KINDS = {
    cls.kind: cls
    for cls in (
        InvalidInput,
        ModelNotFound,
        ServerUnavailable,
        Overloaded,
        StreamLost,
        Timeout,
        Cancelled,
        ServerError,
    )
}


def error_of_kind(kind: str, message: str) -> ClientError:
    """Rebuild an error from its recorded ``kind`` (see :attr:`ClientError.kind`)."""
    return _KINDS.get(kind, ClientError)(message)
