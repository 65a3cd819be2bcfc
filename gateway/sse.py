"""Server-sent events framing for the streamed OpenAI responses.

The OpenAI stream is ``data: <json>\\n\\n`` per event and ``data: [DONE]\\n\\n`` at the
end; an error after the stream started is one ``data: {"error": ...}`` event before
``[DONE]`` (the status line has gone out already). JSON never holds a raw newline, so
one ``data:`` line per event is always valid framing.
"""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode("utf-8") + b"\n\n"


class StopScanner:
    """Cut streamed text at the first stop sequence, across chunk boundaries.

    Text that could be the start of a stop sequence is held back until the next chunk
    proves it is not (at most the longest stop sequence minus one characters).
    """

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._buffer = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop sequence was reached)."""
        if not self._stops:
            return text, False
        self._buffer += text
        found = [i for i in (self._buffer.find(s) for s in self._stops) if i >= 0]
        if found:
            out, self._buffer = self._buffer[: min(found)], ""
            return out, True
        cut = max(len(self._buffer) - self._hold, 0)
        out, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return out, False

    def flush(self) -> str:
        out, self._buffer = self._buffer, ""
        return out
