"""Text decoding and checks shared by every model that takes strings, and the streaming
detokenizer shared by the router and the gateway (both turn a tier's token ids into text).

Nothing here imports torch or Triton's ``triton_python_backend_utils``, so the gateway
imports it too."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from serving.errors import ValidationError
from serving.llm.tokenizer import TokenBytes, Utf8Aligner


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


class TokenText:
    """Per-request detokenizer of a tier's stream (the router's and the gateway's).

    ``Utf8Aligner`` holds back the tokens of a character whose bytes are not complete
    yet, and ``TokenBytes`` maps ids to their exact bytes (no per-chunk ``decode`` that
    drops leading spaces). The CPU tiers already align their chunks; a TensorRT-LLM tier
    on H100 does not, so the router and the gateway align again: it is free when chunks
    are aligned.
    """

    def __init__(self, token_bytes: TokenBytes) -> None:
        self._bytes = token_bytes
        self._aligner = Utf8Aligner(token_bytes)

    def push(self, ids: Sequence[int]) -> str:
        return self._bytes.text_of(self._aligner.push(ids))

    def flush(self) -> str:
        return self._bytes.text_of(self._aligner.flush())


def new_token_ids(out: dict[str, np.ndarray]) -> list[int]:
    """The new token ids of one tier response (one sequence, one beam)."""
    ids = out["output_ids"].reshape(-1)
    lengths = out.get("sequence_length")
    if lengths is not None and lengths.size:
        n = int(lengths.reshape(-1)[0])
        if 0 <= n < ids.size:
            ids = ids[:n]
    return [int(i) for i in ids]
