"""Fine-tuning the intent encoder (:mod:`serving.intent_encoder`), calibration and baselines.

Used by ``scripts/train_intent_encoder.py`` (Dolly + own examples) and
``scripts/retrain_intent.py`` (a team's own labels). Deterministic on one machine: seeded
torch and numpy generators, a fixed thread count, the frozen layers computed once per
text (alone, so batch composition cannot change them), the head started from zeros.
Across CPUs (AVX2 vs AVX-512) float rounding differs in the last bits and training
amplifies it a little, so reproduction is checked on predictions with a tolerance, never
bit for bit (:func:`compare`).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serving.assets import minilm_dir
from serving.intent import split_context
from serving.intent_encoder import LAYERS, MAX_TOKENS, EncoderWeights, Tokens, encoder_module
from serving.intent_training import class_weights, select_l2, train_logistic

#: Thresholds the routing curve is measured at.
THRESHOLDS = tuple(round(0.35 + 0.05 * i, 2) for i in range(13))


@dataclass(frozen=True)
class FinetuneOptions:
    trainable_layers: int = 2
    epochs: int = 4
    batch_size: int = 16
    learning_rate: float = 1e-4  # the encoder layers
    head_learning_rate: float = 3e-3
    weight_decay: float = 0.01
    seed: int = 0
    threads: int = 2
    max_tokens: int = MAX_TOKENS


def quiet_transformers() -> None:
    """No per-load progress bar: training loads MiniLM once per fit."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


class LowerCache:
    """Hidden states after the frozen layers, per text, computed once and reused.

    Every text is encoded alone (no padding), so its hidden states do not depend on
    which texts it was batched with; repeated splits and the final fit share them.
    """

    def __init__(self, options: FinetuneOptions, model_dir: Path | None = None) -> None:
        import torch

        torch.set_num_threads(options.threads)
        self.model_dir = model_dir or minilm_dir()
        self.options = options
        self.module = encoder_module(self.model_dir, None, options.trainable_layers)
        self.tokens = Tokens(self.model_dir, options.max_tokens)
        self._cache: dict[str, object] = {}

    def fill(self, texts: Sequence[str], progress: Callable | None = None) -> None:
        import torch

        missing = sorted(set(texts) - self._cache.keys())
        for text, (ids, types) in zip(missing, self.tokens.encode(missing), strict=True):
            t = torch.tensor([ids])
            with torch.inference_mode():
                hidden = self.module.lower(t, torch.ones_like(t), torch.tensor([types]))
            self._cache[text] = hidden[0].clone()
            if progress:
                progress()

    def batch(self, texts: Sequence[str]):  # -> (hidden [n, L, H], mask [n, L]) tensors
        import torch

        self.fill(texts)
        rows = [self._cache[t] for t in texts]
        width = max(len(r) for r in rows)
        hidden = torch.zeros(len(rows), width, rows[0].shape[1])
        mask = torch.zeros(len(rows), width, dtype=torch.int64)
        for i, r in enumerate(rows):
            hidden[i, : len(r)] = r
            mask[i, : len(r)] = 1
        return hidden, mask


def _upper_params(module, trainable_layers: int) -> dict:
    prefix = tuple(f"bert.encoder.layer.{i}." for i in range(LAYERS - trainable_layers, LAYERS))
    return {
        k: v for k, v in module.named_parameters() if k.startswith(prefix) or k.startswith("head.")
    }


def finetune(
    texts: Sequence[str],
    labels: Sequence[int],
    cache: LowerCache,
    options: FinetuneOptions | None = None,
    progress: Callable | None = None,
) -> EncoderWeights:
    """Train the top layers and the head with class-weighted cross-entropy (AdamW).

    Returns the weights rounded to float16, as they are stored and served.
    """
    import torch

    options = options or cache.options
    torch.manual_seed(options.seed)
    torch.set_num_threads(options.threads)
    y = np.asarray(labels)
    module = encoder_module(cache.model_dir, None, options.trainable_layers)
    torch.nn.init.zeros_(module.head.weight)
    torch.nn.init.zeros_(module.head.bias)
    params = _upper_params(module, options.trainable_layers)
    for name, p in module.named_parameters():
        p.requires_grad_(name in params)
    head = [p for k, p in params.items() if k.startswith("head.")]
    body = [p for k, p in params.items() if not k.startswith("head.")]
    optimizer = torch.optim.AdamW(
        [
            {"params": body, "lr": options.learning_rate},
            {"params": head, "lr": options.head_learning_rate},
        ],
        weight_decay=options.weight_decay,
    )
    steps = options.epochs * math.ceil(len(texts) / options.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / (0.1 * steps)) * (1 - step / steps)
    )
    weight = torch.tensor(class_weights(y), dtype=torch.float32)
    rng = np.random.default_rng(options.seed)
    cache.fill(texts)
    module.train()
    for _ in range(options.epochs):
        order = rng.permutation(len(texts))
        for start in range(0, len(order), options.batch_size):
            idx = order[start : start + options.batch_size]
            hidden, mask = cache.batch([texts[i] for i in idx])
            logits = module.logits(hidden, mask)
            loss = torch.nn.functional.cross_entropy(
                logits, torch.from_numpy(y[idx]), weight=weight
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            if progress:
                progress()
    state = {k: v.detach().numpy().copy() for k, v in params.items()}
    return EncoderWeights(state, options.trainable_layers, 1.0, options.max_tokens).rounded()


def logits_of(weights: EncoderWeights, texts: Sequence[str], cache: LowerCache) -> np.ndarray:
    """The encoder's logits (before temperature) for ``texts``, float64 [n, 3]."""
    import torch

    module = encoder_module(cache.model_dir, weights, weights.trainable_layers)
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), 64):
            hidden, mask = cache.batch(texts[start : start + 64])
            out.append(module.logits(hidden, mask).double().numpy())
    return np.concatenate(out)


# ---- calibration ----


def softmax_t(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    p = softmax_t(logits, temperature)
    return float(-np.log(np.maximum(p[np.arange(len(labels)), labels], 1e-12)).mean())


def fit_temperature(logits: np.ndarray, labels: Sequence[int]) -> float:
    """The temperature minimising held-out negative log-likelihood, on a fixed grid.

    A grid (0.25 .. 8, 1 % steps) rather than an optimiser: same answer on any machine.
    """
    y = np.asarray(labels)
    grid = np.exp(np.linspace(math.log(0.25), math.log(8.0), 350))
    scores = [nll(logits, y, t) for t in grid]
    return float(round(grid[int(np.argmin(scores))], 4))


def ece(probabilities: np.ndarray, labels: Sequence[int], bins: int = 10) -> float:
    """Expected calibration error: |accuracy - confidence| per confidence bin, weighted."""
    p = np.asarray(probabilities)
    confidence = p.max(axis=1)
    correct = p.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - confidence[sel].mean())
    return float(total)


@dataclass(frozen=True)
class CurvePoint:
    threshold: float
    share_below: float  # prompts the router sends to its low-confidence tier
    accuracy_above: float  # accuracy of the prompts routed by their intent


def threshold_curve(probabilities: np.ndarray, labels: Sequence[int]) -> list[CurvePoint]:
    p = np.asarray(probabilities)
    confidence = p.max(axis=1)
    correct = p.argmax(axis=1) == np.asarray(labels)
    points = []
    for t in THRESHOLDS:
        above = confidence >= t
        acc = float(correct[above].mean()) if above.any() else float("nan")
        points.append(CurvePoint(t, float((~above).mean()), acc))
    return points


def pick_threshold(
    curve: Sequence[CurvePoint], target: float = 0.9, max_below: float = 0.25
) -> CurvePoint:
    """The lowest threshold whose routed prompts are ``target`` accurate, within ``max_below``.

    When no threshold reaches the target with at most ``max_below`` of the prompts sent to
    the low-confidence tier, the most accurate one within that share.
    """
    allowed = [c for c in curve if c.share_below <= max_below]
    reaching = [c for c in allowed if c.accuracy_above >= target]
    if reaching:
        return min(reaching, key=lambda c: c.threshold)
    return max(allowed, key=lambda c: c.accuracy_above)


# ---- the TF-IDF + logistic regression baseline (numpy; no new dependency) ----


def _words(text: str) -> list[str]:
    instruction, context = split_context(text)
    words = re.findall(r"[a-z0-9']+", instruction.lower())
    terms = words + [f"{a} {b}" for a, b in itertools.pairwise(words)]
    return [*terms, "<context>"] if context else terms


@dataclass
class Tfidf:
    """Instruction unigrams and bigrams plus a has-context term; sublinear tf, L2 rows."""

    vocabulary: dict[str, int] = field(default_factory=dict)
    idf: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def fit(self, texts: Sequence[str]) -> Tfidf:
        docs = [set(_words(t)) for t in texts]
        terms = sorted(set().union(*docs))
        self.vocabulary = {t: i for i, t in enumerate(terms)}
        df = np.zeros(len(terms))
        for d in docs:
            df[[self.vocabulary[t] for t in d]] += 1
        self.idf = np.log((1 + len(texts)) / (1 + df)) + 1
        return self

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        x = np.zeros((len(texts), len(self.vocabulary)))
        for r, t in enumerate(texts):
            for w in _words(t):
                if w in self.vocabulary:
                    x[r, self.vocabulary[w]] += 1
        x = np.where(x > 0, 1 + np.log(np.maximum(x, 1)), 0) * self.idf
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def tfidf_predict(
    train_texts: Sequence[str],
    train_labels: Sequence[int],
    always_train: np.ndarray,
    test_texts: Sequence[str],
) -> np.ndarray:
    """Fit TF-IDF + class-weighted logistic regression (L2 by CV) and predict ``test_texts``."""
    vectorizer = Tfidf().fit(train_texts)
    x, y = vectorizer.transform(train_texts), np.asarray(train_labels)
    l2, _ = select_l2(x, y, always_train)
    head = train_logistic(x, y, l2)
    return head.probabilities(vectorizer.transform(test_texts)).argmax(axis=1)


def compare(
    reference: np.ndarray, retrained: np.ndarray, tolerance: float = 0.05
) -> tuple[bool, str]:
    """Whether retrained probabilities reproduce the reference, across CPUs.

    Same argmax on every row whose reference margin (top-1 minus top-2) exceeds
    ``tolerance``, and no probability off by more than ``2 * tolerance``; a row within
    the margin may flip, because another CPU's rounding may legitimately tip it.
    """
    ref, new = np.asarray(reference), np.asarray(retrained)
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > tolerance
    flips = int(((ref.argmax(1) != new.argmax(1)) & clear).sum())
    worst = float(np.abs(ref - new).max())
    ok = flips == 0 and worst <= 2 * tolerance
    return ok, (
        f"{flips} clear predictions differ, largest probability difference {worst:.4f} "
        f"(tolerance {2 * tolerance:g}), {int((~clear).sum())} rows within the margin"
    )
