#!/usr/bin/env python
"""Retrain the intent classifier on a team's own labels and load it into a running server.

    .venv/bin/python scripts/retrain_intent.py --data team.jsonl --server 127.0.0.1:8000

``team.jsonl`` holds one ``{"text": "...", "intent": "..."}`` per line, intent one of
completion, summarization, question_answering; a prompt with a context is the instruction,
a blank line, then the context. The file is checked first (unknown intents, empty text,
duplicates, too few rows per class): a bad file is an error listing every problem, and
nothing is trained.

Then: a stratified held-out split (``--held-out`` of each class), the encoder fine-tuned
on the rest (same recipe as ``scripts/train_intent_encoder.py``), the temperature fitted
on the held-out rows, and the report (accuracy, per-class recall, confusion matrix, ECE
before/after). The trained weights go into a new version folder of ``intent_encoder``
in the model repository (``<N>/model.py`` + ``<N>/intent_encoder.npz`` +
``<N>/report.md``). With ``--server``, Triton's model control loads it (explicit mode,
no restart): the newest two versions are served (``version_policy``), so the previous one
stays loaded for rollback. Roll back by deleting the folder and loading again (``--rollback``).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.errors import ValidationError  # noqa: E402
from serving.intent_encoder import WEIGHTS_NAME  # noqa: E402
from serving.intent_finetune import (  # noqa: E402
    FinetuneOptions,
    LowerCache,
    ece,
    finetune,
    fit_temperature,
    logits_of,
    quiet_transformers,
    softmax_t,
)
from serving.intent_training import (  # noqa: E402
    MIN_ROWS_PER_CLASS,
    held_out_mask,
    labelled_rows,
    report_markdown,
)

MODEL = "intent_encoder"
ENSEMBLE = "intent_classifier"


def versions(model_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def load(server: str, model_dir: Path) -> str:
    """Load the model's versions on disk, then the ensemble, through Triton's model control."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server)
    client.load_model(MODEL)
    client.load_model(ENSEMBLE)
    newest = versions(model_dir)[-1]
    ready = [v for v in versions(model_dir) if client.is_model_ready(MODEL, str(v))]
    if newest not in ready:
        raise RuntimeError(f"{MODEL} version {newest} did not become ready")
    return f"loaded {MODEL} on {server}: versions ready {ready}, {ENSEMBLE} serves {newest}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, help='JSONL of {"text", "intent"} rows')
    parser.add_argument(
        "--repository",
        type=Path,
        default=ROOT / "model_repository",
        help="model repository the server serves (default: %(default)s)",
    )
    parser.add_argument("--server", help="host:port of the server's HTTP endpoint, to load into")
    parser.add_argument("--held-out", type=float, default=0.2, help="held-out share per class")
    parser.add_argument("--epochs", type=int, default=FinetuneOptions.epochs)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--min-per-class", type=int, default=MIN_ROWS_PER_CLASS, help="rows needed per intent"
    )
    parser.add_argument(
        "--rollback",
        action="store_true",
        help="delete the newest retrained version folder and load again (needs --server)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    quiet_transformers()
    model_dir = args.repository / MODEL
    if not (model_dir / "config.pbtxt").is_file():
        parser.error(f"{model_dir} is not the {MODEL} model")

    if args.rollback:
        newest = versions(model_dir)[-1]
        if newest == 1 or not (model_dir / str(newest) / WEIGHTS_NAME).is_file():
            parser.error("no retrained version to roll back")
        shutil.rmtree(model_dir / str(newest))
        print(f"removed version {newest}")
        if args.server:
            print(load(args.server, model_dir))
        return 0

    if args.data is None:
        parser.error("--data is required")
    if not 0 < args.held_out < 0.5:
        parser.error("--held-out must be between 0 and 0.5")
    try:
        rows = labelled_rows(args.data, args.min_per_class)
    except ValidationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    texts = [t for t, _ in rows]
    y = np.array([label for _, label in rows])
    held = held_out_mask(y, args.held_out, args.seed)
    train = [t for t, h in zip(texts, held, strict=True) if not h]
    test = [t for t, h in zip(texts, held, strict=True) if h]
    options = FinetuneOptions(epochs=args.epochs, seed=args.seed)
    cache = LowerCache(options)
    print(f"{len(rows)} rows: training on {len(train)}, holding out {len(test)}", flush=True)
    weights = finetune(train, y[~held], cache, options)
    logits = logits_of(weights, test, cache)
    temperature = fit_temperature(logits, y[held])
    report = "\n".join(
        [
            f"Retrained on {args.data.name}: {len(train)} rows, {len(test)} held out.",
            "",
            report_markdown(y[held].tolist(), logits.argmax(axis=1).tolist()),
            "",
            f"Calibration: temperature {temperature:.3f}; ECE on the held-out rows "
            f"{ece(softmax_t(logits), y[held]):.3f} before, "
            f"{ece(softmax_t(logits, temperature), y[held]):.3f} after (the temperature is "
            "fitted on those same rows: one parameter, but read it as optimistic).",
        ]
    )
    print("\n" + report + "\n")

    version = versions(model_dir)[-1] + 1
    target = model_dir / str(version)
    target.mkdir()
    shutil.copy2(model_dir / "1" / "model.py", target / "model.py")
    weights.with_temperature(temperature).save(target / WEIGHTS_NAME)
    (target / "report.md").write_text(report + "\n")
    print(f"wrote {target}")
    if args.server:
        print(load(args.server, model_dir))
    else:
        print("not loaded (no --server); a server started now serves it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
