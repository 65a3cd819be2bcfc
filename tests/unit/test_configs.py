"""Every config parses with Triton's own ModelConfig and keeps the DESIGN.md contracts.

The clients, the router, the ensembles and the benchmarks depend on these tensor names and
types, in both profiles: a config that breaks one fails here, not in production.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2

from serving.repository import parse_config

ROOT = Path(__file__).resolve().parents[2]
REPO = ROOT / "model_repository"
DT = model_config_pb2.DataType

# name -> (dtype, dims or None to skip the dims check); dims exclude the batch dimension.
Tensors = dict[str, tuple[int, list[int] | None]]

LLM_INPUTS: Tensors = {
    "input_ids": (DT.TYPE_INT32, [-1]),
    "input_lengths": (DT.TYPE_INT32, [1]),
    "request_output_len": (DT.TYPE_INT32, [1]),
}
LLM_OPTIONAL: Tensors = {
    "end_id": (DT.TYPE_INT32, [1]),
    "pad_id": (DT.TYPE_INT32, [1]),
    "streaming": (DT.TYPE_BOOL, [1]),
    "temperature": (DT.TYPE_FP32, [1]),
    "runtime_top_k": (DT.TYPE_INT32, [1]),
    "runtime_top_p": (DT.TYPE_FP32, [1]),
    "seed": (DT.TYPE_UINT64, [1]),
    "stop": (DT.TYPE_BOOL, [1]),
}
LLM_OUTPUTS: Tensors = {
    "output_ids": (DT.TYPE_INT32, [-1, -1]),
    "sequence_length": (DT.TYPE_INT32, [-1]),
}
TEXT_INPUTS: Tensors = {"text_input": (DT.TYPE_STRING, [1])}
TEXT_OPTIONAL: Tensors = {
    "max_tokens": (DT.TYPE_INT32, [1]),
    "temperature": (DT.TYPE_FP32, [1]),
    "stream": (DT.TYPE_BOOL, [1]),
}
CLASSIFIER_OUTPUTS: Tensors = {
    "intent": (DT.TYPE_STRING, None),
    "confidence": (DT.TYPE_FP32, None),
    "probabilities": (DT.TYPE_FP32, [3]),
}

# model -> (required inputs, optional inputs, outputs, decoupled)
CONTRACTS: dict[str, tuple[Tensors, Tensors, Tensors, bool | None]] = {
    "embedding": ({"text": (DT.TYPE_STRING, [1])}, {}, {"embedding": (DT.TYPE_FP32, [384])}, False),
    "intent_classifier": ({"text": (DT.TYPE_STRING, [1])}, {}, CLASSIFIER_OUTPUTS, None),
    # the classifier's steps (not in DESIGN.md's contracts; the ensemble depends on them)
    "intent_split": (
        {"text": (DT.TYPE_STRING, [1])},
        {},
        {"instruction": (DT.TYPE_STRING, [1]), "has_context": (DT.TYPE_BOOL, [1])},
        False,
    ),
    "intent_encoder": (
        {"text": (DT.TYPE_STRING, [1])},
        {},
        {"embedding": (DT.TYPE_FP32, [576]), "truncated": (DT.TYPE_BOOL, [1])},
        False,
    ),
    "intent_head": (
        {"embedding": (DT.TYPE_FP32, [576]), "has_context": (DT.TYPE_BOOL, [1])},
        {},
        CLASSIFIER_OUTPUTS,
        False,
    ),
    **{
        f"llm_{tier}": (LLM_INPUTS, LLM_OPTIONAL, LLM_OUTPUTS, True)
        for tier in ("small", "medium", "large")
    },
    **{
        f"llm_{tier}_text": (
            TEXT_INPUTS,
            TEXT_OPTIONAL,
            {"text_output": (DT.TYPE_STRING, None)},
            None,
        )
        for tier in ("small", "medium", "large")
    },
    "router": (
        TEXT_INPUTS,
        {**TEXT_OPTIONAL, "intent": (DT.TYPE_STRING, [1]), "model": (DT.TYPE_STRING, [1])},
        {
            "text_output": (DT.TYPE_STRING, None),
            "intent": (DT.TYPE_STRING, None),
            "model": (DT.TYPE_STRING, None),
            "confidence": (DT.TYPE_FP32, None),
            "num_input_tokens": (DT.TYPE_INT32, None),
            "num_output_tokens": (DT.TYPE_INT32, None),
        },
        True,
    ),
}

CONFIG_FILES = sorted([*REPO.glob("*/config.pbtxt"), *REPO.glob("*/configs/*.pbtxt")])


def _id(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_repository_has_every_contract_model() -> None:
    missing = [m for m in CONTRACTS if not (REPO / m / "config.pbtxt").is_file()]
    assert missing == []


def test_every_model_dir_is_a_model() -> None:
    """Shared code lives in serving/, never in helper folders inside the repository."""
    strays = [p.name for p in REPO.iterdir() if p.is_dir() and not (p / "config.pbtxt").is_file()]
    assert strays == []


@pytest.mark.parametrize("path", CONFIG_FILES, ids=_id)
def test_config_parses_and_names_its_folder(path: Path) -> None:
    config = parse_config(path)
    model_dir = path.parent if path.name == "config.pbtxt" else path.parent.parent
    assert config.name == model_dir.name
    assert config.backend or config.platform, "a config must name its backend or platform"


# Ensembles are scheduled by their steps; every other model batches on its own.
SCHEDULED = [p for p in CONFIG_FILES if parse_config(p).platform != "ensemble"]


@pytest.mark.parametrize("path", SCHEDULED, ids=_id)
def test_non_ensembles_have_dynamic_batching(path: Path) -> None:
    config = parse_config(path)
    assert config.HasField("dynamic_batching"), f"{_id(path)} has no dynamic_batching block"
    assert config.max_batch_size > 0


def _tensors(entries: object) -> dict[str, tuple[int, list[int]]]:
    return {t.name: (t.data_type, list(t.dims)) for t in entries}


def _check(found: dict[str, tuple[int, list[int]]], wanted: Tensors, where: str) -> list[str]:
    problems = []
    for name, (dtype, dims) in wanted.items():
        if name not in found:
            problems.append(f"{where}: missing '{name}'")
            continue
        if found[name][0] != dtype:
            problems.append(
                f"{where}: '{name}' is {DT.Name(found[name][0])}, contract says {DT.Name(dtype)}"
            )
        if dims is not None and found[name][1] != dims:
            problems.append(f"{where}: '{name}' dims {found[name][1]}, contract says {dims}")
    return problems


CONTRACT_FILES = [p for p in CONFIG_FILES if p.relative_to(REPO).parts[0] in CONTRACTS]


@pytest.mark.parametrize("path", CONTRACT_FILES, ids=_id)
def test_contract(path: Path) -> None:
    model = path.relative_to(REPO).parts[0]
    required, optional, outputs, decoupled = CONTRACTS[model]
    config = parse_config(path)
    inputs = _tensors(config.input)
    problems = _check(inputs, required, "input")
    for name, (dtype, dims) in optional.items():
        if name in inputs:
            problems += _check({name: inputs[name]}, {name: (dtype, dims)}, "optional input")
    for name in required:
        if name in inputs:
            entry = next(t for t in config.input if t.name == name)
            if entry.optional:
                problems.append(f"input '{name}' must not be optional")
    problems += _check(_tensors(config.output), outputs, "output")
    if decoupled is not None:
        assert config.model_transaction_policy.decoupled == decoupled, "decoupled mode"
    assert problems == []
