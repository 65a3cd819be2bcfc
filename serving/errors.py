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
