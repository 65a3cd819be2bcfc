"""One typed reader for Triton config ``parameters``.

Triton stores every parameter as ``{"string_value": "..."}``. This turns them into typed
values once, in ``initialize``, with an empty string meaning "unset" (the convention of
tensorrtllm_backend's configs) and a precise :class:`ConfigError` otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from serving.errors import ConfigError

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _to_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}")


_CONVERTERS: dict[type, Callable[[str], Any]] = {
    bool: _to_bool,
    int: int,
    float: float,
    str: str,
    dict: json.loads,
    list: json.loads,
}

_MISSING = object()


class Params:
    """Typed access to a model config's ``parameters`` block.

    >>> p = Params({"parameters": {"threads": {"string_value": "2"}}})
    >>> p.get("threads", int, default=1)
    2
    """

    def __init__(self, model_config: Mapping[str, Any], model_name: str = "model") -> None:
        raw = model_config.get("parameters", {}) or {}
        self._raw = {
            k: (v.get("string_value", "") if isinstance(v, Mapping) else str(v))
            for k, v in raw.items()
        }
        self._model = model_name

    def get(self, name: str, kind: type[T], default: Any = _MISSING) -> T:
        """Return parameter ``name`` as ``kind``; ``default`` when unset; raise if required."""
        text = self._raw.get(name, "")
        if text.strip() == "" or text.startswith("${"):
            if default is _MISSING:
                raise ConfigError(f"{self._model}: config parameter '{name}' is required")
            return default
        try:
            value = _CONVERTERS[kind](text)
        except (ValueError, json.JSONDecodeError) as exc:
            raise ConfigError(
                f"{self._model}: config parameter '{name}'={text!r} is not a valid "
                f"{kind.__name__}: {exc}"
            ) from exc
        if kind in (dict, list) and not isinstance(value, kind):
            raise ConfigError(
                f"{self._model}: config parameter '{name}' must be a JSON {kind.__name__}"
            )
        return value

    def __contains__(self, name: str) -> bool:
        return self._raw.get(name, "").strip() != ""
