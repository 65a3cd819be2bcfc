"""One real tritonserver per test session, started through the launcher's own code.

It serves every model in ``model_repository/`` (CPU profile) on free ports bound to
127.0.0.1, and is stopped by its own process id (and process group) at the end. A failed
start raises the launcher's error, which quotes the server log.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from serving.launcher import LaunchOptions, TritonLauncher


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
