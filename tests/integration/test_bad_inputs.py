"""The bad-input corpus (tests/integration/bad_inputs.py) against the real servers.

Every request of every row goes to its front end (the session's gateway, Triton's HTTP
port, Triton's gRPC port); each must get its status and message, and the same front end
must then serve a good request to the same model.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.parse
from typing import Any

import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from serving.launcher import TritonLauncher
from tests.integration.bad_inputs import (
    GATEWAY_CLIENT_TIMEOUT,
    KEY,
    ROWS,
    Grpc,
    Http,
    Stall,
    int32,
    text,
    tier_inputs,
)
from tests.integration.conftest import grpc_input, grpc_stream, stream_outputs
from tests.sockets import send_and_read

#: Triton models with ``decoupled: true`` (or ensembles of one): called over the stream.
DECOUPLED = {"router", "llm_small", "llm_small_text"}
#: How long a stalled client is watched for an answer Triton does not give.
HOLD = GATEWAY_CLIENT_TIMEOUT + 1


def _cases(front: str) -> list[Any]:
    return [
        pytest.param(case, id=f"{row.name}-{i}")
        for row in ROWS
        for i, case in enumerate(getattr(row, front))
    ]


# ------------------------------------------------------------------ transports
def send_http(base: str, case: Http) -> tuple[int, str]:
    """(status, body text); status 0 when the server closes without an answer."""
    url = urllib.parse.urlsplit(base)
    headers = {"Content-Type": "application/json", **case.headers}
    if case.key is not None and "Authorization" not in headers:
        headers["Authorization"] = f"Bearer {case.key}"
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    try:
        conn.request(case.method, url.path.rstrip("/") + case.path, case.body, headers)
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    except (ConnectionError, http.client.RemoteDisconnected):
        return 0, ""
    finally:
        conn.close()


def grpc_error(server: TritonLauncher, case: Grpc) -> InferenceServerException | None:
    inputs = [grpc_input(name, array) for name, array in case.inputs.items()]
    headers = dict(case.headers) or None
    try:
        if case.model in DECOUPLED:
            with grpc_stream(server, headers) as (client, results):
                client.async_stream_infer(case.model, inputs, enable_empty_final_response=True)
                stream_outputs(results, "text_output" if "text" in case.model else "output_ids")
        else:
            client = grpcclient.InferenceServerClient(server.grpc_url)
            try:
                client.infer(case.model, inputs, headers=headers, client_timeout=120)
            finally:
                client.close()
    except InferenceServerException as exc:
        return exc
    return None


# ------------------------------------------------------------------ good requests
def gateway_serves(gateway: str) -> None:
    client = openai.OpenAI(base_url=gateway, api_key=KEY, max_retries=0, timeout=120)
    done = client.chat.completions.create(
        model="llm_small", messages=[{"role": "user", "content": "Hi"}], max_tokens=1
    )
    assert done.choices[0].finish_reason in ("stop", "length")


def triton_http_serves(server: TritonLauncher, path: str) -> None:
    base = f"http://{server.http_url}"
    if "/embedding/" in path:
        payload = {
            "inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": ["ok"]}]
        }
        good = Http("/v2/models/embedding/infer", json.dumps(payload).encode(), 200, "", key=None)
    else:
        model = "llm_small_text" if "llm_small_text" in path else "router"
        payload = {"text_input": "Hi", "max_tokens": 1}
        good = Http(f"/v2/models/{model}/generate", json.dumps(payload).encode(), 200, "", key=None)
    status, body = send_http(base, good)
    assert status == 200, body


def triton_grpc_serves(server: TritonLauncher, model: str) -> None:
    if model == "llm_small":
        good = Grpc(model, tier_inputs([1, 4093, 198], 1), None, "")
    elif model in ("embedding", "intent_classifier"):
        good = Grpc(model, {"text": text("Who wrote Hamlet?")}, None, "")
    else:
        good = Grpc("router", {"text_input": text("Hi"), "max_tokens": int32(1)}, None, "")
    assert grpc_error(server, good) is None


# ------------------------------------------------------------------ the corpus
def assert_openai_error(status: int, raw: str, message: str) -> None:
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"}, raw
    assert message in error["message"], raw
    assert error["type"] == ("authentication_error" if status == 401 else "invalid_request_error")


@pytest.mark.parametrize("case", _cases("gateway"))
def test_gateway(gateway: str, case: Http | Stall) -> None:
    host_port = urllib.parse.urlsplit(gateway)
    if isinstance(case, Stall):
        started = time.monotonic()
        raw = send_and_read(
            host_port.hostname, host_port.port, case.data, GATEWAY_CLIENT_TIMEOUT + 10
        )
        took = time.monotonic() - started
        assert raw is not None, "the gateway held a silent client past its timeout"
        head, _, payload = raw.partition(b"\r\n\r\n")
        assert int(head.split()[1]) == case.status, raw
        assert_openai_error(case.status, payload.decode(), case.message)
        assert GATEWAY_CLIENT_TIMEOUT <= took < GATEWAY_CLIENT_TIMEOUT + 5
    else:
        status, raw = send_http(gateway.removesuffix("/v1"), case)
        assert status == case.status, raw
        assert_openai_error(status, raw, case.message)
    gateway_serves(gateway)


@pytest.mark.parametrize("case", _cases("triton_http"))
def test_triton_http(server: TritonLauncher, case: Http | Stall) -> None:
    base = f"http://{server.http_url}"
    if isinstance(case, Stall):
        host, port = server.http_url.rsplit(":", 1)
        # Triton 2.51's HTTP server has no read timeout: the silent client is not cut
        # off. What matters is that it holds no worker: others are served meanwhile.
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(case.data)
            sock.settimeout(HOLD)
            with pytest.raises(TimeoutError):
                sock.recv(1)
            triton_http_serves(server, "/v2/models/router/generate")
        return
    status, raw = send_http(base, Http(case.path, case.body, case.status, "", case.headers, None))
    assert status == case.status, raw
    assert case.message in raw, raw  # Triton's body is {"error": "..."} (or nothing)
    triton_http_serves(server, case.path)


@pytest.mark.parametrize("case", _cases("triton_grpc"))
def test_triton_grpc(server: TritonLauncher, case: Grpc) -> None:
    error = grpc_error(server, case)
    assert error is not None, "a bad request was served"
    assert error.status() == case.code, (error.status(), error.message())
    assert case.message in (error.message() or ""), error.message()
    triton_grpc_serves(server, case.model)


def test_every_row_reaches_a_front_end() -> None:
    """The table is the corpus: a row with no request would be a mistake that is never sent."""
    for row in ROWS:
        assert row.gateway or row.triton_http or row.triton_grpc, row.name
    for case in (c for row in ROWS for c in row.triton_grpc):
        assert all(isinstance(a, np.ndarray) for a in case.inputs.values())
