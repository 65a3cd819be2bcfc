"""Read a model repository the way Triton will: per profile, with ensemble dependencies.

The launcher uses this to load models in dependency order and to know which ensembles to
reload after a composing model is brought back; the tests use it to check every config.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from serving.errors import ConfigError

DEFAULT_PROFILE = "cpu"


def config_path(model_dir: Path, profile: str = DEFAULT_PROFILE) -> Path:
    """The file Triton reads for ``profile``: ``configs/<profile>.pbtxt``, else ``config.pbtxt``."""
    if profile != DEFAULT_PROFILE:
        candidate = model_dir / "configs" / f"{profile}.pbtxt"
        if candidate.is_file():
            return candidate
    return model_dir / "config.pbtxt"


def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    """Parse a config with Triton's own ``ModelConfig`` protobuf; a clear error if it fails."""
    try:
        return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ConfigError(f"{path}: not a valid Triton ModelConfig: {exc}") from exc


@dataclass
class ModelEntry:
    name: str
    path: Path
    config: model_config_pb2.ModelConfig
    composing: list[str] = field(default_factory=list)

    @property
    def is_ensemble(self) -> bool:
        return self.config.platform == "ensemble"

    @property
    def is_python(self) -> bool:
        return self.config.backend == "python"


def load_repository(root: Path, profile: str = DEFAULT_PROFILE) -> dict[str, ModelEntry]:
    """Every model under ``root`` (a folder with a config) for ``profile``."""
    if not root.is_dir():
        raise ConfigError(f"model repository {root} does not exist")
    models: dict[str, ModelEntry] = {}
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        path = config_path(model_dir, profile)
        if not path.is_file():
            continue
        config = parse_config(path)
        if config.name and config.name != model_dir.name:
            raise ConfigError(
                f"{path}: name '{config.name}' differs from its folder '{model_dir.name}'"
            )
        steps = [s.model_name for s in config.ensemble_scheduling.step]
        models[model_dir.name] = ModelEntry(model_dir.name, path, config, steps)
    return models


def load_order(models: dict[str, ModelEntry], wanted: list[str] | None = None) -> list[list[str]]:
    """Waves of models to load: each wave depends only on earlier ones.

    ``wanted`` (default: all) is closed over ensemble dependencies, so asking for an ensemble
    brings its steps. Unknown names and dependency cycles are configuration errors.
    """
    names = list(models) if wanted is None else list(wanted)
    unknown = [n for n in names if n not in models]
    if unknown:
        raise ConfigError(
            f"unknown model(s) {', '.join(unknown)}; the repository has {', '.join(sorted(models))}"
        )
    closed: set[str] = set()
    stack = list(names)
    while stack:
        name = stack.pop()
        if name in closed:
            continue
        closed.add(name)
        for dep in models[name].composing:
            if dep not in models:
                raise ConfigError(f"ensemble '{name}' uses '{dep}', which is not in the repository")
            stack.append(dep)
    waves: list[list[str]] = []
    done: set[str] = set()
    while len(done) < len(closed):
        wave = sorted(n for n in closed - done if set(models[n].composing) <= done)
        if not wave:
            raise ConfigError(f"ensemble dependency cycle among {sorted(closed - done)}")
        waves.append(wave)
        done.update(wave)
    return waves


def dependents(models: dict[str, ModelEntry], name: str) -> list[str]:
    """Ensembles that use ``name`` directly or through other ensembles, in load order."""
    found: list[str] = []
    frontier = [name]
    while frontier:
        current = frontier.pop(0)
        for entry in models.values():
            if current in entry.composing and entry.name not in found:
                found.append(entry.name)
                frontier.append(entry.name)
    return found


def configured_copy(
    source: Path,
    where: Path,
    params: dict[str, dict[str, str]] | None = None,
    *,
    instances: dict[str, int] | None = None,
    models: list[str] | None = None,
    profile: str = DEFAULT_PROFILE,
) -> Path:
    """Copy a model repository to ``where/repo`` with some configs changed; return the copy.

    ``params`` sets string parameters per model (``{"llm_small": {"torch_threads": "1"}}``),
    ``instances`` sets every instance group's ``count`` per model, ``models`` copies only
    those model folders (default: all). Several servers on one machine each serve such a
    copy, so they share the cores instead of each sizing itself for the whole machine
    (benchmarks, ``make cluster``). The edited configs are rewritten from Triton's own
    ``ModelConfig`` protobuf (their comments are dropped); a parameter or model the config
    does not have is a :class:`ConfigError`, never a silent no-op.
    """
    repo = where / "repo"
    repo.mkdir(parents=True)
    for model_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        if models is None or model_dir.name in models:
            shutil.copytree(
                model_dir, repo / model_dir.name, ignore=shutil.ignore_patterns("__pycache__")
            )
    params = params or {}
    instances = instances or {}
    for model in sorted(set(params) | set(instances)):
        if not (repo / model).is_dir():
            raise ConfigError(f"cannot configure '{model}': not in the copied repository")
        path = config_path(repo / model, profile)
        config = parse_config(path)
        for key, value in params.get(model, {}).items():
            if key not in config.parameters:
                raise ConfigError(f"{path}: no parameter '{key}' to set")
            config.parameters[key].string_value = value
        if model in instances:
            if not config.instance_group:
                raise ConfigError(f"{path}: no instance_group to set a count on")
            for group in config.instance_group:
                group.count = instances[model]
        path.write_text(text_format.MessageToString(config))
    return repo
