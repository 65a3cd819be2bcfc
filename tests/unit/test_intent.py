"""The intent head (serving.intent), its training (serving.intent_training) and model.py."""

from __future__ import annotations

import numpy as np
import pytest

from serving.embedding import DIM
from serving.errors import ConfigError, ValidationError
from serving.intent import (
    CATEGORY_TO_INTENT,
    DEFAULT_WEIGHTS,
    LABELS,
    IntentHead,
    check_embeddings,
    prompt_text,
)
from serving.intent_training import (
    TRAINING_CONTEXT,
    build_dataset,
    class_weights,
    confusion_matrix,
    held_out_mask,
    read_jsonl,
    report_markdown,
    same_weights,
    train_logistic,
)
from tests.conftest import ROOT, FakeRequest, TritonError, load_model_module, model_args

DOLLY = ROOT.parent / "shared" / "data" / "dolly_sample.jsonl"
OWN = ROOT / "serving" / "data" / "intent_extra.jsonl"


def _toy(n_per_class: int = 20, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Three well separated clusters on the unit sphere, one per intent."""
    rng = np.random.default_rng(seed)
    centres = np.eye(DIM)[:3] * 3.0
    labels = np.repeat(np.arange(3), n_per_class)
    x = centres[labels] + rng.normal(0, 0.3, (len(labels), DIM))
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels


def test_labels_order_is_the_contract():
    assert LABELS == ("completion", "summarization", "question_answering")
    assert set(CATEGORY_TO_INTENT.values()) == set(LABELS)
    assert "classification" not in CATEGORY_TO_INTENT
    assert "information_extraction" not in CATEGORY_TO_INTENT


def test_prompt_text_adds_context_after_a_blank_line():
    assert prompt_text("Summarize this.", "Some text.") == "Summarize this.\n\nSome text."
    assert prompt_text("Write a poem.", "") == "Write a poem."
    assert prompt_text("Write a poem.", "  \n") == "Write a poem."


def test_committed_head_loads_and_predicts_distributions():
    head = IntentHead.load()
    x, _ = _toy(2)
    prediction = head.predict(x)
    assert prediction.probabilities.shape == (6, 3)
    assert prediction.probabilities.dtype == np.float32
    np.testing.assert_allclose(prediction.probabilities.sum(axis=1), 1.0, atol=1e-5)
    best = prediction.probabilities.argmax(axis=1)
    assert prediction.intents == [LABELS[i] for i in best]
    np.testing.assert_array_equal(prediction.confidence, prediction.probabilities.max(axis=1))


def test_load_rejects_wrong_labels(tmp_path):
    path = tmp_path / "head.npz"
    np.savez(
        path,
        weights=np.zeros((DIM, 3), np.float32),
        bias=np.zeros(3, np.float32),
        labels=np.array(["a", "b", "c"]),
    )
    with pytest.raises(ConfigError, match="labels"):
        IntentHead.load(path)
    with pytest.raises(ConfigError, match="not found"):
        IntentHead.load(tmp_path / "missing.npz")


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((2, 10), np.float32), r"shape \[n, 384\]"),
        (np.zeros((0, DIM), np.float32), r"shape \[n, 384\]"),
        (np.full((1, DIM), np.nan, np.float32), "NaN"),
    ],
)
def test_check_embeddings_explains_bad_input(array, message):
    with pytest.raises(ValidationError, match=message):
        check_embeddings(array)


def test_training_learns_separable_data_and_is_bit_for_bit_deterministic():
    x, y = _toy()
    first = train_logistic(x, y, steps=300)
    second = train_logistic(x.copy(), y.copy(), steps=300)
    assert same_weights(first, second)
    assert (first.probabilities(x).argmax(axis=1) == y).all()
    other = train_logistic(x, y, steps=301)
    assert not same_weights(first, other)


def test_save_load_roundtrip_is_exact(tmp_path):
    x, y = _toy()
    head = train_logistic(x, y, steps=50)
    head.save(tmp_path / "h.npz")
    assert same_weights(head, IntentHead.load(tmp_path / "h.npz"))


def test_class_weights_balance_rare_classes():
    weights = class_weights(np.array([0, 0, 0, 1, 2, 2]))
    np.testing.assert_allclose(weights, [6 / 9, 2.0, 1.0])
    with pytest.raises(ValueError, match="every class"):
        class_weights(np.array([0, 0, 1]))


def test_held_out_split_is_stratified_and_seeded():
    labels = np.array([0] * 20 + [1] * 8 + [2] * 40)
    mask = held_out_mask(labels, 0.25, seed=0)
    assert [int(mask[labels == c].sum()) for c in range(3)] == [5, 2, 10]
    np.testing.assert_array_equal(mask, held_out_mask(labels, 0.25, seed=0))
    assert not np.array_equal(mask, held_out_mask(labels, 0.25, seed=1))


def test_dataset_keeps_held_out_text_out_of_training():
    dolly = read_jsonl(DOLLY)
    own = read_jsonl(OWN)
    assert all("own example" in r["source"] for r in own)
    data = build_dataset(dolly, own)
    assert {e.source for e in data.held_out} == {"dolly"}
    held_contexts = {e.text.split("\n\n", 1)[1] for e in data.held_out if "\n\n" in e.text}
    for example in data.train:
        if "\n\n" in example.text:
            assert example.text.split("\n\n", 1)[1] not in held_contexts
    paired = sum(r["context"] == TRAINING_CONTEXT for r in own)
    assert sum(e.source == "own" for e in data.train) == len(own) + paired  # two contexts each
    assert {e.label for e in data.held_out} == {0, 1, 2}


def test_report_has_accuracy_and_confusion_matrix():
    matrix = confusion_matrix([0, 1, 2, 2], [0, 2, 2, 2])
    assert matrix.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 2]]
    text = report_markdown([0, 1, 2, 2], [0, 2, 2, 2])
    assert "**0.750** (3/4)" in text
    assert "| summarization | 0 | 0 | 1 | 0.000 |" in text


@pytest.fixture(scope="module")
def model():
    instance = load_model_module("intent_head").TritonPythonModel()
    instance.initialize(model_args("intent_head"))
    return instance


def test_model_classifies_rows_and_isolates_bad_requests(model):
    x, _ = _toy(1)
    requests = [
        FakeRequest({"embedding": x[:2].astype(np.float32)}),
        FakeRequest({"embedding": np.full((1, DIM), np.inf, np.float32)}),
        FakeRequest({"embedding": x[2:].astype(np.float64)}),
        FakeRequest({"embedding": x[2:].astype(np.float32)}),
    ]
    responses = model.execute(requests)
    assert len(responses) == 4
    for bad, needle in [(1, "NaN or infinite"), (2, "must be FP32")]:
        assert responses[bad].error().code() == TritonError.INVALID_ARG
        assert needle in responses[bad].error().message()
    out = {t.name(): t.as_numpy() for t in responses[0].output_tensors()}
    assert out["probabilities"].shape == (2, 3)
    assert out["confidence"].shape == (2, 1)
    assert out["intent"].shape == (2, 1)
    expected = IntentHead.load(DEFAULT_WEIGHTS).predict(x[:2])
    assert [v.decode() for v in out["intent"].reshape(-1)] == expected.intents
    assert not responses[3].has_error()


def test_model_reports_missing_weights_at_load(tmp_path):
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    from tests.conftest import TritonModelException

    text = (ROOT / "model_repository/intent_head/config.pbtxt").read_text()
    cfg = json_format.MessageToDict(
        text_format.Parse(text, model_config_pb2.ModelConfig()), preserving_proto_field_name=True
    )
    cfg["parameters"]["weights"] = {"string_value": str(tmp_path / "none.npz")}
    with pytest.raises(TritonModelException, match="not found"):
        load_model_module("intent_head").TritonPythonModel().initialize(
            model_args("intent_head", cfg)
        )


def test_clear_prompts_get_the_right_intent():
    """The committed head on real MiniLM embeddings of unambiguous prompts."""
    from serving.embedding import Runtime, load_embedder

    embedder = load_embedder(Runtime.ONNX, threads=1)
    prompts = {
        "Summarize the following article in two sentences.\n\nThe city council met on "
        "Tuesday to discuss the new budget. After hours of debate, members approved funding "
        "for road repairs and a new library.": "summarization",
        "Write a short story about a robot learning to paint.": "completion",
        "Write a poem about the sea at night.": "completion",
        "What is the capital of France?": "question_answering",
        "Who wrote Hamlet?": "question_answering",
    }
    prediction = IntentHead.load().predict(embedder.embed(list(prompts)).vectors)
    assert prediction.intents == list(prompts.values())
