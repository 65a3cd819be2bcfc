"""One real tritonserver per test session, started through the launcher's own code.

It serves every model in ``model_repository/`` (CPU profile) on free ports bound to
127.0.0.1, and is stopped by its own process id (and process group) at the end. A failed
start raises the launcher's error, which quotes the server log.
"""

from __future__ import annotations

import hashlib
import json
import queue
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from gateway import process as gateway_process
from serving.launcher import LaunchOptions, TritonLauncher, free_port
from tests.integration.bad_inputs import GATEWAY_CLIENT_TIMEOUT, GATEWAY_MAX_BODY, KEY

STREAM_TIMEOUT = 300


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonLauncher]:
    log_path = tmp_path_factory.mktemp("triton") / "server.log"
    launcher = TritonLauncher(LaunchOptions.on_free_ports(log_path=log_path, ready_timeout=900))
    launcher.start()
    try:
        yield launcher
    finally:
        launcher.stop()


def post_json(
    server: TritonLauncher, path: str, body: dict, timeout: float = 300
) -> tuple[int, str]:
    """POST ``body`` as JSON to the server's HTTP endpoint; (status, body text), errors too."""
    request = urllib.request.Request(
        f"http://{server.http_url}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def grpc_input(name: str, array: np.ndarray) -> grpcclient.InferInput:
    dtype = {"O": "BYTES", "i": "INT32", "f": "FP32", "b": "BOOL", "u": "UINT64"}[array.dtype.kind]
    tensor = grpcclient.InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


@contextmanager
def grpc_stream(
    server: TritonLauncher, headers: dict[str, str] | None = None
) -> Iterator[tuple[grpcclient.InferenceServerClient, queue.Queue]]:
    """A gRPC client with an open bidirectional stream; results land in the queue."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results: queue.Queue = queue.Queue()
    client.start_stream(
        callback=lambda result, error: results.put((result, error)), headers=headers
    )
    try:
        yield client, results
    finally:
        client.stop_stream()
        client.close()


def stream_outputs(results: queue.Queue, output: str) -> list[np.ndarray]:
    """Every response's ``output`` until the final flag; raise on an error response."""
    outputs = []
    while True:
        result, error = results.get(timeout=STREAM_TIMEOUT)
        if error is not None:
            raise error
        response = result.get_response()
        array = result.as_numpy(output)
        if array is not None and array.size:
            outputs.append(array)
        if response.parameters["triton_final_response"].bool_param:
            return outputs


@contextmanager
def running_gateway(folder: Path, *args: str) -> Iterator[str]:
    """``python -m gateway *args`` on a free port; its base URL (``.../v1``), stopped by pid."""
    port = free_port()
    log_path = folder / "gateway.log"
    with log_path.open("wb") as log:
        proc = gateway_process.start(
            ["--port", str(port), *args],
            f"http://127.0.0.1:{port}/health/ready",
            stdout=log,
            stderr=log,
        )
        try:
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            gateway_process.stop(proc)
            if proc.returncode not in (0, -15):
                print(log_path.read_text()[-4000:])


def replica(launcher: TritonLauncher) -> dict[str, str]:
    """A topology replica entry for a launched server (its gRPC and deep-health URLs)."""
    return {"url": launcher.grpc_url, "health_url": launcher.health_url}


@contextmanager
def pools_gateway(folder: Path, server: TritonLauncher, small: dict) -> Iterator[str]:
    """A gateway in the pools placement: ``front`` and ``big`` on ``server``, and the
    ``small`` pool (``llm_small``) as given; its base URL."""
    topology = {
        "pools": [
            {
                "name": "front",
                "models": ["intent_classifier", "embedding"],
                "replicas": [replica(server)],
            },
            {"name": "big", "models": ["llm_medium", "llm_large"], "replicas": [replica(server)]},
            {"name": "small", "models": ["llm_small"], **small},
        ]
    }
    path = folder / "topology.yaml"
    path.write_text(json.dumps(topology))  # JSON is YAML
    with running_gateway(folder, "--topology", str(path)) as url:
        yield url


@pytest.fixture(scope="session")
def gateway(server: TritonLauncher, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The session's gateway (single placement, API key ``KEY``) in front of ``server``."""
    folder = tmp_path_factory.mktemp("gateway")
    keys = folder / "keys.yaml"
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    keys.write_text(f"keys:\n  - name: tests\n    sha256: {digest}\n")
    args = ["--triton-grpc", server.grpc_url, "--triton-health", server.health_url]
    args += ["--api-keys", str(keys), "--max-body-bytes", str(GATEWAY_MAX_BODY)]
    args += ["--client-timeout", str(GATEWAY_CLIENT_TIMEOUT)]
    with running_gateway(folder, *args) as url:
        yield url
