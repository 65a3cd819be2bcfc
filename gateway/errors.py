"""OpenAI's error body, one exception type, and the mapping from the client's errors.

Every failure the gateway reports is an :class:`APIError`: its HTTP status, and the
``{"error": {"message", "type", "param", "code"}}`` body the OpenAI SDKs parse.
"""

from __future__ import annotations

from typing import Any

from client.errors import (
    Cancelled,
    ClientError,
    InvalidInput,
    ModelNotFound,
    Overloaded,
    ServerUnavailable,
    StreamLost,
    Timeout,
)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    499: "cancelled",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable",
    504: "timeout",
}


class APIError(Exception):
    """An error with its HTTP status and OpenAI body; ``retry_after`` sets the header."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after
        #: end the connection after this response (the request's body was not all read)
        self.close = close

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "server_error")

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        out = {"Connection": "close"} if self.close else {}
        if self.retry_after is not None:
            out["Retry-After"] = str(max(1, round(self.retry_after + 0.499)))
        return out


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code or "invalid_value")


def from_upstream(exc: BaseException, what: str) -> APIError:
    """The client-facing error for a failed Triton call (``what`` names the model or pool)."""
    if isinstance(exc, APIError):
        return exc
    if not isinstance(exc, ClientError):
        return APIError(500, f"{what}: internal error ({type(exc).__name__})", code="internal")
    message = f"{what}: {exc}"
    if isinstance(exc, InvalidInput):
        return bad_request(message)
    if isinstance(exc, StreamLost):  # mid-stream: an SSE error event, not a status
        return APIError(502, message, code="upstream_lost")
    if isinstance(exc, Overloaded):
        return APIError(429, message, code="overloaded", retry_after=1.0)
    if isinstance(exc, ServerUnavailable):
        return APIError(503, message, code="no_healthy_replica", retry_after=1.0)
    if isinstance(exc, ModelNotFound):
        return APIError(503, message, code="model_not_ready", retry_after=1.0)
    if isinstance(exc, Timeout):
        return APIError(504, message, code="upstream_timeout")
    if isinstance(exc, Cancelled):
        return APIError(499, message, code="cancelled")
    return APIError(502, message, code="upstream_error")
