"""The gRPC transport against a scripted KServe server over real gRPC on loopback.

The transport builds and decodes the protobuf messages itself (no tritonclient client in
between), so these tests check the wire: inputs with the batch dimension, request ids,
the empty-final-response flag, decoded outputs of each dtype, errors inside and outside a
stream mapped to the client's error classes, and cancellation reaching the server.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from client.errors import InvalidInput, ModelNotFound, ServerUnavailable, Timeout
from client.transport import GrpcTransport, before, infer_request, response_tensors
from serving.launcher import free_port


def _output(response: service_pb2.ModelInferResponse, name: str, array: np.ndarray) -> None:
    datatype = "BYTES" if array.dtype == object else "INT32"
    response.outputs.add(name=name, datatype=datatype, shape=array.shape)
    raw = serialize_byte_tensor(array).item() if datatype == "BYTES" else array.tobytes()
    response.raw_output_contents.append(raw)


class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """``tier``: batched, streams ``request_output_len`` ids then the final flag;
    ``bad``: one response, then an error inside the stream; ``slow``: one response,
    then waits (until cancelled); ``echo``: unbatched, upper-cases its BYTES input."""

    def __init__(self) -> None:
        self.requests: list[service_pb2.ModelInferRequest] = []
        self.cancelled = asyncio.Event()

    async def ServerReady(self, request, context):  # type: ignore[no-untyped-def]
        return service_pb2.ServerReadyResponse(ready=True)

    async def ModelConfig(self, request, context):  # type: ignore[no-untyped-def]
        if request.name not in ("tier", "bad", "slow", "echo"):
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"Request for unknown model: '{request.name}' is not found",
            )
        batch = 0 if request.name == "echo" else 8
        config = model_config_pb2.ModelConfig(name=request.name, max_batch_size=batch)
        return service_pb2.ModelConfigResponse(config=config)

    async def RepositoryIndex(self, request, context):  # type: ignore[no-untyped-def]
        index = service_pb2.RepositoryIndexResponse()
        index.models.add(name="tier", version="1", state="READY")
        index.models.add(name="broken", version="1", state="UNAVAILABLE", reason="boom")
        return index

    async def ModelInfer(self, request, context):  # type: ignore[no-untyped-def]
        self.requests.append(request)
        text = deserialize_bytes_tensor(request.raw_input_contents[0])
        response = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
        _output(response, "upper", np.array([t.upper() for t in text], dtype=object))
        _output(response, "length", np.array([len(t) for t in text], dtype=np.int32))
        return response

    async def ModelStreamInfer(self, request_iterator, context):  # type: ignore[no-untyped-def]
        try:
            async for request in request_iterator:
                self.requests.append(request)
                name = request.model_name
                count = 1
                if name == "tier":
                    names = [t.name for t in request.inputs]
                    raw = request.raw_input_contents[names.index("request_output_len")]
                    count = int(np.frombuffer(raw, dtype=np.int32)[0])
                for i in range(count):
                    response = service_pb2.ModelInferResponse(model_name=name, id=request.id)
                    _output(response, "output_ids", np.array([[[100 + i]]], dtype=np.int32))
                    _output(response, "text_output", np.array([f"t{i}".encode()], dtype=object))
                    yield service_pb2.ModelStreamInferResponse(infer_response=response)
                if name == "bad":
                    yield service_pb2.ModelStreamInferResponse(
                        error_message="[invalid input] 'max_tokens' must be positive"
                    )
                    continue
                if name == "slow":
                    await asyncio.sleep(30)
                final = service_pb2.ModelInferResponse(model_name=name, id=request.id)
                final.parameters["triton_final_response"].bool_param = True
                yield service_pb2.ModelStreamInferResponse(infer_response=final)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


@contextlib.asynccontextmanager
async def serving():
    servicer = Servicer()
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    transport = GrpcTransport(f"grpc://127.0.0.1:{port}")
    try:
        yield servicer, transport
    finally:
        await transport.close()
        await server.stop(None)


TIER_INPUTS = {
    "input_ids": np.array([1, 2, 3], dtype=np.int32),
    "request_output_len": np.array([3], dtype=np.int32),
}


def test_stream_decodes_every_response_and_stops_at_the_final_flag() -> None:
    async def main() -> None:
        async with serving() as (servicer, transport):
            got = [t async for t in transport.stream("tier", TIER_INPUTS, request_id="req-7")]
            assert [int(t["output_ids"].reshape(-1)[0]) for t in got] == [100, 101, 102]
            assert got[0]["output_ids"].shape == (1, 1, 1)
            assert got[2]["text_output"].tolist() == [b"t2"]
            sent = servicer.requests[0]
            assert sent.id == "req-7"
            assert sent.parameters["triton_enable_empty_final_response"].bool_param
            # the model batches (max_batch_size 8): the batch dimension was added
            assert [list(t.shape) for t in sent.inputs] == [[1, 3], [1, 1]]
            assert np.frombuffer(sent.raw_input_contents[0], np.int32).tolist() == [1, 2, 3]

    asyncio.run(main())


def test_an_error_inside_the_stream_is_raised_after_the_responses_before_it() -> None:
    async def main() -> None:
        async with serving() as (_, transport):
            got = []
            with pytest.raises(InvalidInput, match="max_tokens"):
                async for tensors in transport.stream("bad", TIER_INPUTS):
                    got.append(tensors)
            assert len(got) == 1

    asyncio.run(main())


def test_closing_a_stream_early_cancels_it_on_the_server() -> None:
    async def main() -> None:
        async with serving() as (servicer, transport):
            stream = transport.stream("slow", TIER_INPUTS)
            first = await anext(stream)
            assert first["text_output"].tolist() == [b"t0"]
            await stream.aclose()
            await asyncio.wait_for(servicer.cancelled.wait(), 5)

    asyncio.run(main())


def test_a_deadline_on_a_stalled_stream_is_a_timeout_and_cancels_it() -> None:
    async def main() -> None:
        async with serving() as (servicer, transport):
            stream = transport.stream("slow", TIER_INPUTS)
            await anext(stream)
            deadline = asyncio.get_running_loop().time() + 0.2
            with pytest.raises(Timeout):
                await before(anext(stream), deadline)
            await stream.aclose()
            await asyncio.wait_for(servicer.cancelled.wait(), 5)

    asyncio.run(main())


def test_infer_sends_bytes_and_returns_the_requested_outputs() -> None:
    async def main() -> None:
        async with serving() as (servicer, transport):
            text = np.array(["héllo".encode(), b"ab"], dtype=object)
            out = await transport.infer("echo", {"text": text}, ["upper"], request_id="r1")
            assert list(out) == ["upper"]
            assert out["upper"].tolist() == ["HéLLO".encode(), b"AB"]
            sent = servicer.requests[0]
            assert [o.name for o in sent.outputs] == ["upper"] and sent.id == "r1"
            assert list(sent.inputs[0].shape) == [2]  # echo does not batch
            assert await transport.server_ready()

    asyncio.run(main())


def test_status_errors_and_the_index_map_to_the_client_types() -> None:
    async def main() -> None:
        async with serving() as (_, transport):
            with pytest.raises(ModelNotFound, match="nope"):
                async for _ in transport.stream("nope", TIER_INPUTS):
                    pass
            rows = await transport.models()
            assert [(r.name, r.ready, r.reason) for r in rows] == [
                ("tier", True, ""),
                ("broken", False, "boom"),
            ]
        nobody = GrpcTransport(f"127.0.0.1:{free_port()}")
        try:
            with pytest.raises(ServerUnavailable):
                await nobody.server_ready()
        finally:
            await nobody.close()

    asyncio.run(main())


def test_request_and_response_messages_round_trip() -> None:
    inputs = {
        "text": np.array([b"a", b"bc"], dtype=object),
        "seed": np.array([7], dtype=np.uint64),
        "temperature": np.array([0.5], dtype=np.float32),
    }
    request = infer_request("m", inputs, "id", ["out"])
    assert [t.datatype for t in request.inputs] == ["BYTES", "UINT64", "FP32"]
    response = service_pb2.ModelInferResponse(raw_output_contents=request.raw_input_contents)
    for tensor in request.inputs:
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
    back = response_tensors(response)
    assert back["text"].tolist() == [b"a", b"bc"]
    assert back["seed"].dtype == np.uint64 and back["seed"].tolist() == [7]
    assert back["temperature"].tolist() == [0.5]
