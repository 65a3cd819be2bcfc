"""Training data and training for the intent head (used by ``scripts/train_intent_head.py``).

Everything here is deterministic so the committed weights can be reproduced bit for bit:
the held-out split uses a seeded numpy generator, own examples are paired with contexts
in a fixed round-robin order, and training is full-batch gradient descent in float64
from zeros, with no random state at all.

Training and serving see the same features: each example's text goes through
:func:`serving.intent.prompt_features`, as ``intent_classifier`` does in the server.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.intent import (
    CATEGORY_TO_INTENT,
    LABELS,
    IntentHead,
    prompt_text,
    softmax,
)

#: In ``intent_extra.jsonl``: "pair this instruction with a context from the training data".
TRAINING_CONTEXT = "@training-context"

#: L2 penalties :func:`select_l2` chooses from, by cross-validation on the training side.
L2_GRID = (1e-4, 3e-4, 1e-3, 2e-3, 3e-3)


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # index into LABELS
    source: str  # "dolly" or "own"


@dataclass(frozen=True)
class Dataset:
    train: list[Example]
    held_out: list[Example]  # Dolly prompts only, never seen in training


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def held_out_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A stratified split: ``fraction`` of each class, chosen by a seeded generator."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for label in range(len(LABELS)):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        mask[idx[: round(len(idx) * fraction)]] = True
    return mask


def stratified_folds(labels: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """A fold number per example, each class dealt round-robin after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(labels), dtype=np.int64)
    for label in range(len(LABELS)):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        fold[idx] = np.arange(len(idx)) % folds
    return fold


def build_dataset(
    dolly: Sequence[dict], own: Sequence[dict], fraction: float = 0.25, seed: int = 0
) -> Dataset:
    """Map Dolly categories to intents, split, and add own examples to the training side.

    Own instructions marked ``@training-context`` are paired with contexts of Dolly
    records that are not held out (including the categories left out of the three
    intents), one context each, so no held-out text leaks into training.
    """
    kept = [r for r in dolly if r["category"] in CATEGORY_TO_INTENT]
    labels = np.array([LABELS.index(CATEGORY_TO_INTENT[r["category"]]) for r in kept])
    held = held_out_mask(labels, fraction, seed)
    examples = [
        Example(prompt_text(r["instruction"], r.get("context", "")), int(y), "dolly")
        for r, y in zip(kept, labels, strict=True)
    ]
    pool = [r["context"] for r, h in zip(kept, held, strict=True) if not h and r["context"].strip()]
    pool += [
        r["context"]
        for r in dolly
        if r["category"] not in CATEGORY_TO_INTENT and r["context"].strip()
    ]
    own_examples, k = [], 0
    for r in own:
        label = LABELS.index(CATEGORY_TO_INTENT[r["category"]])
        if r["context"] == TRAINING_CONTEXT:
            own_examples.append(
                Example(prompt_text(r["instruction"], pool[k % len(pool)]), label, "own")
            )
            k += 1
        else:
            own_examples.append(Example(prompt_text(r["instruction"], r["context"]), label, "own"))
    train = [e for e, h in zip(examples, held, strict=True) if not h] + own_examples
    return Dataset(train, [e for e, h in zip(examples, held, strict=True) if h])


def class_weights(labels: np.ndarray, n_classes: int = len(LABELS)) -> np.ndarray:
    """Inverse-frequency weights (mean 1 per example) so rare intents count as much."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    if (counts == 0).any():
        raise ValueError(f"every class needs training examples, got counts {counts.tolist()}")
    return len(labels) / (n_classes * counts)


def train_logistic(
    x: np.ndarray,
    labels: np.ndarray,
    l2: float,
    steps: int = 1000,
    learning_rate: float = 4.0,
) -> IntentHead:
    """Class-weighted softmax regression by full-batch gradient descent, deterministic."""
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels)
    n_classes = len(LABELS)
    sample_w = class_weights(labels, n_classes)[labels]
    sample_w /= sample_w.sum()
    onehot = np.eye(n_classes)[labels]
    w = np.zeros((x.shape[1], n_classes))
    b = np.zeros(n_classes)
    for _ in range(steps):
        grad = (softmax(x @ w + b) - onehot) * sample_w[:, None]
        w -= learning_rate * (x.T @ grad + l2 * w)
        b -= learning_rate * grad.sum(axis=0)
    return IntentHead(w.astype(np.float32), b.astype(np.float32))


def recalls(truth: Sequence[int], predicted: Sequence[int]) -> np.ndarray:
    """Per-class recall in LABELS order (0 for a class with no examples)."""
    matrix = confusion_matrix(truth, predicted)
    return np.diag(matrix) / np.maximum(matrix.sum(axis=1), 1)


def balanced_accuracy(truth: Sequence[int], predicted: Sequence[int]) -> float:
    """Mean per-class recall: what class weighting aims at."""
    return float(np.mean(recalls(truth, predicted)))


def select_l2(
    x: np.ndarray, labels: np.ndarray, always_train: np.ndarray, folds: int = 5
) -> tuple[float, dict[float, float]]:
    """The L2 penalty from :data:`L2_GRID` with the best cross-validated balanced accuracy.

    Folds are drawn over the examples not marked ``always_train`` (the Dolly prompts);
    the marked ones (own examples) are in every fold's training side and never scored.
    Returns the choice and every candidate's score.
    """
    scored = np.flatnonzero(~always_train)
    fold = stratified_folds(labels[scored], folds)
    scores = {}
    for l2 in L2_GRID:
        predicted = np.empty(len(scored), dtype=np.int64)
        for k in range(folds):
            test = scored[fold == k]
            train = np.setdiff1d(np.arange(len(labels)), test)
            head_k = train_logistic(x[train], labels[train], l2)
            predicted[fold == k] = head_k.probabilities(x[test]).argmax(axis=1)
        scores[l2] = balanced_accuracy(labels[scored], predicted)
    return max(scores, key=lambda l2: scores[l2]), scores


def confusion_matrix(truth: Sequence[int], predicted: Sequence[int]) -> np.ndarray:
    """Rows are the true intent, columns the predicted one, in LABELS order."""
    matrix = np.zeros((len(LABELS), len(LABELS)), dtype=np.int64)
    np.add.at(matrix, (np.asarray(truth), np.asarray(predicted)), 1)
    return matrix


def same_weights(a: IntentHead, b: IntentHead) -> bool:
    """Bit-for-bit equality (np.savez stamps the time into the zip, so files differ)."""
    return all(
        x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
        for x, y in ((a.weights, b.weights), (a.bias, b.bias))
    )


def report_markdown(truth: Sequence[int], predicted: Sequence[int]) -> str:
    """Held-out accuracy, per-class recall and the confusion matrix as markdown."""
    matrix = confusion_matrix(truth, predicted)
    accuracy = float(np.trace(matrix) / matrix.sum())
    lines = [
        f"Held-out accuracy: **{accuracy:.3f}** ({int(np.trace(matrix))}/{int(matrix.sum())})",
        "",
        "| true \\ predicted | " + " | ".join(LABELS) + " | recall |",
        "|---|" + "---|" * (len(LABELS) + 1),
    ]
    for i, (label, recall) in enumerate(zip(LABELS, recalls(truth, predicted), strict=True)):
        cells = " | ".join(str(v) for v in matrix[i])
        lines.append(f"| {label} | {cells} | {recall:.3f} |")
    return "\n".join(lines)


#: A class needs this many rows: some held out for the report, the rest to train on.
MIN_ROWS_PER_CLASS = 10


def labelled_rows(path: Path, min_per_class: int = MIN_ROWS_PER_CLASS) -> list[tuple[str, int]]:
    """A team's ``{"text", "intent"}`` JSONL as (text, label) rows, or a ValidationError.

    Checked before any training, and every problem is listed with its line number:
    malformed JSON, a row that is not an object with string ``text`` and ``intent``, an
    intent that is not one of :data:`LABELS`, empty text, the same text twice (duplicates
    would land on both sides of the held-out split and inflate the report; the same
    text with two labels is contradictory), and a class with fewer than
    ``min_per_class`` rows.
    """
    from serving.errors import ValidationError

    problems: list[str] = []
    rows: list[tuple[str, int]] = []
    seen: dict[str, int] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValidationError(f"{path}: cannot read: {exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"line {number}: not JSON ({exc.msg})")
            continue
        if not isinstance(row, dict) or not all(
            isinstance(row.get(k), str) for k in ("text", "intent")
        ):
            problems.append(f'line {number}: expected {{"text": "...", "intent": "..."}}')
            continue
        text, intent = row["text"], row["intent"]
        if intent not in LABELS:
            problems.append(
                f"line {number}: unknown intent {intent!r} (one of {', '.join(LABELS)})"
            )
            continue
        if not text.strip():
            problems.append(f"line {number}: empty text")
            continue
        key = " ".join(text.lower().split())
        if key in seen:
            problems.append(f"line {number}: duplicate of line {seen[key]} (same text)")
            continue
        seen[key] = number
        rows.append((text, LABELS.index(intent)))
    counts = np.bincount([y for _, y in rows], minlength=len(LABELS))
    for label, count in zip(LABELS, counts, strict=True):
        if count < min_per_class:
            problems.append(f"intent {label!r}: {count} rows, at least {min_per_class} needed")
    if problems:
        shown = problems[:20] + (
            [f"... and {len(problems) - 20} more"] if len(problems) > 20 else []
        )
        raise ValidationError(
            f"{path}: bad training data, nothing trained:\n  " + "\n  ".join(shown)
        )
    return rows
