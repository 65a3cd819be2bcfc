"""A scripted stand-in for one server, for the client SDK, load generator and pool tests.

It plays the part of a transport below :class:`client.sdk.AsyncClient`, so everything the
SDK does above the wire (decoding, chunking, deadlines, cancellation, balancing, timing)
runs for real.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import numpy as np

from client.errors import ServerUnavailable
from client.sdk import AsyncClient
from client.transport import ModelStatus, Tensors


def text_chunks(*pieces: bytes | str, **extra: object) -> list[Tensors]:
    """Streamed responses with ``text_output`` pieces; ``extra`` goes on the first one."""
    chunks = [{"text_output": np.array([p], dtype=object)} for p in pieces]
    for name, value in extra.items():
        dtype = object if isinstance(value, bytes) else None
        chunks[0][name] = np.array([value], dtype=dtype)
    return chunks


class FakeServer(AsyncClient):
    """Answers every stream with ``chunks`` (``delay`` s apart) and every infer with ``infer_result``."""

    def __init__(
        self,
        url: str = "fake:1",
        chunks: list[Tensors] | None = None,
        delay: float = 0.0,
        infer_result: Callable[[Tensors], Tensors] | None = None,
        error: Exception | None = None,
    ) -> None:
        super().__init__(url)
        self.chunks = chunks or []
        self.delay = delay
        self.infer_result = infer_result
        self.error = error
        self.ready = True
        self.requests: list[tuple[str, Tensors]] = []
        self.streams_closed_early = 0
        self.streams_finished = 0
        self.in_flight_peak = 0
        self._in_flight = 0

    async def infer_tensors(
        self, model: str, inputs: Tensors, outputs: list[str], request_id: str = ""
    ) -> Tensors:
        self.requests.append((model, inputs))
        if self.error is not None:
            raise self.error
        await asyncio.sleep(self.delay)
        assert self.infer_result is not None
        return self.infer_result(inputs)

    async def stream_tensors(
        self, model: str, inputs: Tensors, request_id: str = ""
    ) -> AsyncIterator[Tensors]:
        self.requests.append((model, inputs))
        if self.error is not None:
            raise self.error
        self._in_flight += 1
        self.in_flight_peak = max(self.in_flight_peak, self._in_flight)
        finished = False
        try:
            for chunk in self.chunks:
                await asyncio.sleep(self.delay)
                yield chunk
            finished = True
        finally:
            self._in_flight -= 1
            if finished:
                self.streams_finished += 1
            else:
                self.streams_closed_early += 1

    async def models(self) -> list[ModelStatus]:
        return [
            ModelStatus("embedding", "1", "READY", ""),
            ModelStatus("router", "1", "UNAVAILABLE", "boom"),
        ]

    async def server_ready(self) -> bool:
        if not self.ready:
            raise ServerUnavailable("down")
        return True

    async def close(self) -> None:
        return None
