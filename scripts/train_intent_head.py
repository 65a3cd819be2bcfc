#!/usr/bin/env python
"""Train the intent head on MiniLM embeddings of Dolly 15k prompts and own examples.

Writes ``serving/data/intent_head.npz`` and prints the held-out report (accuracy,
per-class recall, confusion matrix) that ``docs/intent.md`` quotes. With ``--check`` it
retrains and verifies the committed weights are reproduced bit for bit, writing nothing.

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

from serving.intent import DEFAULT_WEIGHTS, IntentHead  # noqa: E402
from serving.intent_training import (  # noqa: E402
    build_dataset,
    read_jsonl,
    report_markdown,
    same_weights,
    train_logistic,
)

DOLLY = ROOT.parent / "shared" / "data" / "dolly_sample.jsonl"
OWN = ROOT / "serving" / "data" / "intent_extra.jsonl"


def embed(texts: list[str]) -> np.ndarray:
    from rich.progress import track

    from serving.embedding import Runtime, load_embedder

    embedder = load_embedder(Runtime.ONNX, threads=1)
    return np.concatenate(
        [embedder.embed([t]).vectors for t in track(texts, description="embedding prompts")]
    )


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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for path in (args.data, args.own):
        if not path.is_file():
            parser.error(f"{path} not found")
    if not 0 < args.held_out < 1:
        parser.error("--held-out must be between 0 and 1")

    data = build_dataset(read_jsonl(args.data), read_jsonl(args.own), args.held_out, args.seed)
    x = embed([e.text for e in data.train + data.held_out])
    x_train, x_held = x[: len(data.train)], x[len(data.train) :]
    head = train_logistic(x_train, np.array([e.label for e in data.train]))

    truth = [e.label for e in data.held_out]
    predicted = head.probabilities(x_held).argmax(axis=1).tolist()
    own = sum(e.source == "own" for e in data.train)
    print(
        f"train: {len(data.train)} examples ({own} own), held out: {len(data.held_out)} Dolly prompts\n"
    )
    print(report_markdown(truth, predicted))

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
