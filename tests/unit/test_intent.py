"""The intent head (serving.intent), its training (serving.intent_training) and model.py."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from serving.errors import ConfigError, ValidationError
from serving.intent import (
    CATEGORY_TO_INTENT,
    DEFAULT_WEIGHTS,
    DIM,
    ENCODER,
    FEATURES,
    LABELS,
    IntentHead,
    PromptParts,
    check_embeddings,
    features,
    prompt_features,
    prompt_text,
    softmax,
    split_prompt,
    weights_path,
)
from serving.intent_training import (
    L2_GRID,
    TRAINING_CONTEXT,
    Scaler,
    Tfidf,
    balanced_accuracy,
    build_dataset,
    class_weights,
    confusion_matrix,
    expected_calibration_error,
    fit_temperature,
    fold_scaler,
    held_out_mask,
    labelled_rows,
    out_of_fold_logits,
    pick_threshold,
    read_jsonl,
    report_markdown,
    same_weights,
    select_l2,
    stratified_folds,
    threshold_curve,
    train_logistic,
    with_temperature,
)
from tests.conftest import ROOT, FakeRequest, TritonError, load_model_module, model_args

DOLLY = ROOT.parent / "shared" / "data" / "dolly_sample.jsonl"
OWN = ROOT / "serving" / "data" / "intent_extra.jsonl"
CLEAR = ROOT / "tests" / "data" / "intent_clear.jsonl"


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


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("Summarize this.\n\nSome text.", PromptParts("Summarize this.", True)),
        ("  Who wrote it?\n \t\nA passage.\n\nMore.  ", PromptParts("Who wrote it?", True)),
        ("Write a poem.", PromptParts("Write a poem.", False)),
        ("Summarize: one line of text", PromptParts("Summarize: one line of text", False)),
        ("Summarize this:\nthe next line", PromptParts("Summarize this:\nthe next line", False)),
        ("Write a poem.\n\n   \n", PromptParts("Write a poem.", False)),
        ("\r\nSummarize.\r\n\r\nText.", PromptParts("Summarize.", True)),
    ],
)
def test_split_prompt_takes_the_instruction_before_the_first_blank_line(text, parts):
    assert split_prompt(text) == parts


def test_split_prompt_undoes_prompt_text_and_rejects_blank_text():
    assert split_prompt(prompt_text("Summarize this.", "Some text.")) == PromptParts(
        "Summarize this.", True
    )
    assert split_prompt(prompt_text("Write a poem.")) == PromptParts("Write a poem.", False)
    for blank in ("", "  \n\n \t"):
        with pytest.raises(ValidationError, match="empty or whitespace"):
            split_prompt(blank)


def test_features_gate_the_embedding_by_the_context_flag():
    x, _ = _toy(1)
    f = features(x, np.array([True, False, True]))
    assert f.shape == (3, FEATURES) and f.dtype == np.float32
    np.testing.assert_array_equal(f[0, :DIM], x[0].astype(np.float32))
    np.testing.assert_array_equal(f[0, DIM : 2 * DIM], 0)
    np.testing.assert_array_equal(f[1, :DIM], 0)
    np.testing.assert_array_equal(f[1, DIM : 2 * DIM], x[1].astype(np.float32))
    assert f[:, -1].tolist() == [1, 0, 1]
    with pytest.raises(ValidationError, match="one flag per embedding"):
        features(x, np.array([True]))


def test_committed_head_loads_and_predicts_distributions():
    head = IntentHead.load()
    x, _ = _toy(2)
    prediction = head.predict(features(x, np.array([True, False] * 3)))
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
        weights=np.zeros((FEATURES, 3), np.float32),
        bias=np.zeros(3, np.float32),
        labels=np.array(["a", "b", "c"]),
    )
    with pytest.raises(ConfigError, match="labels"):
        IntentHead.load(path)
    IntentHead(np.zeros((DIM, 3), np.float32), np.zeros(3, np.float32)).save(path)
    with pytest.raises(ConfigError, match="1153 features"):
        IntentHead.load(path)
    with pytest.raises(ConfigError, match="not found"):
        IntentHead.load(tmp_path / "missing.npz")


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((2, 10), np.float32), r"shape \[n, 576\]"),
        (np.zeros((0, DIM), np.float32), r"shape \[n, 576\]"),
        (np.full((1, DIM), np.nan, np.float32), "NaN"),
    ],
)
def test_check_embeddings_explains_bad_input(array, message):
    with pytest.raises(ValidationError, match=message):
        check_embeddings(array)


def test_training_learns_separable_data_and_is_bit_for_bit_deterministic():
    x, y = _toy()
    first = train_logistic(x, y, 1e-4, steps=300)
    second = train_logistic(x.copy(), y.copy(), 1e-4, steps=300)
    assert same_weights(first, second)
    assert (first.probabilities(x).argmax(axis=1) == y).all()
    other = train_logistic(x, y, 1e-4, steps=301)
    assert not same_weights(first, other)


def test_save_load_roundtrip_is_exact(tmp_path):
    x, y = _toy()
    head = train_logistic(features(x, y == 1), y, 1e-4, steps=50)
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


def test_stratified_folds_deal_each_class_evenly():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 20)
    fold = stratified_folds(labels, 5)
    for c in range(3):
        counts = np.bincount(fold[labels == c], minlength=5)
        assert counts.max() - counts.min() <= 1
    np.testing.assert_array_equal(fold, stratified_folds(labels, 5))


def test_balanced_accuracy_is_the_mean_recall():
    assert balanced_accuracy([0, 0, 0, 1, 2], [0, 0, 1, 1, 0]) == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_select_l2_scores_every_candidate_on_the_scored_rows_only():
    x, y = _toy(10)
    own = np.zeros(len(y), dtype=bool)
    own[::3] = True  # always in training, never scored
    l2, scores = select_l2(x, y, own)
    assert list(scores) == list(L2_GRID)
    assert l2 in L2_GRID and scores[l2] == max(scores.values())
    assert scores[l2] == 1.0  # separable clusters
    assert select_l2(x, y, own) == (l2, scores)


def test_prompt_features_embed_the_instruction_alone():
    seen = []

    def embed(texts):
        seen.extend(texts)
        return np.eye(DIM, dtype=np.float32)[: len(texts)]

    f = prompt_features(["Summarize this.\n\nLong text.", "Write a poem."], embed)
    assert seen == ["Summarize this.", "Write a poem."]
    assert f[:, -1].tolist() == [1, 0]


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
    own_train = [e for e in data.train if e.source == "own"]
    assert len(own_train) == len(own)
    paired = sum(r["context"] == TRAINING_CONTEXT for r in own)
    assert sum(split_prompt(e.text).has_context for e in own_train) == paired
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
    flags = np.array([[True], [False]])
    requests = [
        FakeRequest({"embedding": x[:2].astype(np.float32), "has_context": flags}),
        FakeRequest({"embedding": np.full((1, DIM), np.inf, np.float32), "has_context": flags[:1]}),
        FakeRequest({"embedding": x[2:].astype(np.float64), "has_context": flags[:1]}),
        FakeRequest({"embedding": x[2:].astype(np.float32), "has_context": flags}),
        FakeRequest({"embedding": x[2:].astype(np.float32)}),
        FakeRequest({"embedding": x[2:].astype(np.float32), "has_context": flags[:1]}),
    ]
    responses = model.execute(requests)
    assert len(responses) == 6
    for bad, needle in [
        (1, "NaN or infinite"),
        (2, "must be FP32"),
        (3, "one flag per embedding (1), got 2"),
        (4, "'has_context' is required"),
    ]:
        assert responses[bad].error().code() == TritonError.INVALID_ARG
        assert needle in responses[bad].error().message()
    out = {t.name(): t.as_numpy() for t in responses[0].output_tensors()}
    assert out["probabilities"].shape == (2, 3)
    assert out["confidence"].shape == (2, 1)
    assert out["intent"].shape == (2, 1)
    expected = IntentHead.load(DEFAULT_WEIGHTS).predict(features(x[:2], flags))
    assert [v.decode() for v in out["intent"].reshape(-1)] == expected.intents
    assert not responses[5].has_error()


def test_split_model_splits_rows_and_isolates_bad_requests():
    split = load_model_module("intent_split").TritonPythonModel()
    split.initialize(model_args("intent_split"))
    rows = np.array([[b"Summarize this.\n\nSome text."], [b"Write a poem."]], dtype=object)
    requests = [
        FakeRequest({"text": rows}),
        FakeRequest({"text": np.array([[b"\xff\xfe"]], dtype=object)}),
        FakeRequest({"text": np.array([[b"ok"], [b"  "]], dtype=object)}),
        FakeRequest({"text": np.array([["Who?"]], dtype=object)}),
    ]
    responses = split.execute(requests)
    assert len(responses) == 4
    for bad, needle in [(1, "'text' is not valid UTF-8"), (2, "'text[1]' is empty")]:
        assert responses[bad].error().code() == TritonError.INVALID_ARG
        assert needle in responses[bad].error().message()
    out = {t.name(): t.as_numpy() for t in responses[0].output_tensors()}
    assert out["instruction"].reshape(-1).tolist() == [b"Summarize this.", b"Write a poem."]
    assert out["has_context"].dtype == np.bool_
    assert out["has_context"].reshape(-1).tolist() == [True, False]
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


def test_clear_test_set_gets_the_right_intent_in_process():
    """The committed head on the served encoder, on the hand-written clear prompts.

    ``tests/data/intent_clear.jsonl``: 60 prompts (20 per intent) written for this test,
    none from Dolly, never trained on (a test below checks that). The bar is 0.97.
    """
    from serving.embedding import Runtime, load_embedder

    embedder = load_embedder(Runtime.ONNX, threads=1, spec=ENCODER)
    rows = read_jsonl(CLEAR)
    x = prompt_features([r["text"] for r in rows], lambda texts: embedder.embed(texts).vectors)
    predicted = [LABELS[i] for i in IntentHead.load().probabilities(x).argmax(axis=1)]
    wrong = [(r["text"][:60], p) for r, p in zip(rows, predicted, strict=True) if p != r["intent"]]
    assert 1 - len(wrong) / len(rows) >= 0.97, wrong


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_clear_test_set_is_balanced_and_kept_out_of_training():
    """No clear prompt's instruction is a training instruction, and no text of it (a passage,
    a one-line request) appears anywhere in the own examples or the Dolly sample.

    Own examples are also no paraphrase of a clear prompt: no own instruction shares 60 %
    of its words (Jaccard) with a clear one. "Write a bedtime story about a sleepy bear"
    beside the clear "... a sleepy dragon" made the clear set partly a training set.
    """
    rows = read_jsonl(CLEAR)
    counts = {label: sum(r["intent"] == label for r in rows) for label in LABELS}
    assert counts == {label: 20 for label in LABELS}
    own, dolly = read_jsonl(OWN), read_jsonl(DOLLY)
    instructions = {r["instruction"].strip().lower() for r in own + dolly}
    corpus = " ".join(r["instruction"] + " " + r["context"] for r in own + dolly).lower()
    own_words = [_words(r["instruction"]) for r in own]
    for r in rows:
        parts = split_prompt(r["text"])
        assert parts.instruction.strip().lower() not in instructions, r["text"]
        longest = max(parts.instruction, r["text"][len(parts.instruction) :].strip(), key=len)
        assert longest.lower() not in corpus, r["text"]
        words = _words(parts.instruction)
        closest = max(len(words & o) / len(words | o) for o in own_words)
        assert closest < 0.6, (r["text"][:60], closest)


def test_own_examples_are_not_dolly_prompts():
    """An own example that is a Dolly instruction trains on that prompt when it is held out."""
    dolly = {r["instruction"].strip().lower() for r in read_jsonl(DOLLY)}
    copied = [
        r["instruction"] for r in read_jsonl(OWN) if r["instruction"].strip().lower() in dolly
    ]
    assert not copied


def test_scaler_folds_into_the_head_exactly():
    """Training standardises the encoder's vectors; the served head reads raw ones."""
    rng = np.random.default_rng(5)
    raw = rng.normal(0, 1, (40, DIM)) * rng.uniform(0.1, 300, DIM) + rng.normal(0, 50, DIM)
    flags = np.arange(40) % 3 == 0
    scaler = Scaler.fit(raw)
    z = scaler(raw)
    np.testing.assert_allclose(z.std(axis=0) * np.sqrt(DIM), 1.0, rtol=1e-3)
    w = rng.normal(0, 1, (FEATURES, 3)).astype(np.float32)
    head = IntentHead(w, np.array([0.1, -0.2, 0.3], np.float32))
    scaled_logits = features(z, flags) @ head.weights.astype(np.float64) + head.bias
    folded = fold_scaler(head, scaler)
    raw_logits = features(raw, flags).astype(np.float64) @ folded.weights + folded.bias
    np.testing.assert_allclose(raw_logits, scaled_logits, rtol=1e-4, atol=1e-3)


def test_tfidf_is_fitted_on_its_texts_only_and_normalised():
    tfidf = Tfidf(["Write a poem", "write a story", "What is a poem?"], min_df=1)
    assert "write a" in tfidf.vocab and "poem" in tfidf.vocab and "haiku" not in tfidf.vocab
    # by default a term must occur in two texts: "story", "what is" and the like go
    assert set(Tfidf(["Write a poem", "write a story", "What is a poem?"]).vocab) == {
        "a",
        "a poem",
        "poem",
        "write",
        "write a",
    }
    x = tfidf(["Write a haiku poem", "zebra"])
    np.testing.assert_allclose(np.linalg.norm(x[0]), 1.0)
    assert not x[1].any()  # nothing it knows
    rare, common = tfidf.vocab["story"], tfidf.vocab["a"]
    assert tfidf.idf[rare] > tfidf.idf[common]


def test_temperature_recovers_the_one_that_generated_the_labels():
    """Labels drawn from softmax(z / 2) are fitted best by temperature 2, not 1."""
    rng = np.random.default_rng(11)
    logits = rng.normal(0, 3, (4000, 3))
    probs = softmax(logits / 2)
    labels = np.array([rng.choice(3, p=p) for p in probs])
    temperature = fit_temperature(logits, labels)
    assert 1.8 < temperature < 2.2
    over = softmax(logits)
    calibrated = softmax(logits / temperature)
    assert expected_calibration_error(calibrated, labels) < expected_calibration_error(over, labels)


def test_temperature_divides_the_weights_and_keeps_every_prediction():
    x, labels = _toy()
    head = train_logistic(features(x, np.zeros(len(x), bool)), labels, 1e-3)
    hot = with_temperature(head, 0.5)
    f = features(x, np.zeros(len(x), bool))
    np.testing.assert_array_equal(hot.probabilities(f).argmax(1), head.probabilities(f).argmax(1))
    assert hot.probabilities(f).max(1).mean() > head.probabilities(f).max(1).mean()


def test_calibration_error_of_a_perfectly_calibrated_set_is_zero():
    probs = np.array([[0.8, 0.1, 0.1]] * 10)
    labels = np.array([0] * 8 + [1] * 2)  # right 80 % of the time at confidence 0.8
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0)
    assert expected_calibration_error(probs, np.zeros(10, int)) == pytest.approx(0.2)


def test_out_of_fold_logits_cover_each_scored_row_once_from_a_head_without_it():
    x, labels = _toy(10)
    f = features(x, np.zeros(len(x), bool))
    own = np.zeros(len(x), bool)
    own[:3] = True
    rows, logits = out_of_fold_logits(f, labels, own, 1e-3)
    assert sorted(rows.tolist()) == list(range(3, len(x)))
    assert logits.shape == (len(x) - 3, 3)
    assert (logits.argmax(1) == labels[rows]).mean() > 0.9


def test_threshold_curve_and_pick():
    confidence = np.array([0.4, 0.5, 0.6, 0.7, 0.9, 0.95])
    correct = np.array([False, False, True, False, True, True])
    curve = threshold_curve(confidence, correct, [0.45, 0.55, 0.75])
    assert curve == [
        (0.45, pytest.approx(1 / 6), 0.6),
        (0.55, pytest.approx(2 / 6), 0.75),
        (0.75, pytest.approx(4 / 6), 1.0),
    ]
    assert pick_threshold(curve, max_below=0.4) == 0.55
    assert pick_threshold(curve, max_below=1.0) == 0.75
    with pytest.raises(ValueError, match="no threshold"):
        pick_threshold(curve, max_below=0.1)


def test_team_rows_are_read_with_their_labels(tmp_path):
    import json

    rows = [{"text": f"Write a poem about {i}.", "intent": "completion"} for i in range(2)]
    rows += [{"text": f"Summarize.\n\nText {i}.", "intent": "summarization"} for i in range(2)]
    rows += [{"text": f"What is {i}?", "intent": "question_answering"} for i in range(2)]
    path = tmp_path / "team.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    examples = labelled_rows(path, min_per_class=2)
    assert [(e.text, LABELS[e.label]) for e in examples] == [(r["text"], r["intent"]) for r in rows]
    with pytest.raises(ValidationError, match="at least 3 needed"):
        labelled_rows(path, min_per_class=3)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "Hi", "intent": "chat"}', "line 1: unknown intent 'chat'"),
        ('{"text": "", "intent": "completion"}', "line 1: empty text"),
        ('{"text": 3, "intent": "completion"}', 'line 1: expected {"text"'),
        ('["Write a poem", "completion"]', 'line 1: expected {"text"'),
        ("{oops", "line 1: not JSON"),
    ],
)
def test_bad_team_rows_are_named_before_training(tmp_path, line, message):
    path = tmp_path / "team.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValidationError, match="nothing trained") as info:
        labelled_rows(path, min_per_class=0)
    assert message in str(info.value)


def test_unreadable_team_file_is_a_validation_error(tmp_path):
    path = tmp_path / "team.jsonl"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ValidationError, match="cannot read"):
        labelled_rows(path)
    with pytest.raises(ValidationError, match="cannot read"):
        labelled_rows(tmp_path / "missing.jsonl")


def test_weights_path_prefers_the_parameter_then_the_version_folder(tmp_path):
    (tmp_path / "1").mkdir()
    (tmp_path / "2").mkdir()
    (tmp_path / "2" / "intent_head.npz").write_bytes(b"")
    assert weights_path(str(tmp_path), "1", "") is None  # the committed weights
    assert weights_path(str(tmp_path), "2", "") == tmp_path / "2" / "intent_head.npz"
    assert weights_path(str(tmp_path), "2", "/x.npz") == Path("/x.npz")
