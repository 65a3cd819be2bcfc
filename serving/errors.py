"""The project's error types."""


class ValidationError(ValueError):
    """A request is malformed. The message is sent to the client as INVALID_ARG."""


class ConfigError(ValueError):
    """A model config, spec or parameter is wrong. Raised at load time, never per request."""
