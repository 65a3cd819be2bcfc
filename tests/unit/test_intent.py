"""The intent head (serving.intent), its training (serving.intent_training) and model.py."""

from __future__ import annotations

import numpy as np
import pytest

from serving.embedding import DIM
from serving.errors import ConfigError, ValidationError
from serving.intent import (
    CATEGORY_TO_INTENT,
    FEATURES,
    LABELS,
    IntentHead,
    PromptParts,
    check_embeddings,
    features,
    prompt_features,
    prompt_text,
    split_prompt,
)
from serving.intent_training import (
    L2_GRID,
    TRAINING_CONTEXT,
    balanced_accuracy,
    build_dataset,
    class_weights,
    confusion_matrix,
    held_out_mask,
    read_jsonl,
    report_markdown,
    same_weights,
    select_l2,
    stratified_folds,
    train_logistic,
)
from tests.conftest import ROOT

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
    with pytest.raises(ConfigError, match="769 features"):
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


def test_clear_prompts_get_the_right_intent():
    """The committed head on real MiniLM embeddings of unambiguous prompts."""
    from serving.embedding import Runtime, load_embedder

    embedder = load_embedder(Runtime.ONNX, threads=1)
    passage = (
        "The city council met on Tuesday to discuss the new budget. After hours of debate, "
        "members approved funding for road repairs and a new library."
    )
    prompts = {
        prompt_text("Summarize the following article in two sentences.", passage): "summarization",
        prompt_text("When did the council meet?", passage): "question_answering",
        "Write a short story about a robot learning to paint.": "completion",
        "Tell me a story about a brave knight.": "completion",
        "Write a poem about the sea at night.": "completion",
        "What is the capital of France?": "question_answering",
        "Who wrote Hamlet?": "question_answering",
    }
    x = prompt_features(list(prompts), lambda texts: embedder.embed(texts).vectors)
    predicted = IntentHead.load().probabilities(x).argmax(axis=1)
    assert [LABELS[i] for i in predicted] == list(prompts.values())
