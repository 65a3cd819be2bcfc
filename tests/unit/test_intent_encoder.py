"""The fine-tuned intent encoder (serving.intent_encoder), its training helpers and model.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from serving.errors import ConfigError, ValidationError
from serving.intent import LABELS, Prediction, split_context
from serving.intent_encoder import (
    DEFAULT_ENCODER_WEIGHTS,
    WEIGHTS_NAME,
    EncoderWeights,
    IntentEncoder,
    padded,
    weights_for_version,
)
from serving.intent_finetune import (
    Tfidf,
    compare,
    ece,
    fit_temperature,
    pick_threshold,
    softmax_t,
    tfidf_predict,
    threshold_curve,
)
from serving.intent_training import labelled_rows, read_jsonl
from tests.conftest import ROOT, FakeRequest, TritonError, load_model_module, model_args

CLEAR = ROOT / "tests" / "data" / "intent_clear.jsonl"


def _write(tmp_path, rows) -> object:
    path = tmp_path / "team.jsonl"
    path.write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n",
        encoding="utf-8",
    )
    return path


def _good(n: int = 3) -> list[dict]:
    return [
        {"text": f"{label} prompt number {i}", "intent": label}
        for label in LABELS
        for i in range(n)
    ]


def test_labelled_rows_reads_a_good_file(tmp_path):
    rows = labelled_rows(_write(tmp_path, _good()), min_per_class=3)
    assert len(rows) == 9
    assert rows[0] == ("completion prompt number 0", 0)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"text": "Translate this.", "intent": "translation"}, "unknown intent 'translation'"),
        ({"text": "   ", "intent": "completion"}, "empty text"),
        ({"text": "Completion  PROMPT number 1", "intent": "summarization"}, "duplicate of line 2"),
        ("{not json", "not JSON"),
        ({"prompt": "x", "label": "completion"}, 'expected {"text"'),
    ],
)
def test_labelled_rows_names_the_bad_line(tmp_path, extra, needle):
    with pytest.raises(ValidationError, match="nothing trained") as info:
        labelled_rows(_write(tmp_path, [*_good(), extra]), min_per_class=3)
    assert needle in str(info.value)
    assert "line 10" in str(info.value)


def test_labelled_rows_needs_enough_rows_per_class(tmp_path):
    rows = [r for r in _good(4) if r["intent"] != "summarization" or r["text"].endswith("0")]
    with pytest.raises(ValidationError, match="'summarization': 1 rows, at least 4 needed"):
        labelled_rows(_write(tmp_path, rows), min_per_class=4)


def test_clear_test_set_is_balanced_and_valid():
    rows = labelled_rows(CLEAR, min_per_class=20)
    assert np.bincount([y for _, y in rows]).tolist() == [20, 20, 20]


def test_split_context_keeps_the_text_after_the_first_blank_line():
    assert split_context("Who?\n\nA text.\n\nMore.") == ("Who?", "A text.\n\nMore.")
    assert split_context("Summarize: a text") == ("Summarize: a text", "")
    with pytest.raises(ValidationError, match="empty"):
        split_context(" \n ")


def test_weights_round_trip_as_float16(tmp_path):
    rng = np.random.default_rng(0)
    params = {"head.weight": rng.normal(size=(3, 384)), "head.bias": rng.normal(size=3)}
    weights = EncoderWeights({k: v.astype(np.float32) for k, v in params.items()}, 2, 1.5)
    path = tmp_path / WEIGHTS_NAME
    weights.save(path)
    loaded = EncoderWeights.load(path)
    assert loaded.temperature == 1.5 and loaded.trainable_layers == 2
    np.testing.assert_array_equal(
        loaded.params["head.weight"], weights.rounded().params["head.weight"]
    )
    assert loaded.digest() == weights.digest()
    assert loaded.with_temperature(2.0).digest() != weights.digest()


def test_weights_load_rejects_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        EncoderWeights.load(tmp_path / "missing.npz")
    path = tmp_path / "w.npz"
    EncoderWeights({"head.weight": np.zeros((3, 384), np.float32)}, 2, -1.0).save(path)
    with pytest.raises(ConfigError, match="temperature"):
        EncoderWeights.load(path)
    EncoderWeights({"head.weight": np.zeros((2, 384), np.float32)}, 2, 1.0).save(path)
    with pytest.raises(ConfigError, match=r"head\.weight"):
        EncoderWeights.load(path)


def test_version_folder_weights_win_over_the_default(tmp_path):
    assert weights_for_version(tmp_path, "") is None
    (tmp_path / WEIGHTS_NAME).write_bytes(b"")
    assert weights_for_version(tmp_path, "") == tmp_path / WEIGHTS_NAME
    assert str(weights_for_version(tmp_path, "/x.npz")) == "/x.npz"


def test_padded_builds_masks_and_segments():
    ids, mask, types = padded(
        [([101, 5, 102], [0, 0, 0]), ([101, 7, 102, 9, 102], [0, 0, 0, 1, 1])]
    )
    assert ids.shape == (2, 5) and ids[0].tolist() == [101, 5, 102, 0, 0]
    assert mask.sum(axis=1).tolist() == [3, 5]
    assert types[1].tolist() == [0, 0, 0, 1, 1]


def test_temperature_scaling_recovers_an_overconfident_model():
    rng = np.random.default_rng(1)
    true_logits = rng.normal(0, 2, (4000, 3))
    labels = np.array([rng.choice(3, p=p) for p in softmax_t(true_logits)])
    overconfident = true_logits * 3  # a model 3x too sure of itself
    temperature = fit_temperature(overconfident, labels)
    assert 2.7 < temperature < 3.3
    before = ece(softmax_t(overconfident), labels)
    after = ece(softmax_t(overconfident, temperature), labels)
    assert after < 0.03 < before


def test_threshold_curve_and_pick():
    probs = np.array([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25], [0.2, 0.7, 0.1], [0.45, 0.1, 0.45]])
    labels = np.array([0, 1, 1, 2])
    curve = {c.threshold: c for c in threshold_curve(probs, labels)}
    assert curve[0.5].share_below == 0.5 and curve[0.5].accuracy_above == 1.0
    assert curve[0.35].share_below == 0.0 and curve[0.35].accuracy_above == 0.5
    chosen = pick_threshold(list(curve.values()), target=0.9, max_below=0.5)
    assert chosen.threshold == 0.5


def test_compare_allows_flips_only_inside_the_margin():
    ref = np.array([[0.8, 0.1, 0.1], [0.49, 0.48, 0.03]])
    assert compare(ref, ref + 0.001)[0]
    assert compare(ref, np.array([[0.8, 0.1, 0.1], [0.47, 0.50, 0.03]]))[0]
    ok, message = compare(ref, np.array([[0.1, 0.8, 0.1], [0.49, 0.48, 0.03]]))
    assert not ok and "1 clear predictions differ" in message


def test_tfidf_baseline_learns_words():
    texts = [f"write a poem about {w}" for w in ["cats", "dogs", "sea", "sky"]]
    texts += [
        f"summarize this text about {w}\n\nSome text." for w in ["cats", "dogs", "sea", "sky"]
    ]
    texts += [f"what is the height of {w}" for w in ["cats", "dogs", "sea", "sky"]]
    y = np.repeat([0, 1, 2], 4)
    assert len(Tfidf().fit(texts).vocabulary) > 10
    predicted = tfidf_predict(
        texts, y, np.zeros(12, bool), ["write a poem about trees", "what is the height of trees"]
    )
    assert predicted.tolist() == [0, 2]


@pytest.fixture(scope="module")
def encoder() -> IntentEncoder:
    return IntentEncoder(EncoderWeights.load(), threads=1)


def test_committed_encoder_gets_the_clear_prompts_right(encoder):
    """The in-process twin of the integration test: >= 0.97 on the hand-written set."""
    rows = read_jsonl(CLEAR)
    prediction = encoder.predict([r["text"] for r in rows])
    accuracy = np.mean([p == r["intent"] for p, r in zip(prediction.intents, rows, strict=True)])
    assert accuracy >= 0.97
    np.testing.assert_allclose(prediction.probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_onnx_export_matches_torch(encoder):
    import torch

    from serving.assets import minilm_dir
    from serving.intent_encoder import encoder_module

    weights = EncoderWeights.load()
    module = encoder_module(minilm_dir(), weights, weights.trainable_layers)
    texts = [
        "Write a haiku about rain.",
        "Who built it?\n\nThe bridge was built in 1932 by a firm.",
    ]
    ids, mask, types = padded(encoder.tokens.encode(texts))
    with torch.inference_mode():
        reference = module(*(torch.from_numpy(a) for a in (ids, mask, types))).numpy()
    np.testing.assert_allclose(encoder.probabilities(texts), reference, atol=1e-4)


@pytest.fixture(scope="module")
def model():
    instance = load_model_module("intent_encoder").TritonPythonModel()
    instance.initialize(model_args("intent_encoder"))
    return instance


def test_model_classifies_rows_and_isolates_bad_requests(model):
    rows = np.array([[b"Write a haiku about rain."], [b"Summarize: the text."]], dtype=object)
    requests = [
        FakeRequest({"text": rows}),
        FakeRequest({"text": np.array([[b"\xff\xfe"]], dtype=object)}),
        FakeRequest({"text": np.array([[b"ok"], [b"  "]], dtype=object)}),
        FakeRequest({"text": np.array([["Who wrote Hamlet?"]], dtype=object)}),
    ]
    responses = model.execute(requests)
    assert len(responses) == 4
    for bad, needle in [(1, "not valid UTF-8"), (2, "empty")]:
        assert responses[bad].error().code() == TritonError.INVALID_ARG
        assert needle in responses[bad].error().message()
    out = {t.name(): t.as_numpy() for t in responses[0].output_tensors()}
    served = [v.decode() for v in out["intent"].reshape(-1)]
    assert served == model.encoder.predict([t.decode() for t in rows.reshape(-1)]).intents
    assert served[0] == "completion"
    assert out["probabilities"].shape == (2, 3) and out["confidence"].shape == (2, 1)
    np.testing.assert_allclose(out["confidence"].reshape(-1), out["probabilities"].max(axis=1))
    assert not responses[3].has_error()


def test_model_reports_missing_weights_at_load(tmp_path):
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    from tests.conftest import TritonModelException

    text = (ROOT / "model_repository/intent_encoder/config.pbtxt").read_text()
    cfg = json_format.MessageToDict(
        text_format.Parse(text, model_config_pb2.ModelConfig()), preserving_proto_field_name=True
    )
    cfg["parameters"]["weights"] = {"string_value": str(tmp_path / "none.npz")}
    with pytest.raises(TritonModelException, match="not found"):
        load_model_module("intent_encoder").TritonPythonModel().initialize(
            model_args("intent_encoder", cfg)
        )


def test_default_weights_are_committed_and_small():
    assert DEFAULT_ENCODER_WEIGHTS.is_file()
    assert DEFAULT_ENCODER_WEIGHTS.stat().st_size < 25e6
    assert isinstance(Prediction.of(np.array([[0.2, 0.5, 0.3]])).intents[0], str)
