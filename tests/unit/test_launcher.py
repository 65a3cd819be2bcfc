"""Launcher pieces that need no server: repository order, stub discovery, runtime, ports."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from serving import runtime
from serving.errors import ConfigError
from serving.launcher import (
    LaunchError,
    LaunchOptions,
    TritonLauncher,
    check_port_free,
    compile_python_models,
    requests_succeeded,
)
from serving.repository import configured_copy, dependents, load_order, load_repository
from serving.stubs import find_stubs, parse_cmdline, remove_shm_region

PY_MODEL = 'name: "{name}"\nbackend: "python"\nmax_batch_size: 4\n'
ENSEMBLE = (
    'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: 4\nensemble_scheduling {{ {steps} }}\n'
)
STEP = 'step {{ model_name: "{model}" model_version: -1 }}'


def _model(root: Path, name: str, text: str, profile_text: str | None = None) -> None:
    (root / name / "1").mkdir(parents=True)
    (root / name / "config.pbtxt").write_text(text)
    if profile_text is not None:
        (root / name / "configs").mkdir()
        (root / name / "configs" / "h100.pbtxt").write_text(profile_text)


def _ensemble(name: str, *steps: str) -> str:
    return ENSEMBLE.format(name=name, steps=" ".join(STEP.format(model=s) for s in steps))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    _model(tmp_path, "embedding", PY_MODEL.format(name="embedding"))
    _model(tmp_path, "head", PY_MODEL.format(name="head"))
    _model(tmp_path, "classifier", _ensemble("classifier", "embedding", "head"))
    _model(tmp_path, "outer", _ensemble("outer", "classifier"))
    _model(
        tmp_path,
        "llm",
        PY_MODEL.format(name="llm"),
        'name: "llm"\nbackend: "tensorrtllm"\nmax_batch_size: 64\n',
    )
    (tmp_path / "not_a_model").mkdir()
    return tmp_path


class TestRepository:
    def test_models_and_profiles(self, repo: Path) -> None:
        cpu = load_repository(repo)
        assert sorted(cpu) == ["classifier", "embedding", "head", "llm", "outer"]
        assert cpu["llm"].config.backend == "python"
        assert load_repository(repo, "h100")["llm"].config.backend == "tensorrtllm"
        # A model without an h100 file falls back to config.pbtxt, as Triton does.
        assert load_repository(repo, "h100")["head"].config.backend == "python"

    def test_waves_respect_ensemble_dependencies(self, repo: Path) -> None:
        waves = load_order(load_repository(repo))
        assert waves == [["embedding", "head", "llm"], ["classifier"], ["outer"]]

    def test_subset_is_closed_over_dependencies(self, repo: Path) -> None:
        assert load_order(load_repository(repo), ["outer"]) == [
            ["embedding", "head"],
            ["classifier"],
            ["outer"],
        ]

    def test_unknown_model_lists_what_exists(self, repo: Path) -> None:
        with pytest.raises(ConfigError, match=r"unknown model\(s\) nope; the repository has"):
            load_order(load_repository(repo), ["nope"])

    def test_cycle_and_missing_step(self, tmp_path: Path) -> None:
        _model(tmp_path, "a", _ensemble("a", "b"))
        _model(tmp_path, "b", _ensemble("b", "a"))
        _model(tmp_path, "c", _ensemble("c", "ghost"))
        models = load_repository(tmp_path)
        with pytest.raises(ConfigError, match="cycle"):
            load_order(models, ["a"])
        with pytest.raises(ConfigError, match="uses 'ghost', which is not in the repository"):
            load_order(models, ["c"])

    def test_dependents_are_transitive(self, repo: Path) -> None:
        assert dependents(load_repository(repo), "embedding") == ["classifier", "outer"]
        assert dependents(load_repository(repo), "llm") == []

    def test_bad_config_is_a_clear_error(self, tmp_path: Path) -> None:
        _model(tmp_path, "broken", "name: 'broken'\nmax_batch_size: lots\n")
        with pytest.raises(
            ConfigError, match=r"broken/config\.pbtxt: not a valid Triton ModelConfig"
        ):
            load_repository(tmp_path)

    def test_name_must_match_folder(self, tmp_path: Path) -> None:
        _model(tmp_path, "x", PY_MODEL.format(name="y"))
        with pytest.raises(ConfigError, match="name 'y' differs from its folder 'x'"):
            load_repository(tmp_path)


def _fake_proc(root: Path, pid: int, ppid: int, argv: list[str], state: str = "S") -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "stat").write_text(f"{pid} (stub with ) space) {state} {ppid} 1 1 0\n")
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")


def _stub_argv(model: str, instance: str, region: str) -> list[str]:
    return [
        "/cache/backends/x/python/triton_python_backend_stub",
        f"/repo/{model}/1/model.py",
        region,
        "1048576",
        "1048576",
        "100",
        "/cache/backends/x/python",
        "336",
        instance,
        "DEFAULT",
    ]


class TestStubs:
    def test_parse_names_model_from_path(self) -> None:
        # One instance is named m_0, several m_0_0, m_0_1: the path is what names the model.
        assert parse_cmdline(_stub_argv("llm_small_1", "llm_small_1_0", "region")) == (
            "llm_small_1",
            "llm_small_1_0",
            "region",
        )
        assert parse_cmdline(["/usr/bin/python3", "x"]) is None

    def test_find_only_children_of_the_server(self, tmp_path: Path) -> None:
        _fake_proc(tmp_path, 201, 100, _stub_argv("embedding", "embedding_0_0", "r1"))
        _fake_proc(tmp_path, 202, 100, _stub_argv("embedding", "embedding_0_1", "r2"))
        _fake_proc(tmp_path, 203, 999, _stub_argv("other", "other_0", "r3"))
        _fake_proc(tmp_path, 204, 100, ["/bin/sleep", "1"])
        _fake_proc(tmp_path, 205, 100, _stub_argv("embedding", "embedding_0_2", "r5"), state="Z")
        _fake_proc(tmp_path, 206, 100, _stub_argv("embedding", "embedding", "r6"))  # auto-complete
        (tmp_path / "self").mkdir()
        stubs = sorted(find_stubs(100, tmp_path), key=lambda s: s.pid)
        assert [(s.pid, s.model, s.shm_region) for s in stubs] == [
            (201, "embedding", "r1"),
            (202, "embedding", "r2"),
        ]

    def test_remove_shm_region_only_touches_triton_regions(self, tmp_path: Path) -> None:
        region = tmp_path / "triton_python_backend_shm_region_abc"
        region.write_bytes(b"x")
        other = tmp_path / "postgres"
        other.write_bytes(b"x")
        assert remove_shm_region("triton_python_backend_shm_region_abc", tmp_path)
        assert not region.exists()
        assert not remove_shm_region("postgres", tmp_path)
        assert not remove_shm_region("../triton_python_backend_shm_region_x", tmp_path)
        assert other.exists()
        assert not remove_shm_region("triton_python_backend_shm_region_gone", tmp_path)


class TestRuntime:
    def test_bundled_install_has_stub_for_this_python(self) -> None:
        install = runtime.bundled_install()
        assert install.binary.is_file()
        assert (install.backend_dir / "python" / "libtriton_python.so").is_file()
        assert (install.backend_dir / "python" / runtime.STUB_NAME).is_file()

    def test_missing_stub_version_is_explained(self) -> None:
        with pytest.raises(
            ConfigError, match=r"no Python backend stub for Python 2\.7 .*ships 3\.1"
        ):
            runtime.bundled_install("2.7")

    def test_env_puts_this_interpreter_first(self) -> None:
        install = runtime.bundled_install()
        env = runtime.server_env(install, {"PATH": "/usr/bin", "PYTHONPATH": "/x"})
        assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
        assert str(install.libs) in env["LD_LIBRARY_PATH"]
        assert env["HF_HUB_OFFLINE"] == "1"

    def test_custom_binary_missing(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="tritonserver binary not found"):
            runtime.custom_install(tmp_path / "tritonserver")


class TestPortsAndOptions:
    def test_port_in_use_is_named(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            port = sock.getsockname()[1]
            with pytest.raises(
                LaunchError, match=f"port {port} \\(--grpc-port\\) is already in use"
            ):
                check_port_free("127.0.0.1", port, "--grpc-port")

    def test_free_ports_are_distinct_and_loopback(self) -> None:
        o = LaunchOptions.on_free_ports(models=["embedding"])
        ports = {o.http_port, o.grpc_port, o.metrics_port, o.health_port}
        assert len(ports) == 4
        assert o.host == "127.0.0.1"
        assert o.models == ["embedding"]

    def test_unknown_profile(self) -> None:
        with pytest.raises(LaunchError, match="unknown profile 'tpu'"):
            TritonLauncher(LaunchOptions(profile="tpu"))

    def test_unknown_model_fails_before_starting(self, repo: Path) -> None:
        launcher = TritonLauncher(LaunchOptions.on_free_ports(repository=repo, models=["nope"]))
        with pytest.raises(LaunchError, match="unknown model"):
            launcher.start()
        assert launcher.process is None

    def test_health_port_in_use_is_named_before_starting(self, repo: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            port = sock.getsockname()[1]
            options = LaunchOptions.on_free_ports(repository=repo, health_port=port)
            launcher = TritonLauncher(options)
            with pytest.raises(LaunchError, match=f"port {port} \\(--health-port\\) is already"):
                launcher.start()
        assert launcher.process is None

    def test_health_port_is_held_and_answers_loading_while_models_load(
        self, repo: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Bound only after the loads, a port picked free minutes before could meanwhile be
        # taken (a client's ephemeral port did, in CI): it is held from the start instead.
        launcher = TritonLauncher(LaunchOptions.on_free_ports(repository=repo))
        seen: list[tuple[int, dict]] = []

        def loading(waves: list[list[str]], progress: object) -> None:
            with pytest.raises(LaunchError, match="--health-port"):
                check_port_free("127.0.0.1", launcher.options.health_port, "--health-port")
            try:
                urllib.request.urlopen(launcher.health_url, timeout=5)
            except urllib.error.HTTPError as exc:
                seen.append((exc.code, json.loads(exc.read())))

        monkeypatch.setattr(launcher, "_start_server", loading)
        try:
            launcher.start()
            assert seen == [(503, {**seen[0][1], "server": "loading"})]
            assert sorted(launcher.wanted) == ["classifier", "embedding", "head", "llm", "outer"]
            # Loaded: the deep check takes over (no server process here, so "down").
            assert launcher.deep_health()[1]["server"] == "down"
        finally:
            launcher.stop()
        check_port_free("127.0.0.1", launcher.options.health_port, "--health-port")

    def test_h100_profile_refuses_engines_it_cannot_serve(self) -> None:
        # No TensorRT-LLM (or engines) on this machine: the launcher says so before starting.
        launcher = TritonLauncher(LaunchOptions.on_free_ports(profile="h100"))
        with pytest.raises(LaunchError, match="refusing to serve the h100 profile") as info:
            launcher.start()
        assert "llm_small" in str(info.value)
        assert launcher.process is None


class TestContainerOptions:
    """What the cluster manifests rely on: a drain window, GPU metrics, the log on stdout."""

    INSTALL = runtime.TritonInstall(Path("/bin/tritonserver"), None, Path("/backends"))

    def test_drain_timeout_is_tritons_exit_timeout(self) -> None:
        cmd = TritonLauncher(LaunchOptions(drain_timeout=179.5))._command(self.INSTALL)
        assert "--exit-timeout-secs=180" in cmd

    @pytest.mark.parametrize(("profile", "flag"), [("cpu", "false"), ("h100", "true")])
    def test_gpu_metrics_only_in_the_gpu_profile(self, profile: str, flag: str) -> None:
        cmd = TritonLauncher(LaunchOptions(profile=profile))._command(self.INSTALL)
        assert f"--allow-gpu-metrics={flag}" in cmd

    def test_log_echo_copies_what_is_written_then_stops(self, tmp_path: Path) -> None:
        import io
        import threading

        log = tmp_path / "server.log"
        log.write_bytes(b"I0101 first\n")
        launcher = TritonLauncher(LaunchOptions(log_path=log, echo_log=True))
        out = io.BytesIO()
        thread = threading.Thread(target=launcher._echo_log, args=(out,))
        thread.start()
        with log.open("ab") as f:
            f.write(b"E0101 second\n")
        launcher._echo_stop.set()
        thread.join(timeout=5)
        assert not thread.is_alive()
        assert out.getvalue() == b"I0101 first\nE0101 second\n"


class TestGpuOverride:
    """--gpu-device-ids: a pool's container places a tier on the GPUs it sees."""

    def config(self):
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2

        from build_engines.render import tier_config
        from build_engines.spec import tier_specs

        spec = next(s for s in tier_specs() if s.tier == "llm_small")
        text = tier_config(spec, "6;7")
        return text_format.Parse(text, model_config_pb2.ModelConfig())

    def test_one_instance_on_the_containers_gpus(self) -> None:
        from serving.launcher import gpu_override

        base = self.config()
        assert base.instance_group[0].count == 2 and "executor_worker_path" in base.parameters
        data = gpu_override(base, "0,1")
        assert data["parameters"]["gpu_device_ids"] == {"string_value": "0,1"}
        assert data["instance_group"][0]["count"] == 1
        assert "executor_worker_path" not in data["parameters"]
        assert data["name"] == "llm_small" and data["backend"] == "tensorrtllm"

    def test_rejects_models_without_gpus_and_bad_ids(self) -> None:
        from tritonclient.grpc import model_config_pb2

        from serving.launcher import gpu_override

        with pytest.raises(LaunchError, match="no GPU to place"):
            gpu_override(model_config_pb2.ModelConfig(name="intent_head"), "0")
        with pytest.raises(LaunchError, match="not like"):
            gpu_override(self.config(), "0;;1")

    def test_embedding_instances_move_to_the_containers_gpu(self) -> None:
        from serving.launcher import gpu_override
        from serving.repository import parse_config

        root = Path(__file__).resolve().parents[2] / "model_repository"
        embedding = parse_config(root / "embedding" / "configs" / "h100.pbtxt")
        assert list(embedding.instance_group[0].gpus) == [4]  # the node-wide plan
        data = gpu_override(embedding, "0")
        assert data["instance_group"][0]["gpus"] == [0]
        assert data["instance_group"][0]["count"] == 4  # instances kept
        with pytest.raises(LaunchError, match="not like"):
            gpu_override(embedding, "0;1")

    def test_cli_parses_and_refuses_malformed_pairs(self) -> None:
        from serving.__main__ import parse_args

        args = parse_args(["--gpu-device-ids", "llm_medium=0,1", "--gpu-device-ids", "llm_small=2"])
        assert dict(args.gpu_device_ids) == {"llm_medium": "0,1", "llm_small": "2"}
        with pytest.raises(SystemExit):
            parse_args(["--gpu-device-ids", "llm_medium"])


class TestRunForeground:
    """How python -m serving and make cluster stop: errors, Ctrl-C, SIGTERM, cleanup."""

    def run(self, body):
        import signal as signal_module

        from serving.runtime import run_foreground

        cleaned = []
        previous = signal_module.getsignal(signal_module.SIGTERM)
        try:
            code = run_foreground(body, lambda: cleaned.append(True), (LaunchError,))
            handler = signal_module.getsignal(signal_module.SIGTERM)
        finally:
            signal_module.signal(signal_module.SIGTERM, previous)
        return code, cleaned, handler

    def test_error_is_one_line_and_exit_1(self, capsys: pytest.CaptureFixture[str]) -> None:
        def body() -> int:
            raise LaunchError("port 8001 is already in use")

        code, cleaned, _ = self.run(body)
        assert (code, cleaned) == (1, [True])
        assert capsys.readouterr().err == "error: port 8001 is already in use\n"

    def test_sigterm_stops_like_ctrl_c(self) -> None:
        import os
        import signal as signal_module

        def body() -> int:
            os.kill(os.getpid(), signal_module.SIGTERM)
            return 5  # not reached: the handler raises KeyboardInterrupt

        code, cleaned, handler = self.run(body)
        assert (code, cleaned) == (0, [True])
        assert handler is not signal_module.SIG_DFL

    def test_body_result_is_the_exit_code(self) -> None:
        assert self.run(lambda: 3)[:2] == (3, [True])


class TestSupervisor:
    """Stubs are counted by instance: a replaced stub lingering a moment is not a death."""

    class _Launcher:
        pid = 100

        def __init__(self) -> None:
            self.wanted = ["llm_medium", "embedding"]
            self._lock = threading.RLock()
            self.reloaded: list[str] = []

        def reload(self, model: str) -> None:
            self.reloaded.append(model)

    def test_a_replaced_stub_exiting_late_is_not_a_death(self, monkeypatch) -> None:
        from serving import supervisor as sup
        from serving.stubs import Stub

        old = Stub(1, "llm_medium", "llm_medium_0_0", "r-old")
        new = Stub(2, "llm_medium", "llm_medium_0_0", "r-new")
        emb = [
            Stub(3, "embedding", "embedding_0_0", "r3"),
            Stub(4, "embedding", "embedding_0_1", "r4"),
        ]
        live = [old, new, *emb]
        monkeypatch.setattr(sup, "find_stubs", lambda pid: list(live))
        monkeypatch.setattr(sup, "remove_shm_region", lambda region: True)
        launcher = self._Launcher()
        supervisor = sup.Supervisor(launcher)  # type: ignore[arg-type]
        supervisor.refresh()
        assert supervisor.expected == {"llm_medium": 1, "embedding": 2}
        live.remove(old)  # the reload's old stub exits a moment after the load call
        assert supervisor.check() == [] and supervisor.broken() == []
        live.remove(emb[1])  # a real death: one of embedding's two instances is gone
        assert supervisor.broken() == ["embedding"]
        assert supervisor.check() == ["embedding"] and launcher.reloaded == ["embedding"]

    def test_a_dead_server_is_reported_once_and_nothing_is_reloaded(
        self, monkeypatch, caplog
    ) -> None:
        from serving import supervisor as sup
        from serving.stubs import Stub

        live = [Stub(1, "llm_medium", "llm_medium_0_0", "r1")]
        monkeypatch.setattr(sup, "find_stubs", lambda pid: list(live))
        launcher = self._Launcher()
        launcher.process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(9)"])  # type: ignore[attr-defined]
        launcher.process.wait()  # type: ignore[attr-defined]
        supervisor = sup.Supervisor(launcher)  # type: ignore[arg-type]
        supervisor.refresh()
        live.clear()  # SIGKILL to tritonserver: its stubs go with it
        with caplog.at_level("ERROR", logger="serving.supervisor"):
            assert supervisor.check() == [] and supervisor.check() == []
        assert launcher.reloaded == []
        assert [r.getMessage() for r in caplog.records] == [
            "tritonserver exited (code 9); its models come back only when it is started again"
        ]


def test_configured_copy_sets_parameters_and_instance_counts_of_the_real_repository(
    tmp_path: Path,
) -> None:
    from serving.launcher import DEFAULT_REPOSITORY

    repo = configured_copy(
        DEFAULT_REPOSITORY,
        tmp_path,
        {"llm_small": {"torch_threads": "1", "max_active_sequences": "4"}},
        instances={"embedding": 1},
        models=["llm_small", "embedding", "preprocessing"],
    )
    assert sorted(p.name for p in repo.iterdir()) == ["embedding", "llm_small", "preprocessing"]
    models = load_repository(repo)
    small = models["llm_small"].config
    assert small.parameters["torch_threads"].string_value == "1"
    assert small.parameters["max_active_sequences"].string_value == "4"
    # the rest of the config is kept
    assert small.parameters["max_output_len"].string_value == "512"
    assert [g.count for g in models["embedding"].config.instance_group] == [1]
    original = load_repository(DEFAULT_REPOSITORY)
    assert models["preprocessing"].config == original["preprocessing"].config
    assert (repo / "llm_small" / "1" / "model.py").is_file()


def test_configured_copy_refuses_a_parameter_the_config_does_not_have(tmp_path: Path) -> None:
    from serving.launcher import DEFAULT_REPOSITORY

    with pytest.raises(ConfigError, match="no parameter 'torch_thread'"):
        configured_copy(
            DEFAULT_REPOSITORY, tmp_path, {"llm_small": {"torch_thread": "1"}}, models=["llm_small"]
        )
    with pytest.raises(ConfigError, match="not in the copied repository"):
        configured_copy(DEFAULT_REPOSITORY, tmp_path / "b", instances={"router": 1}, models=[])


def test_requests_succeeded_sums_one_models_versions_from_a_metrics_page() -> None:
    page = "\n".join(
        [
            "# HELP nv_inference_request_success Number of successful inference requests",
            'nv_inference_request_success{model="llm_small",version="1"} 7',
            'nv_inference_request_success{model="llm_small",version="2"} 3',
            'nv_inference_request_success{model="llm_small_text",version="1"} 100',
            'nv_inference_request_failure{model="llm_small",version="1"} 50',
        ]
    )
    assert requests_succeeded(page, "llm_small") == 10
    assert requests_succeeded(page, "llm_small_text") == 100
    assert requests_succeeded(page, "embedding") == 0


def _import_like_the_stub(path: Path) -> object:
    spec = importlib.util.spec_from_file_location(f"stub_{path.parent.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stamps(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in [folder, *folder.rglob("*")]}


def test_python_models_are_compiled_so_their_stubs_change_nothing(tmp_path, monkeypatch):
    """A stub that writes __pycache__ into a version folder makes Triton load that model
    again when an ensemble on it loads; compiled first, the import writes nothing."""
    # The stub writes bytecode whatever PYTHONDONTWRITEBYTECODE says (seen: it ignores
    # the PYTHON* variables); this process must import as it does.
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    for name in ("plain", "compiled"):
        (tmp_path / name / "1").mkdir(parents=True)
        (tmp_path / name / "1" / "model.py").write_text(f"NAME = {name!r}\n")
    plain = tmp_path / "plain" / "1"
    before = _stamps(plain)
    assert _import_like_the_stub(plain / "model.py").NAME == "plain"
    assert _stamps(plain) != before  # what the stub does to an uncompiled model

    compile_python_models(tmp_path)
    compiled = tmp_path / "compiled" / "1"
    before = _stamps(compiled)
    assert any(p.suffix == ".pyc" for p in before)
    assert _import_like_the_stub(compiled / "model.py").NAME == "compiled"
    assert _stamps(compiled) == before
