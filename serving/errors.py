"""The project's error types."""


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


def is_client_fault(message: str) -> bool:
    """Whether a downstream error message is one of the project's client faults."""
    return INVALID_INPUT in message
