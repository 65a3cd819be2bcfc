"""The h100 profile hangs together, checked without a GPU.

Generic over whatever models ``model_repository/`` holds when it runs: every
``configs/h100.pbtxt`` parses with Triton's ModelConfig, every ensemble step maps tensors
that exist with matching dtypes (resolving each model as Triton does with
``--model-config-name=h100``), and each LLM tier's config is exactly what the build flow
generates from its spec and the planner's device ids: no hand edits.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from tritonclient.grpc import model_config_pb2

from build_engines.build import plan_tiers
from build_engines.render import tier_config, tier_parameters
from build_engines.spec import tier_specs
from build_engines.topology import load_topology
from serving.repository import config_path, parse_config

ROOT = Path(__file__).resolve().parents[2]
REPO = ROOT / "model_repository"
PROFILE = "h100"
DT = model_config_pb2.DataType
H100_CONFIGS = sorted(REPO.glob(f"*/configs/{PROFILE}.pbtxt"))
SPECS = {s.tier: s for s in tier_specs()}
_PLANNED_ON = re.compile(r"\(planned on ([^)]+)\)")


def _model_names(repo: Path = REPO) -> list[str]:
    return sorted(
        p.name
        for p in repo.iterdir()
        if p.is_dir()
        and any((p / f).is_file() for f in ("config.pbtxt", f"configs/{PROFILE}.pbtxt"))
    )


def _profile_config(model: str, repo: Path = REPO) -> model_config_pb2.ModelConfig:
    return parse_config(config_path(repo / model, PROFILE))


def _io(config: model_config_pb2.ModelConfig) -> tuple[dict[str, int], dict[str, int]]:
    return (
        {t.name: t.data_type for t in config.input},
        {t.name: t.data_type for t in config.output},
    )


def _name(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_every_llm_tier_has_an_h100_config() -> None:
    missing = [t for t in SPECS if not (REPO / t / "configs" / f"{PROFILE}.pbtxt").is_file()]
    assert missing == []


@pytest.mark.parametrize("path", H100_CONFIGS, ids=_name)
def test_h100_config_parses(path: Path) -> None:
    config = parse_config(path)
    assert config.name in ("", path.parent.parent.name)
    assert config.backend or config.platform


ENSEMBLES = [m for m in _model_names() if _profile_config(m).platform == "ensemble"]


def ensemble_problems(model: str, repo: Path = REPO) -> list[str]:
    """Every tensor an ensemble step maps must exist, with one dtype end to end."""
    config = _profile_config(model, repo)
    ens_in, ens_out = _io(config)
    known = set(_model_names(repo))
    produced: dict[str, tuple[int, str]] = {}  # ensemble tensor -> (dtype, producer)
    problems: list[str] = []
    steps = list(config.ensemble_scheduling.step)
    for step in steps:
        if step.model_name not in known:
            problems.append(f"step model '{step.model_name}' is not in the repository")
            continue
        _, outputs = _io(_profile_config(step.model_name, repo))
        for out_name, tensor in step.output_map.items():
            if out_name not in outputs:
                problems.append(f"{step.model_name} has no output '{out_name}'")
                continue
            produced[tensor] = (outputs[out_name], step.model_name)
            if tensor in ens_out and ens_out[tensor] != outputs[out_name]:
                problems.append(
                    f"ensemble output '{tensor}' is {DT.Name(ens_out[tensor])} but "
                    f"{step.model_name}.{out_name} is {DT.Name(outputs[out_name])}"
                )
    for step in steps:
        if step.model_name not in known:
            continue
        inputs, _ = _io(_profile_config(step.model_name, repo))
        for in_name, tensor in step.input_map.items():
            if in_name not in inputs:
                problems.append(f"{step.model_name} has no input '{in_name}'")
                continue
            if tensor in ens_in:
                source = (ens_in[tensor], f"ensemble input '{tensor}'")
            elif tensor in produced:
                source = (produced[tensor][0], f"{produced[tensor][1]} output '{tensor}'")
            else:
                problems.append(
                    f"'{tensor}' (into {step.model_name}.{in_name}) is neither an "
                    f"ensemble input nor produced by a step"
                )
                continue
            if source[0] != inputs[in_name]:
                problems.append(
                    f"{source[1]} is {DT.Name(source[0])} but {step.model_name}."
                    f"{in_name} wants {DT.Name(inputs[in_name])}"
                )
    for tensor in ens_out:
        if tensor not in produced:
            problems.append(f"ensemble output '{tensor}' is produced by no step")
    return problems


@pytest.mark.parametrize("model", ENSEMBLES)
def test_ensemble_steps_map_existing_tensors_with_matching_dtypes(model: str) -> None:
    assert ensemble_problems(model) == []


def _write(repo: Path, model: str, text: str) -> None:
    (repo / model / "configs").mkdir(parents=True)
    (repo / model / "configs" / f"{PROFILE}.pbtxt").write_text(f'name: "{model}"\n{text}')


def _tensor(kind: str, name: str, dtype: str) -> str:
    return f'{kind} {{ name: "{name}" data_type: {dtype} dims: [ 1 ] }}\n'


def _ensemble(step_in: str, step_out: str, ens_out_dtype: str) -> str:
    return (
        'platform: "ensemble"\n'
        + _tensor("input", "text", "TYPE_STRING")
        + _tensor("output", "ids", ens_out_dtype)
        + 'ensemble_scheduling { step { model_name: "tok" model_version: -1 '
        f'input_map {{ key: "{step_in}" value: "text" }} '
        f'output_map {{ key: "{step_out}" value: "ids" }} }} }}\n'
    )


def test_ensemble_check_accepts_a_consistent_ensemble(tmp_path: Path) -> None:
    tok = 'backend: "python"\n' + _tensor("input", "prompt", "TYPE_STRING")
    _write(tmp_path, "tok", tok + _tensor("output", "input_ids", "TYPE_INT32"))
    _write(tmp_path, "ens", _ensemble("prompt", "input_ids", "TYPE_INT32"))
    assert ensemble_problems("ens", tmp_path) == []


def test_ensemble_check_finds_missing_tensors_and_dtype_mismatches(tmp_path: Path) -> None:
    tok = 'backend: "python"\n' + _tensor("input", "prompt", "TYPE_INT32")
    _write(tmp_path, "tok", tok + _tensor("output", "input_ids", "TYPE_INT32"))
    _write(tmp_path, "ens", _ensemble("prompt", "token_ids", "TYPE_FP32"))
    problems = ensemble_problems("ens", tmp_path)
    assert "tok has no output 'token_ids'" in problems
    assert "ensemble input 'text' is TYPE_STRING but tok.prompt wants TYPE_INT32" in problems
    assert "ensemble output 'ids' is produced by no step" in problems


@pytest.mark.parametrize("tier", sorted(SPECS))
def test_tier_config_agrees_with_spec_and_planner(tier: str) -> None:
    spec = SPECS[tier]
    path = REPO / tier / "configs" / f"{PROFILE}.pbtxt"
    text = path.read_text()
    config = parse_config(path)
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert config.backend == "tensorrtllm"
    assert config.model_transaction_policy.decoupled
    assert params["gpt_model_type"] == "inflight_fused_batching"
    assert config.max_batch_size == spec.limits.max_batch_size
    expected = tier_parameters(spec, params["gpu_device_ids"], params["gpt_model_path"])
    assert params == expected, "parameters drifted from the spec: rerun the build/configure"
    instances = params["gpu_device_ids"].split(";")
    assert sum(g.count for g in config.instance_group) == len(instances)

    match = _PLANNED_ON.search(text.splitlines()[0])
    assert match, "the generated header names the topology it was planned on"
    topology_file = ROOT / match.group(1)
    if not topology_file.is_file():
        pytest.skip(f"planned on a live node ({match.group(1)}); cannot re-plan here")
    topology = load_topology(topology_file)
    topology.source = match.group(1)
    planned = plan_tiers(topology).for_target(tier)
    assert params["gpu_device_ids"] == planned.gpu_device_ids
    regenerated = tier_config(
        spec,
        planned.gpu_device_ids,
        params["gpt_model_path"],
        source=f"planned on {match.group(1)}",
    )
    assert text == regenerated, "hand-edited: regenerate with python -m build_engines configure"


def test_tiers_never_share_a_gpu() -> None:
    used: dict[int, str] = {}
    for tier in SPECS:
        config = parse_config(REPO / tier / "configs" / f"{PROFILE}.pbtxt")
        ids = config.parameters["gpu_device_ids"].string_value
        for gpu in re.split(r"[,;]", ids):
            assert int(gpu) not in used, f"GPU{gpu} used by {used.get(int(gpu))} and {tier}"
            used[int(gpu)] = tier


def _has_gpu() -> bool:
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return False
    done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return done.returncode == 0 and "GPU" in done.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU (nvidia-smi finds none)")
def test_server_starts_with_the_h100_profile(tmp_path: Path) -> None:
    """On a GPU node with built engines: the launcher serves the h100 profile."""
    from serving.launcher import LaunchError, LaunchOptions, TritonLauncher

    tritonserver = Path("/opt/tritonserver/bin/tritonserver")
    if not (tritonserver.is_file() and Path("/opt/tritonserver/backends/tensorrtllm").is_dir()):
        pytest.skip("needs the NGC tritonserver trtllm container (tensorrtllm backend)")
    options = LaunchOptions.on_free_ports(
        profile=PROFILE,
        tritonserver=tritonserver,
        log_path=tmp_path / "server.log",
        ready_timeout=1800,
    )
    launcher = TritonLauncher(options)
    try:
        launcher.start()
    except LaunchError as exc:
        if "refusing to serve the h100 profile" in str(exc):
            pytest.skip(f"engines not built for this node: {exc}")
        raise
    try:
        import urllib.request

        with urllib.request.urlopen(launcher.health_url, timeout=10) as response:
            assert response.status == 200
    finally:
        launcher.stop()


DOCKER = ROOT / "docker"
REFERENCE_NODE = ROOT / "tests" / "fixtures" / "topologies" / "8x-h100-sxm.txt"


def test_compose_gpus_match_the_plan() -> None:
    result = plan_tiers(load_topology(REFERENCE_NODE))
    compose = yaml.safe_load((DOCKER / "compose.h100.yaml").read_text())
    for service in ("triton", "build"):
        devices = compose["services"][service]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["device_ids"] == [str(g) for g in result.used_gpus]


# The Kubernetes manifests' GPUs and probes: tests/unit/test_kubernetes.py.


def test_h100_tiers_bound_their_queue() -> None:
    """Triton's own queue policy bounds what waits for each tier (UNAVAILABLE beyond it)."""
    for tier in SPECS:
        config = parse_config(REPO / tier / "configs" / f"{PROFILE}.pbtxt")
        size = config.dynamic_batching.default_queue_policy.max_queue_size
        assert size == SPECS[tier].triton.max_queue_size > 0


def test_trtllm_image_tag_bundles_the_pinned_tensorrt_llm() -> None:
    """Dockerfile.trtllm's default TRITON_TAG, its TRTLLM_VERSION check and the pin agree."""
    import re

    from build_engines.releases import bundled_trtllm

    dockerfile = (DOCKER / "Dockerfile.trtllm").read_text()
    tag = re.search(r"^ARG TRITON_TAG=(\S+)$", dockerfile, re.M).group(1)
    checked = re.search(r"^ARG TRTLLM_VERSION=(\S+)$", dockerfile, re.M).group(1)
    # (tomllib is 3.11+; the project supports 3.10)
    (pin,) = re.findall(r'^trtllm = \["([^"]+)"\]$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert pin == f"tensorrt-llm=={checked}"
    assert bundled_trtllm(tag) == checked, (
        f"Triton {tag} bundles TensorRT-LLM {bundled_trtllm(tag)}, the project pins {checked}"
    )
    # and the table can say no: the old default would fail here
    assert bundled_trtllm("26.02") != checked
    assert '"tritonclient[all]' not in dockerfile  # its deps would replace the image's protobuf


def test_embedding_sits_on_the_planned_shared_gpu_and_intent_head_on_the_host() -> None:
    """Not GPU 0 (the 405B tier's first rank): the plan's GPU, rewritten by `configure`."""
    from google.protobuf import text_format

    from build_engines.render import aux_config, relative

    result = plan_tiers(load_topology(REFERENCE_NODE))
    path = REPO / "embedding" / "configs" / f"{PROFILE}.pbtxt"
    text = path.read_text()
    (group,) = parse_config(path).instance_group
    assert list(group.gpus) == [result.aux_gpu] and result.aux_gpu not in (0, 1, 2, 3)
    assert aux_config(text, result.aux_gpu, f"planned on {relative(REFERENCE_NODE)}") == text
    moved = aux_config(text, 7, "elsewhere")
    (moved_group,) = text_format.Parse(moved, model_config_pb2.ModelConfig()).instance_group
    assert list(moved_group.gpus) == [7]
    (head,) = parse_config(REPO / "intent_head" / "configs" / f"{PROFILE}.pbtxt").instance_group
    assert head.kind == head.KIND_CPU
    assert any("intent_head stays KIND_CPU" in n for n in result.notes)


def test_tiers_kv_cache_is_the_planners_budget() -> None:
    for tier, spec in SPECS.items():
        config = parse_config(REPO / tier / "configs" / f"{PROFILE}.pbtxt")
        tokens = config.parameters["max_tokens_in_paged_kv_cache"].string_value
        assert int(tokens) == spec.serving.target_concurrency * spec.serving.target_context
