#!/usr/bin/env python
"""Retrain the intent classifier on a team's own labels and load it into a running server.

    .venv/bin/python scripts/retrain_intent.py --data team.jsonl --server 127.0.0.1:8000

``team.jsonl`` holds one ``{"text": "...", "intent": "..."}`` per line, the intent one of
completion, summarization, question_answering; a prompt with a context is the
instruction, a blank line, then the context (as the server splits it). The file is
checked first (malformed rows, unknown intents, empty text, duplicates, too few rows per
intent): a bad file is an error listing every problem, exit status 2, and nothing is
trained or written.

Then, with the same code as ``scripts/train_intent_head.py``: a stratified held-out
split (``--held-out`` of each intent), the head trained on the rest of the team's rows
(the encoder stays as served; L2 by cross-validation, the temperature on out-of-fold
logits of the training side), and the report (accuracy, per-class recall, confusion
matrix, calibration error before and after). The head goes into a new version folder of
``intent_head`` in the model repository (``<N>/model.py``, ``<N>/intent_head.npz``,
``<N>/report.md``). With ``--server``, Triton's model control loads it, no restart: the
newest two versions are served (``version_policy``), so the previous one stays loaded,
and ``--rollback`` deletes the newest retrained version and loads again.
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
from serving.intent import ENCODER, WEIGHTS_NAME  # noqa: E402
from serving.intent_training import (  # noqa: E402
    MIN_ROWS_PER_CLASS,
    CachedEncoder,
    Dataset,
    expected_calibration_error,
    fit,
    held_out_mask,
    labelled_rows,
    report_markdown,
)

MODEL = "intent_head"
ENSEMBLE = "intent_classifier"


def versions(model_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def load(server: str, model_dir: Path) -> str:
    """Load the head's versions on disk, then the ensemble, through Triton's model control."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server)
    client.load_model(MODEL)
    client.load_model(ENSEMBLE)
    on_disk = versions(model_dir)
    ready = [v for v in on_disk if client.is_model_ready(MODEL, str(v))]
    if on_disk[-1] not in ready:
        raise RuntimeError(f"{MODEL} version {on_disk[-1]} did not become ready")
    return f"loaded {MODEL} on {server}: versions ready {ready}, {ENSEMBLE} serves {ready[-1]}"


def train_report(rows: list, held_out: float, seed: int, source: str):
    """Split, train, calibrate; returns the head and the markdown report."""
    labels = np.array([e.label for e in rows])
    held = held_out_mask(labels, held_out, seed)
    data = Dataset(
        [e for e, h in zip(rows, held, strict=True) if not h],
        [e for e, h in zip(rows, held, strict=True) if h],
    )
    result = fit(data, CachedEncoder(ENCODER))
    truth = labels[held]
    report = "\n".join(
        [
            f"Retrained on {source}: {len(data.train)} rows, {len(data.held_out)} held out "
            f"(seed {seed}); L2 {result.l2:g} by cross-validation on the training rows.",
            "",
            report_markdown(truth.tolist(), result.predicted.tolist()),
            "",
            f"Calibration: temperature {result.temperature:.3f} (fitted on out-of-fold logits "
            "of the training rows); expected calibration error on the held-out rows "
            f"{expected_calibration_error(result.held_probabilities(False), truth):.3f} before, "
            f"{expected_calibration_error(result.held_probabilities(), truth):.3f} after.",
        ]
    )
    return result.head, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, help='JSONL of {"text", "intent"} rows')
    parser.add_argument(
        "--repository",
        type=Path,
        default=ROOT / "model_repository",
        help="the model repository the server serves (default: %(default)s)",
    )
    parser.add_argument("--server", help="host:port of the server's HTTP endpoint, to load into")
    parser.add_argument("--held-out", type=float, default=0.2, help="held-out share per intent")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    parser.add_argument(
        "--min-per-class", type=int, default=MIN_ROWS_PER_CLASS, help="rows needed per intent"
    )
    parser.add_argument(
        "--rollback",
        action="store_true",
        help="delete the newest retrained version and load again",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
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
    head, report = train_report(rows, args.held_out, args.seed, args.data.name)
    print("\n" + report + "\n")

    target = model_dir / str(versions(model_dir)[-1] + 1)
    target.mkdir()
    shutil.copy2(model_dir / "1" / "model.py", target / "model.py")
    head.save(target / WEIGHTS_NAME)
    (target / "report.md").write_text(report + "\n")
    print(f"wrote {target}")
    if args.server:
        print(load(args.server, model_dir))
    else:
        print("not loaded (no --server): a server started from this repository serves it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
