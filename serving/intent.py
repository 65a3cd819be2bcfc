"""The intent head: which kind of task a prompt is, from its MiniLM embedding.

A multinomial logistic regression (384 -> 3) trained by ``scripts/train_intent_head.py``
on Databricks Dolly 15k prompts (CC BY-SA 3.0, see ``serving/data/LICENSE-dolly.md``).
It lives here, not in the model, so the ``intent_head`` model, the router's tests and the
training script share one definition of the labels, the text and the maths.

Training lives in :mod:`serving.intent_training`; serving needs only numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.embedding import DIM
from serving.errors import ConfigError, ValidationError

#: Output order of ``probabilities``; the contract in DESIGN.md.
LABELS = ("completion", "summarization", "question_answering")

#: Dolly 15k category -> intent. ``classification`` and ``information_extraction`` are
#: left out: they are neither of the three tasks the router serves.
CATEGORY_TO_INTENT = {
    "summarization": "summarization",
    "open_qa": "question_answering",
    "closed_qa": "question_answering",
    "general_qa": "question_answering",
    "creative_writing": "completion",
    "brainstorming": "completion",
}

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "data" / "intent_head.npz"


def prompt_text(instruction: str, context: str = "") -> str:
    """The text the head classifies: the instruction, then a blank line and the context."""
    return f"{instruction}\n\n{context}" if context.strip() else instruction


@dataclass(frozen=True)
class Prediction:
    intents: list[str]
    confidence: np.ndarray  # float32 [n]: probability of the chosen intent
    probabilities: np.ndarray  # float32 [n, len(LABELS)]


@dataclass(frozen=True)
class IntentHead:
    weights: np.ndarray  # float32 [DIM, len(LABELS)]
    bias: np.ndarray  # float32 [len(LABELS)]

    @classmethod
    def load(cls, path: Path | None = None) -> IntentHead:
        """Load committed weights, checking their shapes and labels (a load-time error)."""
        path = path or DEFAULT_WEIGHTS
        if not path.is_file():
            raise ConfigError(f"intent head weights not found at {path}")
        with np.load(path) as data:
            labels = tuple(str(x) for x in data["labels"])
            head = cls(data["weights"].astype(np.float32), data["bias"].astype(np.float32))
        if labels != LABELS:
            raise ConfigError(f"{path}: labels {labels} differ from {LABELS}")
        if head.weights.shape != (DIM, len(LABELS)) or head.bias.shape != (len(LABELS),):
            raise ConfigError(f"{path}: weights {head.weights.shape} do not map {DIM} -> 3")
        return head

    def save(self, path: Path) -> None:
        np.savez(path, weights=self.weights, bias=self.bias, labels=np.array(LABELS))

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        return softmax(check_embeddings(embeddings) @ self.weights + self.bias)

    def predict(self, embeddings: np.ndarray) -> Prediction:
        probs = self.probabilities(embeddings)
        best = probs.argmax(axis=1)
        return Prediction(
            intents=[LABELS[i] for i in best],
            confidence=probs[np.arange(len(best)), best].astype(np.float32),
            probabilities=probs.astype(np.float32),
        )


def check_embeddings(embeddings: np.ndarray) -> np.ndarray:
    """Rows of MiniLM embeddings as float32 [n, 384], or a ValidationError saying what is off."""
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != DIM or len(x) == 0:
        raise ValidationError(f"'embedding' must have shape [n, {DIM}], got {list(x.shape)}")
    if not np.isfinite(x).all():
        raise ValidationError("'embedding' holds NaN or infinite values")
    return x


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)
