"""Which encoder features tell the three intents apart: MiniLM vs SmolLM2's layers.

The measurement behind ``intent_encoder``'s choice (SmolLM2-135M-Instruct, first 8
layers, mean pooled). Every kept prompt of the Dolly 15k sample (CC BY-SA 3.0,
Databricks; 394 after mapping categories to intents) is encoded once by its instruction
alone, as the server does:

- MiniLM (all-MiniLM-L6-v2, mean pooled, L2-normalised: the encoder used before);
- SmolLM2-135M-Instruct's hidden state after each of several layers, mean pooled over
  the tokens or taken at the last token (transformers, float32, ``output_hidden_states``).

Each feature set gets the same head as the server (the has-context gate, standardised
features, class-weighted logistic regression) on the same 20 stratified 75/25 splits
(seeds 1-20) at three L2 penalties; Dolly rows only, no own examples, so the features
alone are compared. Results go to ``benchmarks/results/intent_layers.{json,md}``::

    flock /tmp/bench.lock .venv/bin/python benchmarks/intent_layers.py
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llm import cpu_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from serving.intent import CATEGORY_TO_INTENT, LABELS, gated  # noqa: E402
from serving.intent_training import (  # noqa: E402
    Scaler,
    held_out_mask,
    read_jsonl,
    recalls,
    train_logistic,
)

DOLLY = ROOT.parent / "shared" / "data" / "dolly_sample.jsonl"
RESULTS = ROOT / "benchmarks" / "results"
LAYERS = (4, 6, 8, 10, 12, 15, 20)
L2S = (1e-4, 3e-4, 1e-3)


def features(instructions: list[str]) -> dict[str, np.ndarray]:
    import torch

    from serving.assets import smollm2_gguf
    from serving.embedding import MINILM, Runtime, load_embedder
    from serving.llm.runner import load_hf_model
    from serving.llm.tokenizer import load_tokenizer

    torch.set_num_threads(2)
    minilm = load_embedder(Runtime.ONNX, threads=2, spec=MINILM)
    out = {"MiniLM (mean, normalised)": minilm.embed(instructions).vectors}
    model, tokenizer = load_hf_model(smollm2_gguf()), load_tokenizer(smollm2_gguf())
    mean: dict[int, list[np.ndarray]] = {k: [] for k in LAYERS}
    last: dict[int, list[np.ndarray]] = {k: [] for k in LAYERS}
    with torch.inference_mode():
        for text in instructions:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
            for k in LAYERS:
                mean[k].append(hidden[k][0].mean(0).numpy())
                last[k].append(hidden[k][0, -1].numpy())
    for k in LAYERS:
        out[f"SmolLM2 layer {k}, mean"] = np.array(mean[k])
        out[f"SmolLM2 layer {k}, last token"] = np.array(last[k])
    return out


def evaluate(x: np.ndarray, flags: np.ndarray, y: np.ndarray, l2: float) -> dict[str, Any]:
    accuracy, recall = [], []
    for seed in range(1, 21):
        held = held_out_mask(y, 0.25, seed)
        scaler = Scaler.fit(x[~held])
        head = train_logistic(gated(scaler(x[~held]), flags[~held]), y[~held], l2, steps=600)
        predicted = head.probabilities(gated(scaler(x[held]), flags[held])).argmax(axis=1)
        accuracy.append(float((predicted == y[held]).mean()))
        recall.append(recalls(y[held], predicted))
    return {
        "l2": l2,
        "accuracy": float(np.mean(accuracy)),
        "accuracy_sd": float(np.std(accuracy)),
        "recall": np.mean(recall, axis=0).round(3).tolist(),
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Intent features: MiniLM vs SmolLM2-135M-Instruct's layers",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{report['machine']}. {report['prompts']} Dolly 15k sample prompts (CC BY-SA 3.0, "
        "Databricks), instruction alone plus the has-context flag; the served head's recipe "
        "(standardised, class-weighted logistic regression, 600 steps); mean over the same 20 "
        "stratified 75/25 splits; the best of three L2 penalties per row (read the top rows "
        "as slightly optimistic: the penalty is picked on the held-out side here, on the "
        "training side in `scripts/train_intent_head.py`).",
        "",
        "| features | L2 | accuracy (sd) | " + " | ".join(f"recall {x}" for x in LABELS) + " |",
        "|---|---|---|" + "---|" * len(LABELS),
    ]
    for name, row in sorted(report["rows"].items(), key=lambda kv: -kv[1]["accuracy"]):
        recall = " | ".join(f"{r:.3f}" for r in row["recall"])
        lines.append(
            f"| {name} | {row['l2']:g} | {row['accuracy']:.3f} ({row['accuracy_sd']:.3f}) "
            f"| {recall} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = [r for r in read_jsonl(DOLLY) if r["category"] in CATEGORY_TO_INTENT]
    y = np.array([LABELS.index(CATEGORY_TO_INTENT[r["category"]]) for r in rows])
    flags = np.array([bool(r.get("context", "").strip()) for r in rows])
    sets = features([r["instruction"] for r in rows])
    results = {}
    for name, x in sets.items():
        results[name] = max((evaluate(x, flags, y, l2) for l2 in L2S), key=lambda r: r["accuracy"])
        print(name, results[name], flush=True)
    report = {
        "command": shlex.join(["python", "benchmarks/intent_layers.py", *(argv or sys.argv[1:])]),
        "machine": cpu_model(),
        "prompts": len(rows),
        "rows": results,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "intent_layers.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output_dir / "intent_layers.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
