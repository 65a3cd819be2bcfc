"""The manifest that travels with every engine, and the serving-time check that reads it.

TensorRT engines only load in the exact TensorRT-LLM / TensorRT versions that built them;
the backend's own error is a bare "Version tag does not match" deep in the server log
(tensorrtllm_backend issues 190, 299, 531). Recording the versions next to the engine lets
the launcher refuse early with a message that says what to rebuild and how.
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from types import EllipsisType
from typing import Any

from build_engines.spec import load_spec
from serving.errors import ConfigError
from serving.repository import load_repository

MANIFEST_NAME = "manifest.json"
PROFILE = "h100"


@dataclass(frozen=True)
class Manifest:
    tier: str
    tensorrt_llm_version: str
    tensorrt_version: str
    gpu_name: str
    spec_path: str
    spec_sha256: str
    spec: dict[str, Any]
    built_at: str
    files: list[str]

    def write(self, engine_dir: Path) -> Path:
        path = Path(engine_dir) / MANIFEST_NAME
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def read(cls, engine_dir: Path) -> Manifest:
        path = Path(engine_dir) / MANIFEST_NAME
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no engine manifest") from None
        except (json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"{path}: unreadable engine manifest: {exc}") from None


def installed_tensorrt_llm() -> str | None:
    """Version of the installed ``tensorrt_llm`` distribution, without importing it."""
    try:
        return importlib.metadata.version("tensorrt_llm")
    except importlib.metadata.PackageNotFoundError:
        return None


def _build_hint(spec_path: str) -> str:
    return f"python -m build_engines build {spec_path or 'build_engines/specs/<tier>.yaml'}"


def check_engines_for_serving(
    repository: Path,
    installed_version: str | EllipsisType | None = ...,
    repo_root: Path | None = None,
) -> list[str]:
    """Problems that stop the h100 profile of ``repository`` from serving; empty = fine.

    Checks every TensorRT-LLM model (``backend: "tensorrtllm"`` in ``configs/h100.pbtxt``):
    the engine directory and its manifest exist, the manifest's TensorRT-LLM version is
    the installed one, and the spec has not changed since the engine was built.
    ``installed_version`` defaults to the installed distribution's version.
    """
    if installed_version is ...:
        installed_version = installed_tensorrt_llm()
    root = repo_root or Path(repository).resolve().parent
    problems: list[str] = []
    missing_reported = False
    try:
        models = load_repository(Path(repository), PROFILE)
    except ConfigError as exc:
        return [str(exc)]
    for model, entry in models.items():
        config = entry.config
        if config.backend != "tensorrtllm":
            continue
        params = {k: v.string_value for k, v in config.parameters.items()}
        spec_path = params.get("engine_spec", "")
        hint = _build_hint(spec_path)
        engine_dir = params.get("gpt_model_path", "")
        if not engine_dir:
            problems.append(f"{model}: {entry.path} has no gpt_model_path; regenerate it: {hint}")
            continue
        if installed_version is None and not missing_reported:
            missing_reported = True
            problems.append(
                "tensorrt_llm is not installed: serve the h100 profile in the NGC "
                "tritonserver trtllm container, or pip install '.[trtllm]'"
            )
        try:
            manifest = Manifest.read(Path(engine_dir))
        except ConfigError as exc:
            reason = "engine not found" if not Path(engine_dir).is_dir() else str(exc)
            problems.append(f"{model}: {reason} at {engine_dir}: build it with {hint}")
            continue
        if installed_version is not None and manifest.tensorrt_llm_version != installed_version:
            problems.append(
                f"{model}: engine built with TensorRT-LLM {manifest.tensorrt_llm_version}, "
                f"installed {installed_version}: engines only load in the version that built "
                f'them ("Version tag does not match"); rebuild with {hint}'
            )
        if spec_path and (root / spec_path).is_file():
            try:
                current = load_spec(root / spec_path).sha256()
            except ConfigError as exc:
                problems.append(f"{model}: {exc}")
                continue
            if current != manifest.spec_sha256:
                problems.append(
                    f"{model}: {spec_path} changed since the engine was built; rebuild with {hint}"
                )
    return problems
