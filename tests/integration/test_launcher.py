"""The launcher against the real tritonserver: CLI errors, shutdown, supervision, binding."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import tritonclient.http as httpclient

from serving.launcher import LaunchOptions, TritonLauncher, free_port
from serving.stubs import SHM_DIR, find_stubs

ROOT = Path(__file__).resolve().parents[2]
TINY_REPO = ROOT / "tests" / "fixtures" / "launcher_repo"


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serving", "--model-repository", str(TINY_REPO), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def _ports() -> list[str]:
    return [f"--{name}-port={free_port()}" for name in ("http", "grpc", "metrics", "health")]


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _echo(url: str, model: str, value: float) -> float:
    client = httpclient.InferenceServerClient(url)
    inp = httpclient.InferInput("x", [1, 1], "FP32")
    inp.set_data_from_numpy(np.array([[value]], dtype=np.float32))
    return float(client.infer(model, [inp]).as_numpy("y")[0, 0])


class TestCliErrors:
    def test_port_in_use(self) -> None:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            ports = [p for p in _ports() if not p.startswith("--grpc")]
            result = _cli(*ports, f"--grpc-port={port}", "--models=echo")
        assert result.returncode == 1
        assert f"error: port {port} (--grpc-port) is already in use on 127.0.0.1" in result.stderr
        assert "Traceback" not in result.stderr + result.stdout

    def test_model_that_fails_to_load_is_quoted(self, tmp_path: Path) -> None:
        result = _cli(*_ports(), "--models=broken", f"--log-file={tmp_path / 'log'}")
        assert result.returncode == 1
        assert "model 'broken' failed to load" in result.stderr
        assert "weights file /nonexistent/model.bin is missing" in result.stderr
        assert "Traceback" not in result.stderr
        # Nothing is left running: the server started for this attempt was stopped.
        assert not [
            p
            for p in psutil.process_iter(["cmdline"])
            if str(tmp_path) in " ".join(p.info["cmdline"] or [])
        ]

    def test_unknown_model(self) -> None:
        result = _cli(*_ports(), "--models=echo,nope")
        assert result.returncode == 1
        assert "unknown model(s) nope; the repository has broken, echo, echo_twice" in result.stderr


def _cli_process(
    tmp_path: Path,
    model: str,
    ports: list[str],
    python: Sequence[str] = (sys.executable,),
    **popen: object,
) -> Any:
    """``python -m serving`` on the tiny repository with ``model``, its stdout piped;
    ``python`` is the interpreter's command (a wrapper that execs it, say)."""
    return subprocess.Popen(
        [
            *python,
            "-m",
            "serving",
            "--model-repository",
            str(TINY_REPO),
            *ports,
            f"--models={model}",
            f"--log-file={tmp_path / 'log'}",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        **popen,
    )


def _banner(proc: Any, last: str, timeout: float) -> str:
    """What ``python -m serving`` prints up to its line starting with ``last``."""
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if line.startswith(last) or not line:
            break
    return "".join(lines)


def test_cli_serves_prints_endpoints_and_stops_on_sigterm(tmp_path: Path) -> None:
    ports = _ports()
    http_port = ports[0].split("=")[1]
    proc = _cli_process(tmp_path, "echo_twice", ports, stderr=subprocess.PIPE)
    text = _banner(proc, "Ctrl-C", timeout=120)
    assert f"HTTP     http://127.0.0.1:{http_port}" in text
    assert "serving 2 models (cpu profile): echo, echo_twice" in text
    assert _echo(f"127.0.0.1:{http_port}", "echo_twice", 2.5) == 2.5
    server = [c for c in psutil.Process(proc.pid).children() if c.name() == "tritonserver"]
    assert len(server) == 1
    family = [server[0], *server[0].children(recursive=True)]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    _gone, alive = psutil.wait_procs(family, timeout=10)
    assert alive == []


def _launcher_mid_load(tmp_path: Path) -> tuple[subprocess.Popen[str], list[psutil.Process]]:
    """``python -m serving`` loading ``slow_load`` (two minutes), with the server and its
    stub already running: the moment at which a stop used to wait for the load."""
    proc = _cli_process(tmp_path, "slow_load", _ports(), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not proc.stdout.readline().startswith("loading"):
        pass
    family: list[psutil.Process] = []
    while time.monotonic() < deadline:
        family = psutil.Process(proc.pid).children(recursive=True)
        if any("stub" in p.name() for p in family):
            return proc, family
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the slow_load stub never started")


def test_sigterm_while_models_load_stops_everything_within_10s(tmp_path: Path) -> None:
    proc, family = _launcher_mid_load(tmp_path)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    _gone, alive = psutil.wait_procs(family, timeout=max(0.0, 10 - (time.monotonic() - started)))
    assert alive == [], f"still running 10 s after SIGTERM: {[p.name() for p in alive]}"
    assert time.monotonic() - started < 10


def test_sigkilled_launcher_leaves_no_process_behind(tmp_path: Path) -> None:
    proc, family = _launcher_mid_load(tmp_path)
    started = time.monotonic()
    proc.kill()
    proc.wait(timeout=10)
    _gone, alive = psutil.wait_procs(family, timeout=15)
    assert alive == [], f"orphans after SIGKILL: {[(p.pid, p.name()) for p in alive]}"
    assert time.monotonic() - started < 15


@pytest.fixture
def tiny_server(tmp_path: Path) -> Iterator[TritonLauncher]:
    # The supervisor thread is made idle so the test can observe the broken state and
    # then drive one supervision pass itself.
    options = LaunchOptions.on_free_ports(
        repository=TINY_REPO,
        models=["echo_twice"],
        log_path=tmp_path / "log",
        supervise_interval=3600,
    )
    launcher = TritonLauncher(options)
    launcher.start()
    try:
        yield launcher
    finally:
        launcher.stop()


def test_dead_stub_breaks_model_until_supervisor_reloads(tiny_server: TritonLauncher) -> None:
    url = tiny_server.http_url
    status, report = _get(tiny_server.health_url)
    assert status == 200
    assert report["revived"] == {}
    stubs = [s for s in find_stubs(tiny_server.pid) if s.model == "echo"]
    assert len(stubs) == 2  # instance_group count 2
    victim = stubs[0]
    os.kill(victim.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while victim in find_stubs(tiny_server.pid) and time.monotonic() < deadline:
        time.sleep(0.05)

    # What Triton 2.51 does on its own: plain readiness stays 200, the deep check does not.
    assert urllib.request.urlopen(f"http://{url}/v2/health/ready").status == 200
    status, report = _get(tiny_server.health_url)
    assert status == 503
    assert report["models"]["echo"] == "STUB_DEAD"

    assert tiny_server.supervisor.check() == ["echo"]
    assert not (SHM_DIR / victim.shm_region).exists()
    status, report = _get(tiny_server.health_url)
    assert status == 200, report
    assert report["models"] == {"echo": "READY", "echo_twice": "READY"}
    assert report["revived"] == {"echo": 1}  # what each revival leaves behind adds up
    for value in (1.0, 2.0, 3.0, 4.0):  # both instances answer again, through the ensemble
        assert _echo(url, "echo_twice", value) == value


def test_unload_parks_dependent_ensembles_and_load_brings_them_back(
    tiny_server: TritonLauncher,
) -> None:
    tiny_server.unload("echo")
    # Triton took echo_twice down with echo: on purpose, so deep health stays ready.
    status, report = _get(tiny_server.health_url)
    assert status == 200, report
    assert report["models"] == {}
    assert tiny_server.model_states().get("echo_twice") != "READY"
    tiny_server.load("echo")
    status, report = _get(tiny_server.health_url)
    assert status == 200, report
    assert report["models"] == {"echo": "READY", "echo_twice": "READY"}
    assert _echo(tiny_server.http_url, "echo_twice", 5.0) == 5.0


def test_session_server_revives_a_killed_stub_by_itself(server: TritonLauncher) -> None:
    """The real repository: kill the embedding stub, the supervisor thread brings it back."""
    victim = next(s for s in find_stubs(server.pid) if s.model == "embedding")
    os.kill(victim.pid, signal.SIGKILL)
    client = httpclient.InferenceServerClient(server.http_url)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if "embedding" in server.supervisor.reloads and _get(server.health_url)[0] == 200:
            break
        time.sleep(0.5)
    assert "embedding" in server.supervisor.reloads
    assert _get(server.health_url)[0] == 200
    inp = httpclient.InferInput("text", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[b"the stub is back"]], dtype=np.object_))
    vector = client.infer("embedding", [inp]).as_numpy("embedding")
    assert vector.shape == (1, 384)
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-3


def test_everything_listens_on_loopback_only(server: TritonLauncher) -> None:
    family = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
    pids = {p.pid for p in family} | {os.getpid()}
    listening = [
        c
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]
    ports = {c.laddr.port for c in listening}
    expected = {
        server.options.http_port,
        server.options.grpc_port,
        server.options.metrics_port,
        server.options.health_port,
    }
    assert expected <= ports
    not_loopback = {c.laddr.ip for c in listening if not _is_loopback(c.laddr.ip)}
    assert not_loopback == set()


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)  # gRPC listens on ::ffff:127.0.0.1
    return (mapped or addr).is_loopback


#: Runs the rest of argv with SIGINT as given: ``default`` (a terminal's foreground job)
#: or ``ignore`` (a job a non-interactive shell started in the background, such as CI's).
#: An exec, not a preexec_fn: a disposition set to default or ignore survives it.
_SIGINT_AS = (
    "import os, signal, sys; "
    "signal.signal(signal.SIGINT, signal.SIG_IGN if sys.argv[1] == 'ignore' else signal.SIG_DFL); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
)


@pytest.mark.parametrize("sigint", ["default", "ignore"])
def test_sigint_to_the_group_stops_everything_in_order_or_nothing(
    tmp_path: Path, sigint: str
) -> None:
    """``make serve``'s Ctrl-C: a SIGINT to the whole process group. The gateway and Triton
    have groups of their own, so only the launcher acts on it: it stops the gateway, then
    Triton, and exits 0 with no error. Where the launcher ignores SIGINT (started in the
    background by a script) nothing stops: before the gateway had its own group, it alone
    left and the launcher reported that as an error. SIGTERM then stops everything."""
    gateway_port = free_port()
    proc = _cli_process(
        tmp_path,
        "echo",
        [*_ports(), "--gateway", f"--gateway-port={gateway_port}"],
        python=[sys.executable, "-c", _SIGINT_AS, sigint],
        stderr=subprocess.PIPE,
        process_group=0,  # a job of its own: the launcher leads the group, as under make
    )
    family: list[psutil.Process] = []
    try:
        text = _banner(proc, "Ctrl-C stops the gateway", timeout=180)
        assert f"http://127.0.0.1:{gateway_port}/v1" in text, text
        family = psutil.Process(proc.pid).children(recursive=True)
        assert {"tritonserver"} <= {p.name() for p in family}
        gateway = [p for p in family if "gateway" in " ".join(p.cmdline())]
        assert gateway
        os.killpg(proc.pid, signal.SIGINT)
        if sigint == "ignore":
            time.sleep(5)
            assert proc.poll() is None and gateway[0].is_running()
            status, _ = _get(f"http://127.0.0.1:{gateway_port}/health/ready")
            assert status == 200
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
        stderr = proc.stderr.read()  # the gateway's JSON log is here too (uvicorn.error, ...)
        assert not [ln for ln in stderr.splitlines() if ln.startswith("error")], stderr
        _gone, alive = psutil.wait_procs(family, timeout=10)
        assert alive == []
    finally:  # a failed run must not leave a server behind (each has a group of its own)
        if proc.poll() is None:
            proc.kill()
        for process in family:
            with contextlib.suppress(psutil.Error):
                process.kill()
