"""Start tritonserver on the model repository, load models, supervise stubs, serve deep health.

``python -m serving`` is a thin CLI over :class:`TritonLauncher`; tests and benchmarks use
the class directly, so every server in this project starts the same way.
"""

from __future__ import annotations

import compileall
import contextlib
import errno
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO

from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2

from serving.errors import ConfigError
from serving.repository import DEFAULT_PROFILE, ModelEntry, dependents, load_order, load_repository
from serving.runtime import (
    TritonInstall,
    bundled_install,
    child_command,
    custom_install,
    process_group,
    server_env,
    start_group_reaper,
)
from serving.supervisor import Supervisor

log = logging.getLogger("serving.launcher")

#: Seconds Triton gets to exit by itself when start-up is abandoned (SIGTERM mid-load).
_STARTUP_STOP_TIMEOUT = 3.0

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REPOSITORY = REPO_ROOT / "model_repository"
PROFILES = (DEFAULT_PROFILE, "h100")


class LaunchError(RuntimeError):
    """The server could not be started or a model could not be loaded. The message says why."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free right now on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def check_port_free(host: str, port: int, flag: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like the servers themselves: a port left in TIME_WAIT is free, a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise LaunchError(
                    f"port {port} ({flag}) is already in use on {host}: stop what holds it or "
                    f"choose another with {flag}"
                ) from None
            raise LaunchError(f"cannot bind {host}:{port} ({flag}): {exc.strerror}") from None


@dataclass
class LaunchOptions:
    profile: str = DEFAULT_PROFILE
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    health_port: int = 8003
    models: list[str] | None = None
    repository: Path = DEFAULT_REPOSITORY
    log_path: Path | None = None
    tritonserver: Path | None = None
    ready_timeout: float = 600.0
    supervise_interval: float = 1.0
    log_verbose: int = 0
    #: On stop, how long Triton lets requests in flight (streams) finish before it exits
    #: (its --exit-timeout-secs); Kubernetes' terminationGracePeriodSeconds must exceed it.
    drain_timeout: float = 30.0
    #: Also copy the server log to this process's stdout, line by line (containers:
    #: `kubectl logs` shows what only the log file held). The file stays the source for
    #: the error excerpts LaunchError quotes.
    echo_log: bool = False
    #: Per model, the GPUs its instances use *as this process sees them* (a container or
    #: pod given GPUs 2 and 3 sees them as 0 and 1): replaces the config's gpu_device_ids
    #: when the model is loaded, so one repository serves every pool layout.
    gpu_device_ids: dict[str, str] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)

    @classmethod
    def on_free_ports(cls, **kwargs: object) -> LaunchOptions:
        """Options with every port picked free (tests, benchmarks, several replicas)."""
        host = str(kwargs.get("host", "127.0.0.1"))
        ports = {
            name: free_port(host)
            for name in ("http_port", "grpc_port", "metrics_port", "health_port")
        }
        return cls(**{**ports, **kwargs})


def compile_python_models(repository: Path) -> None:
    """Write the bytecode of every Python model's files before Triton starts.

    The Python backend's stub imports ``model.py`` and writes ``__pycache__`` beside it;
    Triton sees the version folder changed and, when an ensemble on that model is loaded
    next, loads the model again. On a fresh clone that loaded every model twice (the
    ``llm_small_text`` chain 66-71 s against 36.5 once compiled). With valid bytecode in
    place the stub writes nothing. A read-only repository is left as it is: its stubs
    cannot write either.
    """
    for version in sorted(Path(repository).glob("*/*")):
        if version.is_dir() and version.name.isdigit():
            with contextlib.suppress(OSError):
                compileall.compile_dir(version, quiet=2)


def gpu_override(config: model_config_pb2.ModelConfig, ids: str) -> dict:
    """``config`` as Triton's JSON load override, with its instances on ``ids``.

    A TensorRT-LLM tier takes ``ids`` in its ``gpu_device_ids`` syntax (GPUs of one
    instance joined by ``,``, instances by ``;``); the backend places the instances itself,
    so only the instance count and (for several instances) the orchestrator worker follow.
    A ``KIND_GPU`` model (embedding) takes a ``,`` list for its instance groups' ``gpus``.
    """
    data = json_format.MessageToDict(config, preserving_proto_field_name=True)
    groups = data.get("instance_group", [])
    if "gpu_device_ids" in config.parameters:
        if not re.fullmatch(r"\d+(,\d+)*(;\d+(,\d+)*)*", ids):
            raise LaunchError(f"gpu_device_ids {ids!r} is not like '0,1;2,3'")
        params = data["parameters"]
        params["gpu_device_ids"] = {"string_value": ids}
        instances = ids.count(";") + 1
        for group in groups:
            group["count"] = instances
        if instances == 1:
            params.pop("executor_worker_path", None)
        return data
    gpu_groups = [g for g in groups if g.get("kind") == "KIND_GPU"]
    if not gpu_groups:
        raise LaunchError(
            f"model '{config.name}' has no gpu_device_ids parameter and no KIND_GPU instances: "
            "it runs on no GPU to place"
        )
    if not re.fullmatch(r"\d+(,\d+)*", ids):
        raise LaunchError(f"GPUs {ids!r} for '{config.name}' are not like '0' or '0,1'")
    for group in gpu_groups:
        group["gpus"] = [int(g) for g in ids.split(",")]
    return data


def requests_succeeded(metrics_text: str, model: str) -> float:
    """Sum of Triton's ``nv_inference_request_success`` for ``model`` (all versions) in a
    Prometheus text page: how many requests that model completed in that server."""
    prefix = f'nv_inference_request_success{{model="{model}"'
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics_text.splitlines()
        if line.startswith(prefix)
    )


class TritonLauncher:
    """One tritonserver process with explicit model control, a supervisor and a health endpoint."""

    def __init__(self, options: LaunchOptions) -> None:
        if options.profile not in PROFILES:
            raise LaunchError(
                f"unknown profile '{options.profile}'; choose one of {', '.join(PROFILES)}"
            )
        self.options = options
        self.models: dict[str, ModelEntry] = {}
        self.wanted: list[str] = []
        self._parked: set[str] = set()
        self.process: subprocess.Popen[bytes] | None = None
        self._reaper: subprocess.Popen[bytes] | None = None
        self.supervisor: Supervisor | None = None
        self._health: ThreadingHTTPServer | None = None
        self._loading = False
        self._log_file = None
        self._echo: threading.Thread | None = None
        self._echo_stop = threading.Event()
        self._lock = threading.RLock()

    # ----------------------------------------------------------------- addresses
    @property
    def http_url(self) -> str:
        return f"{self.options.host}:{self.options.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.options.host}:{self.options.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.options.host}:{self.options.metrics_port}/metrics"

    @property
    def health_url(self) -> str:
        return f"http://{self.options.host}:{self.options.health_port}/health/ready"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def log_path(self) -> Path:
        if self.options.log_path is None:
            raise LaunchError("no log path set")
        return self.options.log_path

    # ----------------------------------------------------------------- lifecycle
    def _install(self) -> TritonInstall:
        try:
            if self.options.tritonserver:
                return custom_install(self.options.tritonserver)
            return bundled_install()
        except ConfigError as exc:
            raise LaunchError(str(exc)) from None

    def _command(self, install: TritonInstall) -> list[str]:
        o = self.options
        cmd = [
            str(install.binary),
            f"--model-repository={o.repository}",
            f"--backend-directory={install.backend_dir}",
            "--model-control-mode=explicit",
            # Model readiness is the deep check's job (it knows which models are wanted);
            # strict readiness would also fail while a model is unloaded on purpose.
            "--strict-readiness=false",
            "--exit-on-error=false",
            f"--http-address={o.host}",
            f"--http-port={o.http_port}",
            f"--grpc-address={o.host}",
            f"--grpc-port={o.grpc_port}",
            f"--metrics-address={o.host}",
            f"--metrics-port={o.metrics_port}",
            # GPU metrics (nv_gpu_utilization, nv_gpu_memory_used_bytes, ...) only where
            # there are GPUs: the CPU profile would only log NVML/DCGM failures.
            f"--allow-gpu-metrics={'false' if o.profile == DEFAULT_PROFILE else 'true'}",
            f"--exit-timeout-secs={math.ceil(o.drain_timeout)}",
            f"--log-verbose={o.log_verbose}",
        ]
        if o.profile != DEFAULT_PROFILE:
            cmd.append(f"--model-config-name={o.profile}")
        return cmd + list(o.extra_args)

    def _env(self, install: TritonInstall) -> dict[str, str]:
        env = server_env(install)
        if self.options.profile != DEFAULT_PROFILE:
            # Tiers with several instances (gpu_device_ids "6;7") need the tensorrtllm
            # backend's orchestrator mode, as the trtllm image and the Kubernetes manifest set.
            env.setdefault("TRTLLM_ORCHESTRATOR", "1")
        return env

    def start(self, on_progress: Callable[[str], None] | None = None) -> None:
        """Start the server, load the models in dependency order, start supervision.

        Blocks until everything is loaded; raises :class:`LaunchError` with the reason
        (the failing model's error, quoted from the server log) and leaves nothing running.
        """
        progress = on_progress or (lambda _msg: None)
        o = self.options
        try:
            self.models = load_repository(Path(o.repository), o.profile)
            waves = load_order(self.models, o.models)
        except ConfigError as exc:
            raise LaunchError(str(exc)) from None
        if o.profile != DEFAULT_PROFILE:
            self._preflight()
        for flag, port in (
            ("--http-port", o.http_port),
            ("--grpc-port", o.grpc_port),
            ("--metrics-port", o.metrics_port),
        ):
            check_port_free(o.host, port, flag)
        self.wanted = [m for wave in waves for m in wave]
        # The health port is held from here on, not bound after the loads: a port picked
        # free minutes earlier can meanwhile become some client's ephemeral port (it did,
        # in CI). Until the models are loaded, /health/ready answers 503 "loading".
        self._start_health_server()
        try:
            self._start_server(waves, progress)
            self._loading = False
        except BaseException:
            # Nothing is served yet, so nothing to drain: Triton's own graceful exit would
            # wait for the loads in progress, so it gets a few seconds, then SIGKILL.
            self.stop(timeout=_STARTUP_STOP_TIMEOUT)
            raise

    def _start_server(self, waves: list[list[str]], progress: Callable[[str], None]) -> None:
        o = self.options
        install = self._install()
        if o.log_path is None:
            o.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"tritonserver-{o.http_port}.log"
        o.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(o.log_path, "wb")  # noqa: SIM115 (lives as long as the server)
        compile_python_models(Path(o.repository))
        progress(f"starting tritonserver (log: {o.log_path})")
        self.process = subprocess.Popen(
            # It must not outlive a launcher killed with SIGKILL: the kernel then SIGKILLs
            # it too. Not SIGTERM: Triton's graceful exit waits for loads in progress
            # (minutes for the tiers), and an unasked death has nothing to drain.
            child_command(self._command(install), death_signal=signal.SIGKILL),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=self._env(install),
            # Its own process group (Ctrl-C at the terminal does not reach it; stop()
            # ends the group), in this session so the reaper below can join the group.
            **process_group(),
        )
        # SIGKILLs tritonserver's whole group (its stubs too) if this process dies unasked.
        self._reaper = start_group_reaper(self.process.pid)
        if o.echo_log:
            self._echo_stop.clear()
            self._echo = threading.Thread(target=self._echo_log, name="log-echo", daemon=True)
            self._echo.start()
        self._wait_server_ready(time.monotonic() + o.ready_timeout)
        for wave in waves:
            progress(f"loading {', '.join(wave)}")
            self._load_wave(wave)
        self.supervisor = Supervisor(self, interval=o.supervise_interval)
        self.supervisor.start()

    def _preflight(self) -> None:
        """Refuse to serve TensorRT-LLM engines built by another TensorRT-LLM version."""
        from build_engines.manifest import check_engines_for_serving

        problems = check_engines_for_serving(Path(self.options.repository))
        if problems:
            raise LaunchError("refusing to serve the h100 profile:\n  " + "\n  ".join(problems))

    def stop(self, timeout: float | None = None) -> None:
        """Stop supervision, then the server and its stubs (the whole process group).

        Triton gets its drain time (``drain_timeout``) plus a margin before SIGKILL.
        """
        if timeout is None:
            timeout = self.options.drain_timeout + 10.0
        with self._lock:
            if self.supervisor:
                self.supervisor.stop()
            if self._health:
                self._health.shutdown()
                self._health.server_close()
                self._health = None
            proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not exit in %.0fs; killing it", timeout)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reaper, self._reaper = self._reaper, None
        if reaper is not None:  # in the group, so killed above; reap its exit status
            with contextlib.suppress(ProcessLookupError):
                reaper.kill()
            reaper.wait()
        if self.supervisor:
            self.supervisor.clean_shm()
            self.supervisor = None
        if self._echo is not None:
            self._echo_stop.set()  # it copies what is left, then returns
            self._echo.join(timeout=5)
            self._echo = None
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    def _echo_log(self, out: BinaryIO | None = None) -> None:
        """Copy the server log to ``out`` (stdout) as it grows, until stopped and drained."""
        out = out or sys.stdout.buffer
        with open(self.log_path, "rb") as log_file:
            while True:
                line = log_file.readline()
                if line:
                    out.write(line)
                    out.flush()
                elif self._echo_stop.is_set():
                    return
                else:
                    self._echo_stop.wait(0.2)

    def __enter__(self) -> TritonLauncher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- server API
    def _request(
        self, method: str, path: str, body: dict | None = None, timeout: float = 600.0
    ) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://{self.http_url}{path}", data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else {}
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw) if raw else {}
            except json.JSONDecodeError:
                return exc.code, {"error": raw.decode(errors="replace")}

    def _wait_server_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise LaunchError("tritonserver exited during start-up:\n" + self.log_tail())
            with contextlib.suppress(OSError):
                if self._request("GET", "/v2/health/ready", timeout=2)[0] == 200:
                    return
            time.sleep(0.2)
        raise LaunchError(
            f"tritonserver not ready after {self.options.ready_timeout:.0f}s:\n" + self.log_tail()
        )

    def _load_wave(self, wave: list[str]) -> None:
        pool = ThreadPoolExecutor(max_workers=len(wave), thread_name_prefix="load")
        try:
            errors = [e for e in pool.map(self._load_one, wave) if e]
        finally:
            # Never wait here for loads still running: on SIGTERM or Ctrl-C mid-load the
            # caller stops the server, which ends those requests at once. (A `with` block
            # would wait for every load to finish, about 90 s for the LLM tiers.)
            pool.shutdown(wait=False, cancel_futures=True)
        if errors:
            raise LaunchError("\n".join(errors))

    def _load_one(self, model: str) -> str | None:
        override = None
        if model in self.options.gpu_device_ids and model in self.models:
            config = gpu_override(self.models[model].config, self.options.gpu_device_ids[model])
            override = {"parameters": {"config": json.dumps(config)}}
        status, body = self._request("POST", f"/v2/repository/models/{model}/load", override)
        if status == 200:
            return None
        return f"model '{model}' failed to load: {body.get('error', status)}" + self._log_lines(
            model
        )

    def _must_load(self, model: str) -> None:
        error = self._load_one(model)
        if error:
            raise LaunchError(error)

    def _log_lines(self, model: str, limit: int = 8) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        hits = [ln for ln in lines if model in ln and (ln[:1] == "E" or "rror" in ln)][-limit:]
        return ("\n  server log:\n    " + "\n    ".join(hits)) if hits else ""

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, LaunchError):
            return "(no server log)"

    def load(self, model: str) -> None:
        """Load ``model``, then the ensembles on it that are wanted or were taken down with it."""
        with self._lock:
            self._must_load(model)
            if model not in self.wanted:
                self.wanted.append(model)
            for dep in dependents(self.models, model):
                if dep in self.wanted or dep in self._parked:
                    self._must_load(dep)
                    self._parked.discard(dep)
                    if dep not in self.wanted:
                        self.wanted.append(dep)
            if self.supervisor:
                self.supervisor.refresh()

    def unload(self, model: str) -> None:
        """Unload ``model`` on purpose: the supervisor and deep health stop expecting it.

        Triton also takes down the ensembles built on it; they are parked, not expected,
        until :meth:`load` brings ``model`` back.
        """
        with self._lock:
            status, body = self._request("POST", f"/v2/repository/models/{model}/unload")
            if status != 200:
                raise LaunchError(f"unloading '{model}' failed: {body.get('error', status)}")
            for name in [model, *dependents(self.models, model)]:
                if name in self.wanted:
                    self.wanted.remove(name)
                    if name != model:
                        self._parked.add(name)
            if self.supervisor:
                self.supervisor.refresh()

    def reload(self, model: str) -> None:
        """Unload then load ``model``, then reload the wanted ensembles built on it.

        A plain load does not revive a model whose stub died; unload + load does.
        """
        with self._lock:
            self._request("POST", f"/v2/repository/models/{model}/unload")
            self._must_load(model)
            for dep in dependents(self.models, model):
                if dep in self.wanted:
                    self._request("POST", f"/v2/repository/models/{dep}/unload")
                    self._must_load(dep)

    def model_states(self) -> dict[str, str]:
        """Triton's repository index: model name -> state (READY, UNAVAILABLE, ...)."""
        status, body = self._request("POST", "/v2/repository/index", {}, timeout=5)
        if status != 200 or not isinstance(body, list):
            raise LaunchError(f"repository index failed: {status}")
        return {m["name"]: m.get("state", "") for m in body}

    def requests_succeeded(self, model: str) -> float:
        """Requests ``model`` completed in this server so far (its metrics endpoint): which
        replica served how many, for tests and benchmarks behind a balancer."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            return requests_succeeded(response.read().decode(), model)

    # ----------------------------------------------------------------- deep health
    def deep_health(self) -> tuple[bool, dict]:
        """Ready only if the server answers, every wanted model is READY and no stub is dead.

        ``revived`` counts, per model, the reloads after a dead stub since the server
        started: each leaves some of the dead instance's memory behind in tritonserver
        (about 2.5 MiB for a stub killed with 16 answers streaming; docs/reliability.md),
        so a replica with many is one to roll.
        """
        revived = Counter(self.supervisor.reloads) if self.supervisor else Counter()
        report: dict = {"server": "down", "models": {}, "broken": [], "revived": dict(revived)}
        if self._loading:
            report["server"] = "loading"
            return False, report
        if self.process is None or self.process.poll() is not None:
            return False, report
        try:
            if self._request("GET", "/v2/health/ready", timeout=2)[0] != 200:
                report["server"] = "not ready"
                return False, report
            states = self.model_states()
        except (OSError, LaunchError) as exc:
            report["server"] = f"unreachable: {exc}"
            return False, report
        report["server"] = "ready"
        broken = set(self.supervisor.broken()) if self.supervisor else set()
        for model in self.wanted:
            state = states.get(model, "MISSING")
            if model in broken:
                state = "STUB_DEAD"
            report["models"][model] = state
            if state != "READY":
                report["broken"].append(model)
        return not report["broken"], report

    def _start_health_server(self) -> None:
        launcher = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/health/ready":
                    ok, report = launcher.deep_health()
                elif self.path.rstrip("/") == "/health/live":
                    ok = launcher.process is not None and launcher.process.poll() is None
                    report = {"live": ok}
                else:
                    self.send_error(404, "try /health/ready or /health/live")
                    return
                body = json.dumps(report).encode()
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: object) -> None:
                log.debug("health: " + fmt, *args)

        o = self.options
        try:
            self._health = ThreadingHTTPServer((o.host, o.health_port), Handler)
        except OSError as exc:
            # check_port_free's wording, for the port this process binds itself.
            check_port_free(o.host, o.health_port, "--health-port")
            raise LaunchError(
                f"cannot serve health on {o.host}:{o.health_port}: {exc.strerror}"
            ) from None
        self._loading = True
        self._health.daemon_threads = True
        threading.Thread(target=self._health.serve_forever, name="health", daemon=True).start()
