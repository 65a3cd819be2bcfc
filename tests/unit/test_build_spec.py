"""Spec loading: the shipped tier specs are valid, and every kind of mistake is named."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from build_engines.spec import SPEC_DIR, Quantization, load_spec, parse_spec, tier_specs
from serving.errors import ConfigError

SMALL = yaml.safe_load((SPEC_DIR / "llm_small.yaml").read_text())
MEDIUM = yaml.safe_load((SPEC_DIR / "llm_medium.yaml").read_text())


def _with(base: dict, path: str, value: object) -> dict:
    data = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[last] = value
    return data


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_spec(data)
    return str(info.value)


def test_one_spec_per_tier_with_the_issue_precisions() -> None:
    specs = {s.tier: s for s in tier_specs()}
    assert set(specs) == {"llm_small", "llm_medium", "llm_large"}
    assert specs["llm_small"].architecture.name == "llama-3.1-8b"
    assert specs["llm_medium"].architecture.name == "llama-3.1-70b"
    assert specs["llm_large"].architecture.name == "llama-3.1-405b"
    assert {s.quantization for s in specs.values()} == {
        Quantization.NONE,
        Quantization.FP8,
        Quantization.INT4_AWQ,
    }
    for spec in specs.values():
        assert spec.path is not None and spec.path.stem == spec.tier


def test_spec_hash_changes_with_content() -> None:
    a = parse_spec(SMALL)
    b = parse_spec(_with(SMALL, "limits.max_batch_size", 128))
    assert a.sha256() == parse_spec(copy.deepcopy(SMALL)).sha256()
    assert a.sha256() != b.sha256()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("limits.max_seq_len", 4096, "limits.max_seq_len (4096) must be greater than"),
        ("parallel.tp", 3, "parallel.tp: 3 does not divide the 8 KV heads"),
        ("parallel.pp", 3, "parallel.pp: 3 does not divide the 32 layers"),
        ("parallel.tp", 0, "parallel.tp: 0 must be > 0"),
        ("parallel.tp", "two", "parallel.tp: expected int, got 'two'"),
        ("dtype", "fp32", "dtype: expected one of 'bfloat16', 'float16'"),
        ("quantization", "int3", "quantization: expected one of"),
        ("limits.max_num_tokens", 16, "limits.max_num_tokens (16) must be at least"),
        ("kv_cache.free_gpu_mem_fraction", 1.5, "must be in (0, 1]"),
        ("serving.target_context", 20000, "serving.target_context (20000) exceeds"),
        ("serving.target_concurrency", 65, "serving.target_concurrency (65) exceeds"),
        ("architecture", "gpt-5", "unknown architecture 'gpt-5'"),
        ("tier", "LLM Small", "is not a valid model name"),
        ("limits.max_batch_size", True, "expected int, got True"),
    ],
)
def test_precise_errors(path: str, value: object, message: str) -> None:
    assert message in _error(_with(SMALL, path, value))


def test_unknown_keys_are_named_with_their_path() -> None:
    data = _with(SMALL, "limits.max_seqlen", 4096)
    data["engine"] = "x"
    error = _error(data)
    assert "limits.max_seqlen: unknown key" in error
    assert "engine: unknown key" in error


def test_missing_required_keys_and_all_errors_at_once() -> None:
    data = copy.deepcopy(SMALL)
    del data["checkpoint"]
    del data["limits"]
    data["dtype"] = "fp64"
    error = _error(data)
    assert "checkpoint: required" in error
    assert "limits: required section" in error
    assert "dtype: expected one of" in error


def test_quantized_spec_needs_calibration() -> None:
    data = copy.deepcopy(MEDIUM)
    del data["calibration"]
    assert "calibration: required for quantization 'fp8'" in _error(data)


def test_tp_that_does_not_divide_the_gpu_count() -> None:
    spec = parse_spec(_with(MEDIUM, "parallel.tp", 4))
    spec.check_gpu_count(8)
    with pytest.raises(ConfigError, match="does not divide the 6 GPUs"):
        spec.check_gpu_count(6)
    with pytest.raises(ConfigError, match="does not divide the 2 GPUs"):
        spec.check_gpu_count(2)


def test_load_spec_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="spec file not found"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tier: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_spec(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_spec(listy)
