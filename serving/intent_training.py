"""Training data, training and calibration for the intent head.

Used by ``scripts/train_intent_head.py`` (the committed head, on Dolly 15k and own
examples) and ``scripts/retrain_intent.py`` (a team's own labels, checked by
:func:`labelled_rows` before anything is trained).

Everything here is deterministic so the committed weights can be reproduced bit for bit:
the held-out split uses a seeded numpy generator, own examples are paired with contexts
in a fixed round-robin order, and training is full-batch gradient descent in float64
from zeros, with no random state at all.

Training and serving see the same features: each example's text is split by
:func:`serving.intent.split_prompt`, encoded by the served ONNX graph and gated by
:func:`serving.intent.gated`, as ``intent_classifier`` does in the server.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.embedding import EncoderSpec
from serving.errors import ValidationError
from serving.intent import (
    CATEGORY_TO_INTENT,
    LABELS,
    IntentHead,
    gated,
    prompt_text,
    softmax,
    split_prompts,
)

#: In ``intent_extra.jsonl``: "pair this instruction with a context from the training data".
TRAINING_CONTEXT = "@training-context"

#: Rows a team's file needs per intent before :func:`labelled_rows` lets training start.
MIN_ROWS_PER_CLASS = 10

#: L2 penalties :func:`select_l2` chooses from, by cross-validation on the training side.
L2_GRID = (1e-4, 3e-4, 1e-3, 2e-3, 3e-3)


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # index into LABELS
    source: str  # "dolly", "own" or "team"


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


def labelled_rows(path: Path, min_per_class: int = MIN_ROWS_PER_CLASS) -> list[Example]:
    """A team's ``{"text", "intent"}`` JSONL as examples, or a ValidationError listing why not.

    Checked before any training, every problem with its line number: malformed JSON, a
    row that is not an object with string ``text`` and ``intent``, an intent that is not
    one of :data:`LABELS`, empty text, the same text twice (case and spacing aside: a
    duplicate would land on both sides of the held-out split and flatter the report; the
    same text with two labels contradicts itself), and an intent with fewer than
    ``min_per_class`` rows.
    """
    problems: list[str] = []
    rows: list[Example] = []
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
        rows.append(Example(text, LABELS.index(intent), "team"))
    counts = np.bincount([e.label for e in rows], minlength=len(LABELS))
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


@dataclass(frozen=True)
class Scaler:
    """Per-dimension centring and scaling of encoder vectors, fitted on the training side.

    The decoder's hidden states have a few dimensions hundreds of times larger than the
    rest; unscaled, they would swamp gradient descent and the L2 penalty. Each dimension is
    centred and scaled to unit variance, then divided by sqrt(dim), so a vector has norm
    about 1 as a MiniLM embedding does and :data:`L2_GRID` keeps its meaning. The scaler
    is folded into the head's weights (:func:`fold_scaler`): the server feeds raw vectors.
    """

    mean: np.ndarray  # float64 [dim]
    scale: np.ndarray  # float64 [dim]

    @classmethod
    def fit(cls, vectors: np.ndarray) -> Scaler:
        x = np.asarray(vectors, dtype=np.float64)
        return cls(x.mean(axis=0), (x.std(axis=0) + 1e-6) * np.sqrt(x.shape[1]))

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        return (np.asarray(vectors, dtype=np.float64) - self.mean) / self.scale


def fold_scaler(head: IntentHead, scaler: Scaler) -> IntentHead:
    """The head on raw vectors that equals ``head`` on ``scaler``-ed ones, exactly in maths.

    With z = (e - m) / s, features [z c, z (1 - c), c] and weights [W1; W2; w3]:
    W1 / s and W2 / s act on e; the constant -m W1 / s, gated by c, joins w3; the
    constant -m W2 / s, gated by 1 - c, joins the bias (and w3 with the opposite sign).
    """
    w = head.weights.astype(np.float64)
    dim = len(scaler.mean)
    a1 = w[:dim] / scaler.scale[:, None]
    a2 = w[dim : 2 * dim] / scaler.scale[:, None]
    w3 = w[2 * dim] - scaler.mean @ a1 + scaler.mean @ a2
    bias = head.bias.astype(np.float64) - scaler.mean @ a2
    weights = np.vstack([a1, a2, w3[None, :]])
    return IntentHead(weights.astype(np.float32), bias.astype(np.float32))


class Tfidf:
    """TF-IDF of word unigrams and bigrams, L2-normalised: the baseline without an encoder.

    The vocabulary and document frequencies come from the texts it is fitted on (the
    training side only); words are lower-cased runs of letters and digits. Terms in fewer
    than ``min_df`` of those texts are dropped (a term seen once teaches a linear model
    nothing about other prompts, and makes it four times wider).
    """

    def __init__(self, texts: Sequence[str], min_df: int = 2) -> None:
        docs = [self._terms(t) for t in texts]
        df: dict[str, int] = {}
        for terms in docs:
            for term in set(terms):
                df[term] = df.get(term, 0) + 1
        kept = sorted(t for t, count in df.items() if count >= min_df)
        self.vocab = {term: i for i, term in enumerate(kept)}
        n = len(docs)
        self.idf = np.array([np.log((1 + n) / (1 + df[t])) + 1 for t in kept])

    @staticmethod
    def _terms(text: str) -> list[str]:
        words = re.findall(r"[a-z0-9]+", text.lower())
        return words + [f"{a} {b}" for a, b in itertools.pairwise(words)]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), len(self.vocab)))
        for row, text in enumerate(texts):
            for term in self._terms(text):
                if term in self.vocab:
                    out[row, self.vocab[term]] += 1.0
        out *= self.idf
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


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


#: Temperatures :func:`fit_temperature` chooses from (log-spaced, 0.25 to 4).
TEMPERATURES = tuple(float(t) for t in np.exp(np.linspace(np.log(0.25), np.log(4.0), 121)))


def out_of_fold_logits(
    x: np.ndarray, labels: np.ndarray, always_train: np.ndarray, l2: float, folds: int = 5
) -> tuple[np.ndarray, np.ndarray]:
    """Logits of every example not marked ``always_train``, each from a head that did not
    see it (the same folds as :func:`select_l2`). Returns (row indices, logits)."""
    scored = np.flatnonzero(~always_train)
    fold = stratified_folds(labels[scored], folds)
    logits = np.empty((len(scored), len(LABELS)))
    for k in range(folds):
        test = scored[fold == k]
        train = np.setdiff1d(np.arange(len(labels)), test)
        head_k = train_logistic(x[train], labels[train], l2)
        logits[fold == k] = x[test] @ head_k.weights.astype(np.float64) + head_k.bias
    return scored, logits


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature from :data:`TEMPERATURES` with the least negative log-likelihood.

    Class weighting makes a head over-confident about the rare classes and the log-loss
    of held-out logits says by how much; dividing every logit by one number keeps each
    prediction and changes only how sure it claims to be.
    """
    rows = np.arange(len(labels))

    def nll(t: float) -> float:
        return float(-np.log(softmax(logits / t)[rows, labels] + 1e-12).mean())

    return min(TEMPERATURES, key=nll)


def with_temperature(head: IntentHead, temperature: float) -> IntentHead:
    """The head whose probabilities are softmax(logits / temperature): weights divided."""
    return IntentHead(
        (head.weights.astype(np.float64) / temperature).astype(np.float32),
        (head.bias.astype(np.float64) / temperature).astype(np.float32),
    )


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = 10
) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        inside = index == b
        if inside.any():
            error += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(error)


def threshold_curve(
    confidence: np.ndarray, correct: np.ndarray, thresholds: Sequence[float]
) -> list[tuple[float, float, float]]:
    """(threshold, share of prompts below it, accuracy of those at or above it) per threshold."""
    out = []
    for t in thresholds:
        above = confidence >= t
        accuracy = float(correct[above].mean()) if above.any() else float("nan")
        out.append((float(t), float(1 - above.mean()), accuracy))
    return out


def pick_threshold(curve: Sequence[tuple[float, float, float]], max_below: float) -> float:
    """The threshold with the most accurate trusted prompts while at most ``max_below`` of
    all prompts fall below it (those go to the router's fallback tier); ties: the lower."""
    allowed = [row for row in curve if row[1] <= max_below]
    if not allowed:
        raise ValueError(f"no threshold keeps the share below it at or under {max_below}")
    return max(allowed, key=lambda row: (row[2], -row[0]))[0]


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


class CachedEncoder:
    """A serving ONNX runtime, one text at a time on one thread, memoised by text.

    One text per call on one thread: batch composition and thread count cannot change a
    bit of a vector, so training is reproducible on one machine.
    """

    def __init__(self, spec: EncoderSpec) -> None:
        from serving.embedding import Runtime, load_embedder

        self.name = spec.name
        self._embedder = load_embedder(Runtime.ONNX, threads=1, spec=spec)
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, texts: list[str]) -> np.ndarray:
        from rich.progress import track

        missing = sorted(set(texts) - self._cache.keys())
        label = f"{self.name}: encoding instructions"
        for text in track(missing, description=label, disable=not missing):
            self._cache[text] = self._embedder.embed([text]).vectors[0]
        return np.stack([self._cache[t] for t in texts])


def instruction_parts(
    examples: Sequence[Example],
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Instructions, has-context flags and labels of examples, as the server splits them."""
    instructions, flags = split_prompts([e.text for e in examples])
    return instructions, flags, np.array([e.label for e in examples])


@dataclass(frozen=True)
class Fit:
    head: IntentHead  # calibrated, and reading raw vectors (scaler folded in)
    l2: float
    scores: dict[float, float]
    temperature: float  # 1.0 when not calibrated
    held_logits: np.ndarray  # uncalibrated logits of the held-out prompts

    @property
    def predicted(self) -> np.ndarray:
        return self.held_logits.argmax(axis=1)

    def held_probabilities(self, calibrated: bool = True) -> np.ndarray:
        return softmax(self.held_logits / (self.temperature if calibrated else 1.0))


def fit(
    data: Dataset,
    encode: Callable[[list[str]], np.ndarray] | str,
    scale: bool = True,
    calibrate: bool = True,
) -> Fit:
    """Select L2 on the training side, train, calibrate, and score the held-out prompts.

    ``encode`` maps instructions to vectors (a :class:`CachedEncoder`), or is ``"tfidf"`` for
    the baseline fitted on the training instructions. With ``scale`` the vectors are
    standardised on the training side and the scaler is folded into the returned head,
    which therefore reads raw vectors, as the server sends them; the held-out prompts are
    scored by that folded head. With ``calibrate`` the temperature is fitted on the
    out-of-fold logits of the training side's scored prompts (all but own examples) and
    divided into the weights.
    """
    texts, flags, y = instruction_parts(data.train)
    if encode == "tfidf":
        encode = Tfidf(texts)
    vectors = encode(texts)
    scaler = Scaler.fit(vectors) if scale else None
    x = gated(scaler(vectors) if scaler else vectors, flags)
    own = np.array([e.source == "own" for e in data.train])
    l2, scores = select_l2(x, y, own)
    head = train_logistic(x, y, l2)
    temperature = 1.0
    if calibrate:
        rows, logits = out_of_fold_logits(x, y, own, l2)
        temperature = fit_temperature(logits, y[rows])
    if scaler:
        head = fold_scaler(head, scaler)
    held_texts, held_flags, _ = instruction_parts(data.held_out)
    held = gated(encode(held_texts).astype(np.float32), held_flags)
    logits = held.astype(np.float64) @ head.weights + head.bias
    return Fit(with_temperature(head, temperature), l2, scores, temperature, logits)
