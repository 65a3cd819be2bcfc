"""gRPC and HTTP transports with one shape: tensors in, tensors (or a stream of them) out.

Everything above this module (the SDK, the load generator, the replica pool, the gateway)
speaks only :class:`Transport`, so each feature and each measurement exists once rather
than once per protocol. Both transports are asyncio; the synchronous client runs them on a
private loop.

The gRPC transport calls the KServe ``GRPCInferenceService`` stubs that ship inside
``tritonclient`` on a ``grpc.aio`` channel directly, and builds and decodes the protobuf
messages itself (``raw_input_contents`` / ``raw_output_contents`` as numpy buffers). It
does not go through ``tritonclient.grpc.aio``: that client wraps every streamed response
in an ``InferResult`` and looks each output up by name, and its reader capped a stream
relay at about 9.8k responses/s on one core here (benchmarks/results/gateway.md).

Streams are async generators. Closing one early (``break`` out of ``async for``, or
``aclose()``) cancels the request on the server: over gRPC the call is cancelled, which
Triton forwards to the model as ``request.is_cancelled()``; over HTTP the connection is
closed.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import numpy as np
import tritonclient.http as httpclient
import tritonclient.http.aio as http_aio
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import (
    deserialize_bytes_tensor,
    np_to_triton_dtype,
    serialize_byte_tensor,
    triton_to_np_dtype,
)

from client.errors import error_from_status, translate

Tensors = dict[str, np.ndarray]

_FINAL = "triton_final_response"


class Protocol(str, enum.Enum):
    """Wire protocol to the server."""

    GRPC = "grpc"
    HTTP = "http"


DEFAULT_URLS = {Protocol.GRPC: "127.0.0.1:8001", Protocol.HTTP: "127.0.0.1:8000"}


@dataclass(frozen=True)
class ModelStatus:
    """One row of the server's repository index."""

    name: str
    version: str
    state: str
    reason: str

    @property
    def ready(self) -> bool:
        return self.state == "READY"


def _strip_scheme(url: str) -> str:
    for scheme in ("http://", "https://", "grpc://"):
        if url.startswith(scheme):
            return url[len(scheme) :]
    return url


def _infer_inputs(inputs: Tensors) -> list[Any]:
    """tritonclient HTTP InferInput objects."""
    built = []
    for name, array in inputs.items():
        item = httpclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        item.set_data_from_numpy(array)
        built.append(item)
    return built


async def _guard(awaitable: Any) -> Any:
    """Await a tritonclient call, translating whatever it raises into a ClientError."""
    try:
        return await awaitable
    except Exception as exc:
        raise translate(exc) from exc


def _json_value(array: np.ndarray) -> Any:
    """A tensor as the plain JSON value the generate endpoints take (scalars unwrapped)."""
    flat = array.reshape(-1)
    values = [v.decode("utf-8") if isinstance(v, bytes) else v.item() for v in flat]
    return values[0] if len(values) == 1 else values


def _from_json(value: Any) -> np.ndarray:
    """A generate-endpoint JSON value as the tensor gRPC would give: strings become bytes.

    The bytes are the server's own (``surrogateescape`` undoes :func:`sse_events`' decode),
    so half of a multi-byte character reaches the caller's incremental decoder intact.
    """
    if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], str)):
        items = [value] if isinstance(value, str) else value
        return np.array([v.encode("utf-8", "surrogateescape") for v in items], dtype=object)
    return np.atleast_1d(np.array(value))


def sse_events(buffer: bytearray) -> list[dict[str, Any]]:
    """Pop every complete ``data:`` event from an SSE byte buffer (in place).

    Events may arrive split across network reads, so the buffer keeps any partial tail.
    Triton's ``generate_stream`` copies a BYTES output into its JSON as raw bytes, so a
    token that ends inside a multi-byte character makes the event invalid UTF-8: the
    bytes that are not UTF-8 are kept as lone surrogates (``surrogateescape``), and
    :func:`_from_json` turns the strings back into the exact bytes.
    """
    events = []
    while True:
        end = buffer.find(b"\n\n")
        if end < 0:
            return events
        block = bytes(buffer[:end])
        del buffer[: end + 2]
        data = b"".join(
            line[5:].lstrip() for line in block.split(b"\n") if line.startswith(b"data:")
        )
        if data:
            events.append(json.loads(data.decode("utf-8", "surrogateescape")))


class Transport(abc.ABC):
    """What the SDK needs from a protocol. All methods raise :class:`ClientError` types."""

    def __init__(self, url: str) -> None:
        self.url = _strip_scheme(url)
        self._max_batch: dict[str, asyncio.Future[int]] = {}

    @abc.abstractmethod
    async def infer(
        self, model: str, inputs: Tensors, outputs: list[str], request_id: str = ""
    ) -> Tensors:
        """One request, one response (for non-decoupled models).

        ``request_id`` is Triton's request id: it appears in the server's log and trace,
        so a caller (the gateway) can follow one request across both logs.
        """

    @abc.abstractmethod
    async def server_ready(self) -> bool:
        """Triton's own readiness (``/v2/health/ready``)."""

    @abc.abstractmethod
    def stream(self, model: str, inputs: Tensors, request_id: str = "") -> AsyncIterator[Tensors]:
        """All responses of one request to a decoupled model, as they arrive."""

    @abc.abstractmethod
    async def models(self) -> list[ModelStatus]:
        """The repository index: every model the server knows and its state."""

    @abc.abstractmethod
    async def _max_batch_size(self, model: str) -> int: ...

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections."""

    async def batched(self, model: str, inputs: Tensors) -> Tensors:
        """Add the batch dimension if the model batches (its config says max_batch_size > 0).

        The contracts give dims without the batch dimension; whether one is needed is a
        property of the deployed config, so it is looked up once per model and cached
        (one lookup even when many requests start at once; a failed lookup is retried).
        """
        lookup = self._max_batch.get(model)
        if lookup is None:
            lookup = asyncio.ensure_future(self._max_batch_size(model))
            self._max_batch[model] = lookup
        try:
            max_batch = await asyncio.shield(lookup)
        except Exception:
            self._max_batch.pop(model, None)
            raise
        if max_batch > 0:
            return {name: array[np.newaxis, ...] for name, array in inputs.items()}
        return inputs


#: Unlimited message sizes, as tritonclient sets them (large embedding batches).
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
]


def infer_request(
    model: str, inputs: Tensors, request_id: str = "", outputs: list[str] | None = None
) -> service_pb2.ModelInferRequest:
    """A KServe ``ModelInferRequest`` with every input in ``raw_input_contents``."""
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    for name, array in inputs.items():
        datatype = np_to_triton_dtype(array.dtype)
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        if datatype == "BYTES":
            raw = serialize_byte_tensor(array).item() if array.size else b""
        else:
            raw = np.ascontiguousarray(array).tobytes()
        request.raw_input_contents.append(raw)
    for name in outputs or ():
        request.outputs.add(name=name)
    return request


def response_tensors(response: service_pb2.ModelInferResponse) -> Tensors:
    """Every output of a ``ModelInferResponse`` as numpy (read-only views of the bytes)."""
    tensors: Tensors = {}
    raw = response.raw_output_contents
    for i, output in enumerate(response.outputs):
        datatype = output.datatype
        if i >= len(raw):
            array = np.empty(0)
        elif datatype == "BYTES":
            array = deserialize_bytes_tensor(raw[i])
        else:
            array = np.frombuffer(raw[i], dtype=_np_dtype(datatype))
        tensors[output.name] = array.reshape(tuple(output.shape))
    return tensors


_NP_DTYPES: dict[str, Any] = {}


def _np_dtype(datatype: str) -> Any:
    dtype = _NP_DTYPES.get(datatype)
    if dtype is None:
        dtype = _NP_DTYPES[datatype] = triton_to_np_dtype(datatype)
    return dtype


class GrpcTransport(Transport):
    """gRPC over ``grpc.aio`` and the KServe stubs; streams use ``ModelStreamInfer``."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._channel = grpc.aio.insecure_channel(self.url, options=_CHANNEL_OPTIONS)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    async def infer(
        self, model: str, inputs: Tensors, outputs: list[str], request_id: str = ""
    ) -> Tensors:
        request = infer_request(model, await self.batched(model, inputs), request_id, outputs)
        response = await _guard(self._stub.ModelInfer(request))
        tensors = response_tensors(response)
        return {name: tensors[name] for name in outputs}

    async def server_ready(self) -> bool:
        response = await _guard(self._stub.ServerReady(service_pb2.ServerReadyRequest()))
        return bool(response.ready)

    async def stream(
        self, model: str, inputs: Tensors, request_id: str = ""
    ) -> AsyncIterator[Tensors]:
        try:
            request = infer_request(model, await self.batched(model, inputs), request_id)
        except Exception as exc:
            raise translate(exc) from exc
        # Ask for the flags-only final response, so the end of the request is seen at
        # once instead of when the server closes the stream.
        request.parameters["triton_enable_empty_final_response"].bool_param = True
        call = self._stub.ModelStreamInfer(iter((request,)))
        read = call.read
        finished = False
        try:
            while True:
                message = await read()
                if message is grpc.aio.EOF:
                    finished = True
                    return
                if message.error_message:
                    raise error_from_status(None, message.error_message)
                response = message.infer_response
                if response.outputs:
                    yield response_tensors(response)
                final = response.parameters.get(_FINAL)
                if final is not None and final.bool_param:
                    finished = True
                    return
        except Exception as exc:
            raise translate(exc) from exc
        finally:
            # Cancel only a request that has not finished: cancelling one the server has
            # already completed and released is at best a no-op.
            if not finished:
                call.cancel()

    async def models(self) -> list[ModelStatus]:
        index = await _guard(self._stub.RepositoryIndex(service_pb2.RepositoryIndexRequest()))
        return [
            ModelStatus(name=m.name, version=m.version, state=m.state, reason=m.reason)
            for m in index.models
        ]

    async def _max_batch_size(self, model: str) -> int:
        config = await _guard(self._stub.ModelConfig(service_pb2.ModelConfigRequest(name=model)))
        return int(config.config.max_batch_size)

    async def close(self) -> None:
        await self._channel.close()


class HttpTransport(Transport):
    """HTTP over ``tritonclient.http.aio``; streams use ``/v2/models/<m>/generate_stream``.

    tritonclient has no SSE support, so streaming reads the event stream with aiohttp.

    A replica that does not accept the connection (down, or a blackholed address that
    drops the SYN) fails a stream after ``connect_timeout`` seconds as
    :class:`client.errors.ServerUnavailable`, so a replica pool retries elsewhere and
    ejects it, instead of spending the caller's whole first-token deadline on it.
    """

    #: Seconds to establish a stream's TCP connection (aiohttp's default is 30; its
    #: default total of 5 minutes is kept).
    connect_timeout = 5.0

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._client = http_aio.InferenceServerClient(self.url, conn_timeout=3600.0)
        self._session: aiohttp.ClientSession | None = None

    async def infer(
        self, model: str, inputs: Tensors, outputs: list[str], request_id: str = ""
    ) -> Tensors:
        batched = _infer_inputs(await self.batched(model, inputs))
        wanted = [httpclient.InferRequestedOutput(name) for name in outputs]
        result = await _guard(
            self._client.infer(model, batched, outputs=wanted, request_id=request_id)
        )
        return {name: result.as_numpy(name) for name in outputs}

    async def server_ready(self) -> bool:
        return bool(await _guard(self._client.is_server_ready()))

    def _sse_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No connection cap: the load generator holds one connection per stream.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=5 * 60, sock_connect=self.connect_timeout),
            )
        return self._session

    async def stream(
        self, model: str, inputs: Tensors, request_id: str = ""
    ) -> AsyncIterator[Tensors]:
        # The generate endpoint takes no request id: ``request_id`` is gRPC-only.
        body = {name: _json_value(array) for name, array in inputs.items()}
        url = f"http://{self.url}/v2/models/{model}/generate_stream"
        try:
            async with self._sse_session().post(url, json=body) as response:
                if response.status != 200:
                    text = await response.text()
                    try:
                        message = json.loads(text).get("error", text)
                    except json.JSONDecodeError:
                        message = text
                    raise error_from_status(str(response.status), message)
                buffer = bytearray()
                async for piece in response.content.iter_any():
                    buffer.extend(piece)
                    for event in sse_events(buffer):
                        if "error" in event:
                            raise error_from_status(None, str(event["error"]))
                        yield {
                            key: _from_json(value)
                            for key, value in event.items()
                            if key not in ("model_name", "model_version", "id")
                        }
        except Exception as exc:
            raise translate(exc) from exc

    async def models(self) -> list[ModelStatus]:
        index = await _guard(self._client.get_model_repository_index())
        return [_status(row) for row in index]

    async def _max_batch_size(self, model: str) -> int:
        config = await _guard(self._client.get_model_config(model))
        return int(config.get("max_batch_size", 0))

    async def close(self) -> None:
        await self._client.close()
        if self._session is not None:
            await self._session.close()


def _status(row: dict[str, Any]) -> ModelStatus:
    return ModelStatus(
        name=str(row.get("name", "")),
        version=str(row.get("version", "")),
        state=str(row.get("state", "")),
        reason=str(row.get("reason", "")),
    )


def make_transport(url: str, protocol: Protocol) -> Transport:
    """The transport for a protocol; the only place that chooses between them."""
    return GrpcTransport(url) if protocol is Protocol.GRPC else HttpTransport(url)


async def with_deadline(awaitable: Any, timeout: float | None) -> Any:
    """Await with an optional client-side timeout, raising :class:`client.errors.Timeout`."""
    if timeout is None:
        return await awaitable
    deadline = asyncio.get_running_loop().time() + timeout
    return await before(awaitable, deadline)


_timeout_at = getattr(asyncio, "timeout_at", None)  # Python 3.11+


async def before(awaitable: Any, deadline: float) -> Any:
    """Await until the loop-time ``deadline``, raising :class:`client.errors.Timeout`.

    Streams call this once per response, so it uses ``asyncio.timeout_at`` (a timer
    handle) where available instead of ``wait_for`` (a new task per response).
    """
    try:
        if _timeout_at is not None:
            async with _timeout_at(deadline):
                return await awaitable
        remaining = max(deadline - asyncio.get_running_loop().time(), 0.0)
        return await asyncio.wait_for(awaitable, remaining)
    except TimeoutError as exc:
        raise translate(exc) from exc
