#!/usr/bin/env python
"""Train the intent head on MiniLM embeddings of Dolly 15k prompts and own examples.

Chooses the L2 penalty by 5-fold cross-validation on the training side, writes
``serving/data/intent_head.npz`` and prints the held-out report (accuracy, per-class
recall, confusion matrix) that ``docs/intent.md`` quotes. With ``--check`` it retrains and
verifies the committed weights are reproduced bit for bit, writing nothing. With
``--repeat N`` it also retrains on the held-out splits of seeds 1..N (selection included)
and prints the mean and spread, so one lucky or unlucky split does not tell the story.

Embeddings come from the same ONNX runtime the ``embedding`` model serves with, one
text at a time on one thread, so batch composition and thread count cannot change a bit.

Data: Databricks Dolly 15k (CC BY-SA 3.0), see serving/data/LICENSE-dolly.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.intent import DEFAULT_WEIGHTS, LABELS, IntentHead, prompt_features  # noqa: E402
from serving.intent_training import (  # noqa: E402
    Dataset,
    build_dataset,
    read_jsonl,
    recalls,
    report_markdown,
    same_weights,
    select_l2,
    train_logistic,
)

DOLLY = ROOT.parent / "shared" / "data" / "dolly_sample.jsonl"
OWN = ROOT / "serving" / "data" / "intent_extra.jsonl"


class Embedder:
    """The serving ONNX runtime, one text at a time on one thread, memoised by text."""

    def __init__(self) -> None:
        from serving.embedding import Runtime, load_embedder

        self._embedder = load_embedder(Runtime.ONNX, threads=1)
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, texts: list[str]) -> np.ndarray:
        from rich.progress import track

        missing = sorted(set(texts) - self._cache.keys())
        for text in track(missing, description="embedding instructions", disable=not missing):
            self._cache[text] = self._embedder.embed([text]).vectors[0]
        return np.stack([self._cache[t] for t in texts])


def fit(data: Dataset, embed: Embedder) -> tuple[IntentHead, float, dict[float, float], np.ndarray]:
    """Select L2 on the training side, train, and predict the held-out prompts."""
    x = prompt_features([e.text for e in data.train], embed)
    y = np.array([e.label for e in data.train])
    l2, scores = select_l2(x, y, np.array([e.source == "own" for e in data.train]))
    head = train_logistic(x, y, l2)
    held = prompt_features([e.text for e in data.held_out], embed)
    return head, l2, scores, head.probabilities(held).argmax(axis=1)


def repeat_report(
    dolly: list[dict], own: list[dict], fraction: float, seeds: int, embed: Embedder
) -> str:
    """Held-out accuracy and recall over split seeds 1..seeds: mean, sd, and goal count."""
    rows = []
    for seed in range(1, seeds + 1):
        data = build_dataset(dolly, own, fraction, seed)
        truth = np.array([e.label for e in data.held_out])
        _, _, _, predicted = fit(data, embed)
        recall = recalls(truth, predicted)
        rows.append([float((predicted == truth).mean()), *recall, float(recall.mean())])
    values = np.array(rows)
    met = int(((values[:, 0] >= 0.85) & (values[:, 1:4].min(axis=1) >= 0.75)).sum())
    names = ["accuracy", *(f"recall {label}" for label in LABELS), "balanced accuracy"]
    lines = [f"Held-out splits of seeds 1-{seeds} (L2 selected on each training side):", ""]
    lines += [
        f"- {n}: {m:.3f} (sd {sd:.3f}, min {lo:.3f}, max {hi:.3f})"
        for n, m, sd, lo, hi in zip(
            names, values.mean(0), values.std(0), values.min(0), values.max(0), strict=True
        )
    ]
    lines.append(
        f"- splits meeting the goal (accuracy >= 0.85, every recall >= 0.75): {met} of {seeds}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=DOLLY, help="Dolly JSONL (default: %(default)s)"
    )
    parser.add_argument(
        "--own", type=Path, default=OWN, help="own examples JSONL (default: %(default)s)"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_WEIGHTS, help="weights file (default: %(default)s)"
    )
    parser.add_argument("--held-out", type=float, default=0.25, help="held-out fraction per class")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    parser.add_argument(
        "--check",
        action="store_true",
        help="retrain and compare with --out bit for bit; write nothing",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=0,
        metavar="N",
        help="also report held-out results over the splits of seeds 1..N",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for path in (args.data, args.own):
        if not path.is_file():
            parser.error(f"{path} not found")
    if not 0 < args.held_out < 1:
        parser.error("--held-out must be between 0 and 1")
    if args.repeat < 0:
        parser.error("--repeat must be >= 0")

    dolly, own = read_jsonl(args.data), read_jsonl(args.own)
    data = build_dataset(dolly, own, args.held_out, args.seed)
    embed = Embedder()
    head, l2, scores, predicted = fit(data, embed)
    n_own = sum(e.source == "own" for e in data.train)
    print(
        f"train: {len(data.train)} examples ({n_own} own), held out: {len(data.held_out)} Dolly prompts"
    )
    print(
        "L2 by 5-fold CV balanced accuracy on the training side: "
        + ", ".join(f"{k:g}: {v:.3f}" for k, v in scores.items())
        + f" -> {l2:g}\n"
    )
    print(report_markdown([e.label for e in data.held_out], predicted.tolist()))
    if args.repeat:
        print("\n" + repeat_report(dolly, own, args.held_out, args.repeat, embed))

    if args.check:
        if not args.out.is_file():
            parser.error(f"{args.out} not found; nothing to check")
        if not same_weights(head, IntentHead.load(args.out)):
            print(f"\nMISMATCH: retrained weights differ from {args.out}", file=sys.stderr)
            return 1
        print(f"\nOK: {args.out} reproduced bit for bit")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    head.save(args.out)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
