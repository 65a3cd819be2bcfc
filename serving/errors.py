"""The project's error types, and the one table that tells downstream errors apart."""

from __future__ import annotations

from enum import Enum


class ValidationError(ValueError):
    """A request is malformed. The message is sent to the client as INVALID_ARG."""


class ConfigError(ValueError):
    """A model config, spec or parameter is wrong. Raised at load time, never per request."""


class UnavailableError(RuntimeError):
    """What a request needs is not being served (e.g. every LLM tier it may use is down).

    Sent to the client as UNAVAILABLE with its message: not the client's fault, but
    worth retrying or reporting, unlike an internal error.
    """


class OverloadedError(UnavailableError):
    """A bounded queue is full: retry later or elsewhere (UNAVAILABLE; a gateway's 429)."""


#: Every client-fault message the project's models send starts with this. Triton 2.51
#: delivers a BLS response's error as INTERNAL whatever its code, so this prefix, which
#: the project controls, is how a model that calls another tells "the input was bad"
#: from "the model failed". Any other downstream error is the model's (UNAVAILABLE), so
#: the router's fallback runs for failures nobody anticipated.
INVALID_INPUT = "invalid input: "
#: The prefix of :class:`OverloadedError` messages: a full queue, not a broken model.
OVERLOADED = "overloaded: "


def tag_message(exc: BaseException) -> str:
    """The message a client gets for a project error, with its kind's prefix once."""
    message = str(exc)
    prefix = INVALID_INPUT if isinstance(exc, ValidationError) else ""
    if isinstance(exc, OverloadedError):
        prefix = OVERLOADED
    return message if not prefix or prefix in message else prefix + message


class ErrorKind(Enum):
    """What a downstream error means for the request, whoever worded it."""

    #: The input was bad: no fallback, INVALID_ARG, HTTP 400.
    INVALID_INPUT = "invalid_input"
    #: A queue or cache is full: try elsewhere or later (fallback, UNAVAILABLE, HTTP 429).
    OVERLOADED = "overloaded"
    #: The model failed or could not run; the default for anything unrecognised
    #: (fallback, UNAVAILABLE, HTTP 503).
    UNAVAILABLE = "unavailable"


#: The one table of downstream error texts the project did not write, by kind. The
#: project's own errors are not here: they are marked by prefix (INVALID_INPUT,
#: OVERLOADED above) and never matched by phrase. Entries are fragments of the fixed
#: part of each message (numbers and paths vary), compared case-sensitively.
#:
#: TensorRT-LLM (the h100 tiers' ``tensorrtllm`` backend, and the executor it runs) wraps
#: these as "[TensorRT-LLM][ERROR] Assertion failed: <text> (<file>:<line>)" or "Executor
#: failed process requestId N due to the following error: <text>", always as INTERNAL.
FOREIGN_MESSAGES: tuple[tuple[str, ErrorKind], ...] = (
    # tensorrtllm_backend inflight_batcher_llm/src/utils.cc (v0.19.0)
    ("Expected inputTokens tensors to have 2 dimensions", ErrorKind.INVALID_INPUT),
    ("input lengths tensor not provided", ErrorKind.INVALID_INPUT),
    ("Expected inputLengths tensors to have 1 dimension", ErrorKind.INVALID_INPUT),
    # "input_ids or encoder_input_features is not present …", "request_output_len is not …"
    ("is not present in the request", ErrorKind.INVALID_INPUT),
    ("Streaming is only supported if model is deployed using decoupled", ErrorKind.INVALID_INPUT),
    (
        "Batch size > 1 requires the tensorrt_llm backend to be using decoupled",
        ErrorKind.INVALID_INPUT,
    ),
    # tensorrtllm_backend inflight_batcher_llm/src/model_instance_state.cc (v0.19.0)
    ("Trying to stop a request but request ID is not provided", ErrorKind.INVALID_INPUT),
    # TensorRT-LLM cpp/tensorrt_llm/batch_manager/llmRequest.cpp (LlmRequest::validate):
    # "Prompt length (N) exceeds maximum input length (M)", "EndId (N) is not within …"
    ("exceeds maximum input length", ErrorKind.INVALID_INPUT),
    ("is not within acceptable range", ErrorKind.INVALID_INPUT),
    ("exceeds maximum draft tokens length", ErrorKind.INVALID_INPUT),
    ("Incorrect sampling config", ErrorKind.INVALID_INPUT),
    # TensorRT-LLM cpp/tensorrt_llm/executor/executorImpl.cpp: a prompt + max_tokens the
    # scheduler cannot restart; and the executor's own request queue being full
    ("Request sequence length is potentially greater than max input", ErrorKind.INVALID_INPUT),
    ("has been reached, please try again later", ErrorKind.OVERLOADED),
    # Triton core (r24.10) src/scheduler_utils.cc and src/dynamic_batch_scheduler.cc: a
    # model's own queue policy (the h100 tiers' default_queue_policy) rejecting a request.
    ("Exceeds maximum queue size", ErrorKind.OVERLOADED),
    ("Request timeout expired", ErrorKind.OVERLOADED),
    # python_backend (r24.10) src/stub_launcher.cc: a model whose stub died answers every
    # request with this until it is reloaded; another replica can serve the request.
    ("is not healthy", ErrorKind.UNAVAILABLE),
)


def kind_of(message: str) -> ErrorKind:
    """The kind of a downstream error message: the project's marks, then the table.

    Anything unrecognised is UNAVAILABLE: the model's failure, so the router's fallback
    runs and a client may retry, rather than blaming the input for an unknown fault.
    """
    if INVALID_INPUT in message:
        return ErrorKind.INVALID_INPUT
    if OVERLOADED in message:
        return ErrorKind.OVERLOADED
    return foreign_kind(message) or ErrorKind.UNAVAILABLE


def foreign_kind(message: str) -> ErrorKind | None:
    """The kind :data:`FOREIGN_MESSAGES` gives ``message``; None when no entry matches."""
    return next((kind for text, kind in FOREIGN_MESSAGES if text in message), None)


def is_client_fault(message: str) -> bool:
    """Whether a downstream error message is a client fault (the project's or a backend's)."""
    return kind_of(message) is ErrorKind.INVALID_INPUT
