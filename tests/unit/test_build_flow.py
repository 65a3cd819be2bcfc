"""The whole build flow against a fake ``tensorrt_llm``, and the serving-time engine check."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from build_engines.__main__ import main
from build_engines.build import TRTLLM_VERSION, llm_call, make_flow
from build_engines.manifest import Manifest, check_engines_for_serving
from build_engines.spec import SPEC_DIR, load_spec
from serving.repository import parse_config

ROOT = Path(__file__).resolve().parents[2]
SXM = ROOT / "tests" / "fixtures" / "topologies" / "8x-h100-sxm.txt"


class FakeTrtllm:
    """Records LLM-API calls; ``save`` writes what a real engine directory holds."""

    def __init__(self, version: str = TRTLLM_VERSION, mismatch: dict | None = None) -> None:
        self.version = version
        self.mismatch = mismatch or {}
        self.llm_kwargs: dict[str, Any] = {}
        self.saved: list[str] = []
        self.shutdowns = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        fake = self

        class Config:
            def __init__(self, **kwargs: Any) -> None:
                self.kwargs = kwargs

        class BuildConfig(Config):
            pass

        class QuantConfig(Config):
            pass

        class CalibConfig(Config):
            pass

        class KvCacheConfig(Config):
            pass

        class LLM:
            def __init__(self, **kwargs: Any) -> None:
                fake.llm_kwargs = kwargs

            def save(self, engine_dir: str) -> None:
                kwargs = fake.llm_kwargs
                build = {**kwargs["build_config"].kwargs, **fake.mismatch}
                tp, pp = kwargs["tensor_parallel_size"], kwargs["pipeline_parallel_size"]
                config = {
                    "version": fake.version,
                    "build_config": build,
                    "pretrained_config": {"mapping": {"tp_size": tp, "pp_size": pp}},
                }
                out = Path(engine_dir)
                (out / "config.json").write_text(json.dumps(config))
                for rank in range(tp * pp):
                    (out / f"rank{rank}.engine").write_bytes(b"engine")
                fake.saved.append(engine_dir)

            def shutdown(self) -> None:
                fake.shutdowns += 1

        quant_algo = types.SimpleNamespace(
            FP8="QuantAlgo.FP8", W4A16_AWQ="QuantAlgo.W4A16_AWQ", INT8="QuantAlgo.INT8"
        )
        root = types.ModuleType("tensorrt_llm")
        root.__version__ = self.version
        root.BuildConfig = BuildConfig
        engine = types.ModuleType("tensorrt_llm._tensorrt_engine")
        engine.LLM = LLM
        llmapi = types.ModuleType("tensorrt_llm.llmapi")
        llmapi.QuantConfig, llmapi.CalibConfig = QuantConfig, CalibConfig
        llmapi.KvCacheConfig, llmapi.QuantAlgo = KvCacheConfig, quant_algo
        root._tensorrt_engine, root.llmapi = engine, llmapi
        tensorrt = types.ModuleType("tensorrt")
        tensorrt.__version__ = "10.13.2"
        for name, module in (
            ("tensorrt_llm", root),
            ("tensorrt_llm._tensorrt_engine", engine),
            ("tensorrt_llm.llmapi", llmapi),
            ("tensorrt", tensorrt),
        ):
            monkeypatch.setitem(sys.modules, name, module)


@pytest.fixture
def fake_trtllm(monkeypatch: pytest.MonkeyPatch) -> FakeTrtllm:
    fake = FakeTrtllm()
    fake.install(monkeypatch)
    return fake


def _build(tmp_path: Path, tier: str) -> tuple[int, Path, Path]:
    engine_dir, repo = tmp_path / "engines" / tier, tmp_path / "model_repository"
    code = main(
        [
            "build",
            str(SPEC_DIR / f"{tier}.yaml"),
            "--topology",
            str(SXM),
            "--engine-dir",
            str(engine_dir),
            "--repository",
            str(repo),
        ]
    )
    return code, engine_dir, repo


def test_build_medium_runs_quantize_build_manifest_and_config(
    tmp_path: Path, fake_trtllm: FakeTrtllm
) -> None:
    code, engine_dir, repo = _build(tmp_path, "llm_medium")
    assert code == 0
    kwargs = fake_trtllm.llm_kwargs
    assert kwargs["model"] == "/models/Meta-Llama-3.1-70B-Instruct"
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["dtype"] == "bfloat16"
    assert kwargs["quant_config"].kwargs == {
        "quant_algo": "QuantAlgo.FP8",
        "kv_cache_quant_algo": "QuantAlgo.FP8",
    }
    assert kwargs["calib_config"].kwargs["calib_dataset"] == "cnn_dailymail"
    assert kwargs["build_config"].kwargs["max_seq_len"] == 12288
    assert kwargs["kv_cache_config"].kwargs == {
        "free_gpu_memory_fraction": 0.9,
        "enable_block_reuse": True,
    }
    assert fake_trtllm.saved == [str(engine_dir)] and fake_trtllm.shutdowns == 1

    manifest = Manifest.read(engine_dir)
    spec = load_spec(SPEC_DIR / "llm_medium.yaml")
    assert manifest.tensorrt_llm_version == TRTLLM_VERSION
    assert manifest.tensorrt_version == "10.13.2"
    assert manifest.gpu_name == "NVIDIA H100 80GB HBM3"
    assert manifest.spec_sha256 == spec.sha256()
    assert manifest.spec_path == "build_engines/specs/llm_medium.yaml"
    assert manifest.files == ["config.json", "rank0.engine", "rank1.engine"]

    config = parse_config(repo / "llm_medium" / "configs" / "h100.pbtxt")
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert config.backend == "tensorrtllm" and config.max_batch_size == 32
    assert params["gpt_model_path"] == str(engine_dir)
    assert params["gpt_model_type"] == "inflight_fused_batching"
    assert params["gpu_device_ids"] == "4,5"
    assert config.model_transaction_policy.decoupled


def test_unquantized_build_has_no_quant_config(tmp_path: Path, fake_trtllm: FakeTrtllm) -> None:
    code, engine_dir, _ = _build(tmp_path, "llm_small")
    assert code == 0
    assert "quant_config" not in fake_trtllm.llm_kwargs
    assert "calib_config" not in fake_trtllm.llm_kwargs
    assert Manifest.read(engine_dir).files == ["config.json", "rank0.engine"]


def test_int4_awq_maps_to_w4a16_awq() -> None:
    call = llm_call(load_spec(SPEC_DIR / "llm_large.yaml"))
    assert call.kwargs["quant_config"].kwargs["quant_algo"].path.endswith("QuantAlgo.W4A16_AWQ")
    assert call.kwargs["tensor_parallel_size"] == 4


def test_engine_that_disagrees_with_its_spec_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    FakeTrtllm(mismatch={"max_batch_size": 8}).install(monkeypatch)
    code, engine_dir, repo = _build(tmp_path, "llm_small")
    assert code == 2
    assert "max_batch_size: engine 8 != spec 64" in capsys.readouterr().err
    assert not (engine_dir / "manifest.json").exists()
    assert not (repo / "llm_small" / "configs" / "h100.pbtxt").exists()


def test_missing_tensorrt_llm_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    code, _, _ = _build(tmp_path, "llm_small")
    err = capsys.readouterr().err
    assert code == 2
    assert "pip install '.[trtllm]'" in err and "Traceback" not in err


@pytest.mark.parametrize("tier", ["llm_small", "llm_medium", "llm_large"])
def test_dry_run_prints_every_step_and_file_and_writes_nothing(
    tier: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    code = main(
        [
            "build",
            str(SPEC_DIR / f"{tier}.yaml"),
            "--topology",
            str(SXM),
            "--repository",
            str(repo),
            "--dry-run",
        ]
    )
    out = capsys.readouterr().out
    spec = load_spec(SPEC_DIR / f"{tier}.yaml")
    assert code == 0
    assert "llm = LLM(" in out and f"llm.save('/engines/{tier}')" in out
    assert f"tensor_parallel_size={spec.tp}," in out
    for rank in range(spec.world_size):
        assert f"/engines/{tier}/rank{rank}.engine" in out
    assert f"/engines/{tier}/manifest.json" in out
    assert 'backend: "tensorrtllm"' in out
    assert not repo.exists()


def test_build_refuses_a_tp_that_does_not_divide_the_gpus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = (SPEC_DIR / "llm_large.yaml").read_text().replace("tp: 4", "tp: 8")
    path = tmp_path / "llm_large.yaml"
    path.write_text(spec)
    topo = ROOT / "tests" / "fixtures" / "topologies" / "4x-h100-nvl.txt"
    assert main(["build", str(path), "--topology", str(topo), "--dry-run"]) == 2
    assert "does not divide the 4 GPUs" in capsys.readouterr().err


# --- check_engines_for_serving ------------------------------------------------------------


def _repository_with_engine(tmp_path: Path, fake: FakeTrtllm) -> tuple[Path, Path]:
    code, engine_dir, repo = _build(tmp_path, "llm_small")
    assert code == 0
    return repo, engine_dir


def test_serving_check_passes_for_a_matching_engine(
    tmp_path: Path, fake_trtllm: FakeTrtllm
) -> None:
    repo, _ = _repository_with_engine(tmp_path, fake_trtllm)
    assert check_engines_for_serving(repo, TRTLLM_VERSION, repo_root=ROOT) == []


def test_serving_check_names_version_mismatch_and_the_fix(
    tmp_path: Path, fake_trtllm: FakeTrtllm
) -> None:
    repo, _ = _repository_with_engine(tmp_path, fake_trtllm)
    problems = check_engines_for_serving(repo, "1.3.0", repo_root=ROOT)
    assert len(problems) == 1
    assert f"engine built with TensorRT-LLM {TRTLLM_VERSION}, installed 1.3.0" in problems[0]
    assert "python -m build_engines build build_engines/specs/llm_small.yaml" in problems[0]


def test_serving_check_without_tensorrt_llm(tmp_path: Path, fake_trtllm: FakeTrtllm) -> None:
    repo, _ = _repository_with_engine(tmp_path, fake_trtllm)
    problems = check_engines_for_serving(repo, None, repo_root=ROOT)
    assert problems == [
        "tensorrt_llm is not installed: serve the h100 profile in the NGC "
        "tritonserver trtllm container, or pip install '.[trtllm]'"
    ]


def test_serving_check_missing_engine_and_manifest(tmp_path: Path, fake_trtllm: FakeTrtllm) -> None:
    repo, engine_dir = _repository_with_engine(tmp_path, fake_trtllm)
    (engine_dir / "manifest.json").unlink()
    problems = check_engines_for_serving(repo, TRTLLM_VERSION, repo_root=ROOT)
    assert len(problems) == 1 and "no engine manifest" in problems[0]
    shutil.rmtree(engine_dir)
    problems = check_engines_for_serving(repo, TRTLLM_VERSION, repo_root=ROOT)
    assert problems[0].startswith("llm_small: engine not found at")


def test_serving_check_notices_a_changed_spec(tmp_path: Path, fake_trtllm: FakeTrtllm) -> None:
    repo, engine_dir = _repository_with_engine(tmp_path, fake_trtllm)
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    manifest["spec_sha256"] = "0" * 64
    (engine_dir / "manifest.json").write_text(json.dumps(manifest))
    problems = check_engines_for_serving(repo, TRTLLM_VERSION, repo_root=ROOT)
    assert problems == [
        "llm_small: build_engines/specs/llm_small.yaml changed since the engine was built; "
        "rebuild with python -m build_engines build build_engines/specs/llm_small.yaml"
    ]


def test_serving_check_ignores_cpu_only_models(tmp_path: Path) -> None:
    (tmp_path / "embedding").mkdir()
    (tmp_path / "embedding" / "config.pbtxt").write_text('name: "embedding"\nbackend: "python"\n')
    assert check_engines_for_serving(tmp_path, None) == []


def test_rebuild_clears_stale_engine_files(tmp_path: Path, fake_trtllm: FakeTrtllm) -> None:
    engine_dir = tmp_path / "engines" / "llm_small"
    engine_dir.mkdir(parents=True)
    (engine_dir / "rank3.engine").write_bytes(b"old tp4 rank")
    (engine_dir / "manifest.json").write_text("{}")
    code, _, _ = _build(tmp_path, "llm_small")
    assert code == 0
    assert Manifest.read(engine_dir).files == ["config.json", "rank0.engine"]
    assert not (engine_dir / "rank3.engine").exists()


def test_a_failing_engine_build_is_one_line_and_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeTrtllm()
    fake.install(monkeypatch)

    def out_of_memory(self: object, engine_dir: str) -> None:
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(sys.modules["tensorrt_llm._tensorrt_engine"].LLM, "save", out_of_memory)
    code, engine_dir, _ = _build(tmp_path, "llm_small")
    err = capsys.readouterr().err
    assert code == 1
    assert "build failed: RuntimeError: CUDA out of memory" in err and "Traceback" not in err
    assert fake.shutdowns == 1  # the LLM is shut down even when save() fails
    assert not (engine_dir / "manifest.json").exists()


@pytest.mark.parametrize("tier", ["llm_small", "llm_medium", "llm_large"])
def test_dry_run_script_runs_and_makes_the_same_calls_as_the_build(
    tier: str, tmp_path: Path, fake_trtllm: FakeTrtllm
) -> None:
    """The printed script is not prose: executed, it calls TensorRT-LLM exactly as the build."""
    spec = load_spec(SPEC_DIR / f"{tier}.yaml")
    engine_dir = tmp_path / "from-script"
    engine_dir.mkdir()
    flow = make_flow(spec, engine_dir, tmp_path / "repo", "0", "NVIDIA H100", "test")
    exec(compile(flow.steps[1].shows, "<dry-run script>", "exec"), {})
    from_script = fake_trtllm.llm_kwargs
    llm_call(spec).run()
    from_build = fake_trtllm.llm_kwargs
    assert from_script.keys() == from_build.keys()
    for key, value in from_build.items():
        expected = value.kwargs if hasattr(value, "kwargs") else value
        got = from_script[key].kwargs if hasattr(from_script[key], "kwargs") else from_script[key]
        assert got == expected, key
    assert fake_trtllm.saved == [str(engine_dir)]
