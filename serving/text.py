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
