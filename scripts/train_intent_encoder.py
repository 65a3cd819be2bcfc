#!/usr/bin/env python
"""Fine-tune the intent encoder on Dolly 15k prompts and own examples; compare and calibrate.

One run does, on the same repeated stratified held-out splits (seeds 1..N, 25 % of each
class held out, Dolly prompts only):

- the frozen-feature head served before (``scripts/train_intent_head.py``'s recipe),
- the fine-tuned encoder (top MiniLM layers + linear head, class-weighted),
- a TF-IDF + logistic regression baseline,

and prints mean and sd of accuracy and per-class recall. The encoder's held-out logits of
all splits fit the temperature (calibration); ECE before/after is cross-fitted (each
split scored with the temperature fitted on the other splits). The router's threshold
curve (share of prompts below a threshold vs accuracy above it) is printed and drawn.
Then the served model is trained on every row and written to
``serving/data/intent_encoder.npz`` with that temperature.

``--check`` retrains the served model only and compares its probabilities with the
committed file's on every training prompt and the clear test set, with a tolerance (not
bit for bit: another CPU's rounding differs in the last bits), writing nothing.

Data: Databricks Dolly 15k (CC BY-SA 3.0), see serving/data/LICENSE-dolly.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from serving.intent import LABELS  # noqa: E402
from serving.intent_encoder import DEFAULT_ENCODER_WEIGHTS, EncoderWeights  # noqa: E402
from serving.intent_finetune import (  # noqa: E402
    FinetuneOptions,
    LowerCache,
    compare,
    ece,
    finetune,
    fit_temperature,
    logits_of,
    pick_threshold,
    quiet_transformers,
    softmax_t,
    tfidf_predict,
    threshold_curve,
)
from serving.intent_training import build_dataset, read_jsonl, recalls  # noqa: E402

DOLLY = ROOT.parent / "shared" / "data" / "dolly_sample.jsonl"
OWN = ROOT / "serving" / "data" / "intent_extra.jsonl"
#: Own questions with their own passages (closed QA): the encoder reads the context, and
#: Dolly's sample labels many question + passage prompts summarization (docs/intent.md).
OWN_QA = ROOT / "serving" / "data" / "intent_extra_qa.jsonl"
CLEAR = ROOT / "tests" / "data" / "intent_clear.jsonl"
CURVE_PNG = ROOT / "docs" / "intent_threshold_curve.png"
METHODS = ("frozen head", "TF-IDF + LR", "fine-tuned encoder")


def summary_table(rows: dict[str, list[list[float]]]) -> str:
    """Markdown: mean (sd) of accuracy and per-class recall per method."""
    names = ["accuracy", *(f"recall {label}" for label in LABELS), "min recall"]
    lines = [
        "| method | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for method, values in rows.items():
        v = np.array(values)
        v = np.hstack([v, v[:, 1:].min(axis=1, keepdims=True)])
        cells = " | ".join(f"{m:.3f} ({s:.3f})" for m, s in zip(v.mean(0), v.std(0), strict=True))
        lines.append(f"| {method} | {cells} |")
    return "\n".join(lines)


def curve_markdown(curve) -> str:
    lines = ["| threshold | share below | accuracy above |", "|---|---|---|"]
    lines += [
        f"| {c.threshold:.2f} | {c.share_below:.3f} | {c.accuracy_above:.3f} |" for c in curve
    ]
    return "\n".join(lines)


def draw_curve(curve, chosen, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot([c.share_below for c in curve], [c.accuracy_above for c in curve], marker="o")
    for c in curve:
        ax.annotate(f"{c.threshold:.2f}", (c.share_below, c.accuracy_above), fontsize=7)
    ax.scatter([chosen.share_below], [chosen.accuracy_above], s=120, facecolors="none", ec="red")
    ax.set_xlabel("share of prompts below the threshold (sent to the low-confidence tier)")
    ax.set_ylabel("accuracy of prompts above it")
    ax.set_title("confidence threshold: held-out Dolly, calibrated", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def repeated_splits(dolly, own, seeds: int, cache: LowerCache, options: FinetuneOptions):
    """Three methods on splits 1..seeds; the encoder's held-out logits and labels per split."""
    from train_intent_head import Embedder, fit

    embed = Embedder()
    rows: dict[str, list[list[float]]] = {m: [] for m in METHODS}
    held: list[tuple[np.ndarray, np.ndarray]] = []
    for seed in range(1, seeds + 1):
        start = time.monotonic()
        data = build_dataset(dolly, own, 0.25, seed)
        texts = [e.text for e in data.train]
        y = np.array([e.label for e in data.train])
        test = [e.text for e in data.held_out]
        truth = np.array([e.label for e in data.held_out])
        own_rows = np.array([e.source == "own" for e in data.train])
        logits = logits_of(finetune(texts, y, cache, options), test, cache)
        predicted = {
            "frozen head": fit(data, embed)[3],
            "TF-IDF + LR": tfidf_predict(texts, y, own_rows, test),
            "fine-tuned encoder": logits.argmax(axis=1),
        }
        for method, p in predicted.items():
            rows[method].append([float((p == truth).mean()), *recalls(truth, p)])
        held.append((logits, truth))
        accs = ", ".join(f"{m} {rows[m][-1][0]:.3f}" for m in METHODS)
        print(f"split {seed}: {accs} ({time.monotonic() - start:.0f} s)", flush=True)
    return rows, held


def calibration(held: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, str, np.ndarray]:
    """Temperature over all splits, cross-fitted ECE before/after, calibrated probabilities."""
    logits = np.concatenate([h[0] for h in held])
    truth = np.concatenate([h[1] for h in held])
    temperature = fit_temperature(logits, truth)
    before, after = [], []
    for k, (lg, y) in enumerate(held):
        others = [h for j, h in enumerate(held) if j != k] or held
        t_k = fit_temperature(
            np.concatenate([h[0] for h in others]), np.concatenate([h[1] for h in others])
        )
        before.append(ece(softmax_t(lg), y))
        after.append(ece(softmax_t(lg, t_k), y))
    text = (
        f"temperature {temperature:.3f} (fitted on {len(truth)} held-out predictions of "
        f"{len(held)} splits); ECE before {np.mean(before):.3f} (sd {np.std(before):.3f}), "
        f"after {np.mean(after):.3f} (sd {np.std(after):.3f}), cross-fitted per split"
    )
    return temperature, text, softmax_t(logits, temperature)


def all_rows(dolly, own) -> tuple[list[str], np.ndarray]:
    data = build_dataset(dolly, own, 0.0, 0)
    return [e.text for e in data.train], np.array([e.label for e in data.train])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DOLLY, help="Dolly JSONL")
    parser.add_argument(
        "--own", type=Path, nargs="+", default=[OWN, OWN_QA], help="own examples JSONL files"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_ENCODER_WEIGHTS, help="weights file")
    parser.add_argument("--repeat", type=int, default=3, metavar="N", help="held-out splits 1..N")
    parser.add_argument("--epochs", type=int, default=FinetuneOptions.epochs)
    parser.add_argument("--layers", type=int, default=FinetuneOptions.trainable_layers)
    parser.add_argument(
        "--check",
        action="store_true",
        help="retrain the served model and compare predictions with --out; write nothing",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    quiet_transformers()
    for path in (args.data, *args.own):
        if not path.is_file():
            parser.error(f"{path} not found")
    if args.repeat < (0 if args.check else 2):
        parser.error("--repeat must be >= 2 (the temperature is cross-fitted over splits)")

    dolly, own = read_jsonl(args.data), [r for path in args.own for r in read_jsonl(path)]
    options = FinetuneOptions(trainable_layers=args.layers, epochs=args.epochs)
    cache = LowerCache(options)
    texts, y = all_rows(dolly, own)

    if args.check:
        committed = EncoderWeights.load(args.out)
        probe = texts + ([r["text"] for r in read_jsonl(CLEAR)] if CLEAR.is_file() else [])
        weights = finetune(texts, y, cache, options).with_temperature(committed.temperature)
        ok, message = compare(
            softmax_t(logits_of(committed, probe, cache), committed.temperature),
            softmax_t(logits_of(weights, probe, cache), committed.temperature),
        )
        print(f"{'OK' if ok else 'MISMATCH'}: {len(probe)} prompts, {message}")
        return 0 if ok else 1

    rows, held = repeated_splits(dolly, own, args.repeat, cache, options)
    print(f"\nHeld-out splits of seeds 1-{args.repeat}, mean (sd):\n")
    print(summary_table(rows))
    temperature, text, calibrated = calibration(held)
    print("\nCalibration: " + text)
    truth = np.concatenate([h[1] for h in held])
    curve = threshold_curve(calibrated, truth)
    chosen = pick_threshold(curve)
    print("\nThreshold curve (calibrated held-out probabilities of all splits):\n")
    print(curve_markdown(curve))
    print(
        f"\nchosen confidence_threshold: {chosen.threshold:.2f} "
        f"(share below {chosen.share_below:.3f}, accuracy above {chosen.accuracy_above:.3f})"
    )
    draw_curve(curve, chosen, CURVE_PNG)
    print(f"wrote {CURVE_PNG}")

    weights = finetune(texts, y, cache, options).with_temperature(temperature)
    weights.save(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB, {len(texts)} training rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
