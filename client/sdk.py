"""The client SDK: embeddings, intent classification, generation and routed chat.

:class:`AsyncClient` (asyncio) and :class:`Client` (synchronous) talk to one server over
gRPC or HTTP; :class:`client.balancing.AsyncReplicaPool` offers the same methods over
several servers. All three share :class:`BaseAsyncClient`, which turns the model
contracts into tensors and back; they differ only in where a request is sent.

Streaming ``generate``/``chat`` return iterators of :class:`Chunk`. Leaving the loop early
cancels the request on the server (the generation slot is freed).
"""

from __future__ import annotations

import abc
import asyncio
import codecs
import contextlib
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, overload

import numpy as np

from client.errors import InvalidInput
from client.transport import (
    DEFAULT_URLS,
    ModelStatus,
    Protocol,
    Tensors,
    Transport,
    before,
    make_transport,
    with_deadline,
)

T = TypeVar("T")

DEFAULT_EMBEDDING = "embedding"
DEFAULT_CLASSIFIER = "intent_classifier"
DEFAULT_ROUTER = "router"
DEFAULT_TIER_MODEL = "llm_small_text"
EMBED_CONCURRENCY = 64


@dataclass(frozen=True)
class Classification:
    """What ``intent_classifier`` returns for one text."""

    intent: str
    confidence: float
    probabilities: list[float]


@dataclass(frozen=True)
class Chunk:
    """One streamed response. Routing fields are set only on the responses that carry them."""

    text: str
    intent: str | None = None
    model: str | None = None
    confidence: float | None = None
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None
    replica: str | None = None  # the server that answered, where a frontend says so


@dataclass
class Generation:
    """A whole answer, assembled from its chunks."""

    text: str = ""
    intent: str | None = None
    model: str | None = None
    confidence: float | None = None
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None
    chunks: int = 0

    def add(self, chunk: Chunk) -> None:
        """Fold one chunk in: text appends, routing fields keep their last reported value."""
        self.text += chunk.text
        self.chunks += 1
        for name in ("intent", "model", "confidence", "num_input_tokens", "num_output_tokens"):
            value = getattr(chunk, name)
            if value is not None:
                setattr(self, name, value)


@dataclass
class TextDecoder:
    """Decode streamed text whose UTF-8 sequences may be split across responses.

    A tokenizer can emit half of a multi-byte character in one response and the rest in
    the next; decoding each response on its own would corrupt it or raise. Bytes are held
    back until the character is complete. ``str`` pieces (HTTP JSON) pass straight through.
    """

    _decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )

    def feed(self, piece: bytes | str) -> str:
        if isinstance(piece, str):
            return self._decoder.decode(b"", final=True) + piece
        return self._decoder.decode(bytes(piece))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


def _text(value: str, field_name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"'{field_name}' must be a non-empty string")
    return value


def _strings(values: Sequence[str]) -> np.ndarray:
    return np.array([v.encode("utf-8") for v in values], dtype=object)


def _scalar(tensors: Tensors, name: str) -> Any:
    array = tensors.get(name)
    if array is None or array.size == 0:
        return None
    value = array.reshape(-1)[0]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace") or None
    return value.item() if hasattr(value, "item") else value


def llm_inputs(
    prompt: str,
    *,
    max_tokens: int | None,
    temperature: float | None,
    stream: bool,
    intent: str | None = None,
    tier: str | None = None,
) -> Tensors:
    """The router / tier-ensemble inputs (DESIGN.md contract); unset options are omitted."""
    inputs: Tensors = {
        "text_input": _strings([_text(prompt, "prompt")]),
        "stream": np.array([stream], dtype=np.bool_),
    }
    if max_tokens is not None:
        if max_tokens < 1:
            raise InvalidInput(f"max_tokens must be at least 1, got {max_tokens}")
        inputs["max_tokens"] = np.array([max_tokens], dtype=np.int32)
    if temperature is not None:
        if temperature < 0:
            raise InvalidInput(f"temperature must be >= 0, got {temperature}")
        inputs["temperature"] = np.array([temperature], dtype=np.float32)
    if intent is not None:
        inputs["intent"] = _strings([intent])
    if tier is not None:
        inputs["model"] = _strings([tier])
    return inputs


async def _chunks(responses: AsyncGenerator[Tensors, None]) -> AsyncGenerator[Chunk, None]:
    decoder = TextDecoder()
    # aclosing: leaving early closes the transport stream now, which cancels the request.
    async with contextlib.aclosing(responses):
        async for tensors in responses:
            raw = tensors.get("text_output")
            piece = raw.reshape(-1)[0] if raw is not None and raw.size else b""
            yield Chunk(
                text=decoder.feed(piece),
                intent=_scalar(tensors, "intent"),
                model=_scalar(tensors, "model"),
                confidence=_scalar(tensors, "confidence"),
                num_input_tokens=_scalar(tensors, "num_input_tokens"),
                num_output_tokens=_scalar(tensors, "num_output_tokens"),
            )
    tail = decoder.flush()
    if tail:
        yield Chunk(text=tail)


async def _deadline_stream(
    stream: AsyncGenerator[T, None], timeout: float | None
) -> AsyncGenerator[T, None]:
    """Apply one overall deadline to a whole stream, closing (cancelling) it on expiry."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    async with contextlib.aclosing(stream):
        while True:
            try:
                item = await (
                    anext(stream) if deadline is None else before(anext(stream), deadline)
                )
            except StopAsyncIteration:
                return
            yield item


async def _collect(chunks: AsyncIterator[Chunk]) -> Generation:
    result = Generation()
    async for chunk in chunks:
        result.add(chunk)
    return result


class BaseAsyncClient(abc.ABC):
    """The model contracts, over an abstract way of sending one request or one stream."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout

    @abc.abstractmethod
    async def infer_tensors(
        self, model: str, inputs: Tensors, outputs: list[str], request_id: str = ""
    ) -> Tensors:
        """Send one request to a non-decoupled model (``request_id``: Triton's request id)."""

    @abc.abstractmethod
    def stream_tensors(
        self, model: str, inputs: Tensors, request_id: str = ""
    ) -> AsyncGenerator[Tensors, None]:
        """Send one request to a decoupled model and yield its responses."""

    @abc.abstractmethod
    async def models(self) -> list[ModelStatus]:
        """What the server has loaded (and what failed, with the reason)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections."""

    async def __aenter__(self) -> BaseAsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def embed(self, texts: Sequence[str], *, model: str = DEFAULT_EMBEDDING) -> np.ndarray:
        """Embeddings, one row per text (L2-normalised, float32).

        Each text is its own request, sent concurrently: the server's dynamic batcher
        forms the batches, so no client-side batch size has to match the model config.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise InvalidInput("embed needs at least one text")
        for text in texts:
            _text(text, "text")
        limit = asyncio.Semaphore(EMBED_CONCURRENCY)

        async def one(text: str) -> np.ndarray:
            async with limit:
                out = await with_deadline(
                    self.infer_tensors(model, {"text": _strings([text])}, ["embedding"]),
                    self.timeout,
                )
            return out["embedding"].reshape(-1)

        rows = await asyncio.gather(*(one(t) for t in texts))
        return np.stack(rows).astype(np.float32, copy=False)

    async def classify(self, text: str, *, model: str = DEFAULT_CLASSIFIER) -> Classification:
        """The prompt's intent (completion, summarization or question_answering)."""
        outputs = ["intent", "confidence", "probabilities"]
        out = await with_deadline(
            self.infer_tensors(model, {"text": _strings([_text(text, "text")])}, outputs),
            self.timeout,
        )
        return Classification(
            intent=_scalar(out, "intent") or "",
            confidence=float(_scalar(out, "confidence")),
            probabilities=[float(p) for p in out["probabilities"].reshape(-1)],
        )

    @overload
    def generate(
        self,
        prompt: str,
        *,
        stream: Literal[False] = ...,
        model: str = ...,
        max_tokens: int | None = ...,
        temperature: float | None = ...,
    ) -> Coroutine[Any, Any, Generation]: ...

    @overload
    def generate(
        self,
        prompt: str,
        *,
        stream: Literal[True],
        model: str = ...,
        max_tokens: int | None = ...,
        temperature: float | None = ...,
    ) -> AsyncIterator[Chunk]: ...

    def generate(
        self,
        prompt: str,
        *,
        stream: bool = False,
        model: str = DEFAULT_TIER_MODEL,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> Coroutine[Any, Any, Generation] | AsyncIterator[Chunk]:
        """Generate with one tier's text ensemble (no routing).

        ``await client.generate(p)`` gives a :class:`Generation`;
        ``async for chunk in client.generate(p, stream=True)`` streams :class:`Chunk` s.
        """
        inputs = llm_inputs(prompt, max_tokens=max_tokens, temperature=temperature, stream=stream)
        return self._respond(model, inputs, stream)

    @overload
    def chat(
        self,
        prompt: str,
        *,
        stream: Literal[False] = ...,
        max_tokens: int | None = ...,
        temperature: float | None = ...,
        intent: str | None = ...,
        tier: str | None = ...,
        model: str = ...,
    ) -> Coroutine[Any, Any, Generation]: ...

    @overload
    def chat(
        self,
        prompt: str,
        *,
        stream: Literal[True],
        max_tokens: int | None = ...,
        temperature: float | None = ...,
        intent: str | None = ...,
        tier: str | None = ...,
        model: str = ...,
    ) -> AsyncIterator[Chunk]: ...

    def chat(
        self,
        prompt: str,
        *,
        stream: bool = False,
        max_tokens: int | None = None,
        temperature: float | None = None,
        intent: str | None = None,
        tier: str | None = None,
        model: str = DEFAULT_ROUTER,
    ) -> Coroutine[Any, Any, Generation] | AsyncIterator[Chunk]:
        """Routed generation: the server classifies the prompt and picks the tier.

        The result (or the chunks) report ``intent`` and ``model`` (the tier chosen);
        ``intent`` / ``tier`` override the router's choice.
        """
        inputs = llm_inputs(
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            stream=stream,
            intent=intent,
            tier=tier,
        )
        return self._respond(model, inputs, stream)

    def _respond(
        self, model: str, inputs: Tensors, stream: bool
    ) -> Coroutine[Any, Any, Generation] | AsyncIterator[Chunk]:
        chunks = _deadline_stream(_chunks(self.stream_tensors(model, inputs)), self.timeout)
        return chunks if stream else _collect(chunks)


class AsyncClient(BaseAsyncClient):
    """asyncio client for one server.

    Args:
        url: ``host:port`` of the server's gRPC or HTTP endpoint (default: local Triton).
        protocol: ``grpc`` (default) or ``http``.
        timeout: client-side deadline in seconds for each call (a whole stream counts as
            one call); ``None`` waits forever.

    The connection is opened lazily on first use, inside the running event loop.
    """

    def __init__(
        self,
        url: str | None = None,
        protocol: Protocol | str = Protocol.GRPC,
        timeout: float | None = None,
    ) -> None:
        super().__init__(timeout)
        self.protocol = Protocol(protocol)
        self.url = url or DEFAULT_URLS[self.protocol]
        self._transport: Transport | None = None

    @property
    def transport(self) -> Transport:
        if self._transport is None:
            self._transport = make_transport(self.url, self.protocol)
        return self._transport

    async def infer_tensors(
        self, model: str, inputs: Tensors, outputs: list[str], request_id: str = ""
    ) -> Tensors:
        return await self.transport.infer(model, inputs, outputs, request_id)

    async def stream_tensors(
        self, model: str, inputs: Tensors, request_id: str = ""
    ) -> AsyncGenerator[Tensors, None]:
        # The transport is created here, inside the running loop (gRPC channels bind to it).
        stream = self.transport.stream(model, inputs, request_id)
        async with contextlib.aclosing(stream) as stream:
            async for tensors in stream:
                yield tensors

    async def models(self) -> list[ModelStatus]:
        return await with_deadline(self.transport.models(), self.timeout)

    async def server_ready(self) -> bool:
        """Triton's own readiness; raises ServerUnavailable if nothing answers."""
        return await with_deadline(self.transport.server_ready(), self.timeout)

    async def close(self) -> None:
        if self._transport is not None:
            await self._transport.close()
            self._transport = None


class _LoopThread:
    """A private event loop on a daemon thread, so synchronous code can drive asyncio."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, awaitable: Awaitable[T]) -> T:
        async def wrapper() -> T:
            return await awaitable

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result()

    def iterate(self, stream: AsyncIterator[T]) -> Iterator[T]:
        """A blocking iterator over an async one; closing it closes (cancels) the stream."""
        try:
            while True:
                try:
                    yield self.run(anext(stream))
                except StopAsyncIteration:
                    return
        finally:
            closer = getattr(stream, "aclose", None)
            if closer is not None:
                self.run(closer())

    def stop(self) -> None:
        # Finalise suspended async generators (gRPC request iterators) before the loop
        # goes: an unfinalised one keeps its RPC open on the server.
        self.run(self.loop.shutdown_asyncgens())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()


class Client:
    """Synchronous client with the same methods as :class:`AsyncClient`.

    Streaming calls return plain iterators; ``break`` cancels the request on the server.
    Use :meth:`Client.over` to wrap a :class:`client.balancing.AsyncReplicaPool`.
    """

    def __init__(
        self,
        url: str | None = None,
        protocol: Protocol | str = Protocol.GRPC,
        timeout: float | None = None,
    ) -> None:
        self._runner = _LoopThread()
        self._async: BaseAsyncClient = AsyncClient(url, protocol, timeout)

    @classmethod
    def over(cls, async_client: BaseAsyncClient) -> Client:
        """A synchronous facade over any async client (for example a replica pool)."""
        obj = cls.__new__(cls)
        obj._runner = _LoopThread()
        obj._async = async_client
        return obj

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def embed(self, texts: Sequence[str], *, model: str = DEFAULT_EMBEDDING) -> np.ndarray:
        return self._runner.run(self._async.embed(texts, model=model))

    def classify(self, text: str, *, model: str = DEFAULT_CLASSIFIER) -> Classification:
        return self._runner.run(self._async.classify(text, model=model))

    def generate(self, prompt: str, *, stream: bool = False, **options: Any) -> Any:
        """:class:`Generation`, or an iterator of :class:`Chunk` with ``stream=True``."""
        return self._sync(self._async.generate(prompt, stream=stream, **options), stream)

    def chat(self, prompt: str, *, stream: bool = False, **options: Any) -> Any:
        """Routed :class:`Generation`, or an iterator of :class:`Chunk` with ``stream=True``."""
        return self._sync(self._async.chat(prompt, stream=stream, **options), stream)

    def models(self) -> list[ModelStatus]:
        return self._runner.run(self._async.models())

    def _sync(self, call: Any, stream: bool) -> Any:
        return self._runner.iterate(call) if stream else self._runner.run(call)

    def close(self) -> None:
        self._runner.run(self._async.close())
        self._runner.stop()
