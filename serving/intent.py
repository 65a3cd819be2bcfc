"""The intent head: which kind of task a prompt is, from its instruction's encoder vector.

A prompt is an instruction, optionally followed by a blank line and a context
(:func:`prompt_text`). The head sees the embedding of the instruction alone and whether a
context follows (:func:`split_prompt`): a mean-pooled embedding of instruction + context is
mostly the context, which says little about the task. It is a multinomial logistic
regression with one set of weights for prompts with a context and one for prompts
without (2 x 576 + 1 features -> 3) on the ``intent_encoder`` vector (SmolLM2's first
8 layers, :data:`serving.embedding.SMOLLM2_PREFIX`), trained by
``scripts/train_intent_head.py`` on
Databricks Dolly 15k prompts (CC BY-SA 3.0, see ``serving/data/LICENSE-dolly.md``).
It lives here, not in the model, so the ``intent_split`` and ``intent_head`` models, the
router's tests and the training script share one definition of the labels, the text and
the maths.

Training lives in :mod:`serving.intent_training`; serving needs only numpy.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.embedding import SMOLLM2_PREFIX
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
#: A retrained version folder of ``intent_head`` holds its weights under this name.
WEIGHTS_NAME = "intent_head.npz"

#: The encoder the head reads, and its width.
ENCODER = SMOLLM2_PREFIX
DIM = ENCODER.dim

#: Features the head reads: the instruction embedding gated by "has a context", twice,
#: and the flag itself (see :func:`features`).
FEATURES = 2 * DIM + 1

_BLANK_LINE = re.compile(r"\n[ \t\r]*\n")


def prompt_text(instruction: str, context: str = "") -> str:
    """The text to classify: the instruction, then a blank line and the context."""
    return f"{instruction}\n\n{context}" if context.strip() else instruction


@dataclass(frozen=True)
class PromptParts:
    instruction: str
    has_context: bool


def split_prompt(text: str) -> PromptParts:
    """Undo :func:`prompt_text`: the text up to the first blank line, and whether more follows.

    A prompt with no blank line is all instruction ("Summarize: <text>" on one line is
    classified from all of it). Empty or whitespace-only text is a ValidationError.
    """
    stripped = text.strip()
    if not stripped:
        raise ValidationError("'text' is empty or whitespace only")
    parts = _BLANK_LINE.split(stripped, maxsplit=1)
    return PromptParts(parts[0].strip(), len(parts) == 2 and bool(parts[1].strip()))


def features(embeddings: np.ndarray, has_context: np.ndarray) -> np.ndarray:
    """[e * c, e * (1 - c), c] for instruction embeddings e and context flags c.

    Equivalent to two logistic regressions, one for prompts with a context (summarization
    or a question about the text) and one for prompts without (completion or a question),
    sharing one set of class weights.
    """
    x = check_embeddings(embeddings)
    return gated(x, check_context_flags(has_context, len(x)))


def gated(x: np.ndarray, has_context: np.ndarray) -> np.ndarray:
    """[x * c, x * (1 - c), c] for rows x of any width (training compares other encoders)."""
    c = np.asarray(has_context).astype(x.dtype)[:, None]
    return np.hstack([x * c, x * (1 - c), c])


def prompt_features(texts: Sequence[str], embed: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """:func:`features` of whole prompts, given a function that embeds texts.

    What ``intent_classifier`` computes in the server (split, embed the instruction, gate);
    training and the in-process benchmarks use it so they see exactly the same features.
    """
    instructions, flags = split_prompts(texts)
    return features(embed(instructions), flags)


def split_prompts(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Instructions and has-context flags of whole prompts, as ``intent_split`` cuts them."""
    parts = [split_prompt(t) for t in texts]
    return [p.instruction for p in parts], np.array([p.has_context for p in parts])


def check_context_flags(has_context: np.ndarray, rows: int) -> np.ndarray:
    """``has_context`` as bool [rows], or a ValidationError if it is not one flag per row."""
    flags = np.asarray(has_context).reshape(-1)
    if flags.shape != (rows,):
        raise ValidationError(
            f"'has_context' must hold one flag per embedding ({rows}), got {flags.size}"
        )
    return flags.astype(bool)


@dataclass(frozen=True)
class Prediction:
    intents: list[str]
    confidence: np.ndarray  # float32 [n]: probability of the chosen intent
    probabilities: np.ndarray  # float32 [n, len(LABELS)]


@dataclass(frozen=True)
class IntentHead:
    weights: np.ndarray  # float32 [FEATURES, len(LABELS)]
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
        if head.weights.shape != (FEATURES, len(LABELS)) or head.bias.shape != (len(LABELS),):
            raise ConfigError(
                f"{path}: weights {head.weights.shape} do not map {FEATURES} features -> 3"
            )
        return head

    def save(self, path: Path) -> None:
        np.savez(path, weights=self.weights, bias=self.bias, labels=np.array(LABELS))

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities for rows of :func:`features`."""
        return softmax(np.asarray(x) @ self.weights + self.bias)

    def predict(self, x: np.ndarray) -> Prediction:
        """Intent, confidence and probabilities for rows of :func:`features`."""
        probs = self.probabilities(x)
        best = probs.argmax(axis=1)
        return Prediction(
            intents=[LABELS[i] for i in best],
            confidence=probs[np.arange(len(best)), best].astype(np.float32),
            probabilities=probs.astype(np.float32),
        )


def weights_path(model_repository: str, version: str, configured: str) -> Path | None:
    """Which weights an ``intent_head`` instance loads.

    The ``weights`` parameter when set; else the version folder's own ``intent_head.npz``
    (a version written by ``scripts/retrain_intent.py``); else None, the committed
    :data:`DEFAULT_WEIGHTS` (version 1 holds only ``model.py``).
    """
    if configured:
        return Path(configured)
    own = Path(model_repository) / version / WEIGHTS_NAME
    return own if own.is_file() else None


def check_embeddings(embeddings: np.ndarray) -> np.ndarray:
    """Rows of encoder vectors as float32 [n, DIM], or a ValidationError saying what is off."""
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
