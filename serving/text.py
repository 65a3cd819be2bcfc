"""Text decoding and checks shared by every model that takes strings."""

from __future__ import annotations

import numpy as np

from serving.errors import ValidationError


def decode_utf8(value: object, field: str) -> str:
    """Decode one TYPE_STRING element (bytes or str) strictly, naming the field on error."""
    if isinstance(value, str):
        return value
    if isinstance(value, np.bytes_ | bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValidationError(
                f"'{field}' is not valid UTF-8 (bad byte at offset {exc.start})"
            ) from exc
    raise ValidationError(f"'{field}' must be a string, got {type(value).__name__}")


def require_text(value: object, field: str) -> str:
    """Decode and reject empty or whitespace-only text."""
    text = decode_utf8(value, field)
    if not text.strip():
        raise ValidationError(f"'{field}' is empty or whitespace only")
    return text


def text_rows(array: np.ndarray, field: str) -> list[str]:
    """Decode every row of a TYPE_STRING tensor with :func:`require_text`.

    A bad row names its index (``text[2]``) when the tensor holds more than one, so the
    client can tell which one to fix. No rows at all is a ValidationError too.
    """
    values = np.asarray(array, dtype=object).reshape(-1)
    if not len(values):
        raise ValidationError(f"input '{field}' has no rows; send at least one string")
    return [
        require_text(value, field if len(values) == 1 else f"{field}[{i}]")
        for i, value in enumerate(values)
    ]
