"""Triton adapter for ``intent_encoder``: prompt text -> intent, confidence, probabilities.

The fine-tuned MiniLM encoder (tokenizing, the ONNX export, the labels) is
:mod:`serving.intent_encoder`; this file only moves tensors. Each version folder may
carry its own weights (``intent_encoder.npz``, written by ``scripts/retrain_intent.py``);
version 1 serves the committed ``serving/data/intent_encoder.npz``. Empty or invalid
UTF-8 text is INVALID_ARG for its own request only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from serving.embedding import runtime_and_device
from serving.intent_encoder import EncoderWeights, IntentEncoder, weights_for_version
from serving.text import text_rows
from serving.triton import (
    ModelSetup,
    execute_batch,
    get_input,
    model_exception,
    run_rows,
    string_array,
    tensors,
)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        try:
            setup = ModelSetup(args)
            threads = setup.set_torch_threads(default=1)
            runtime, device = runtime_and_device(setup.params, args)
            version_dir = Path(args["model_repository"]) / str(args.get("model_version", "1"))
            path = weights_for_version(version_dir, setup.params.get("weights", str, default=""))
            self.encoder = IntentEncoder(EncoderWeights.load(path), threads, runtime, device)
        except Exception as exc:
            raise model_exception(exc) from exc
        self.name = setup.name

    def execute(self, requests: list[Any]) -> list[Any]:
        return execute_batch(
            requests, self._parse, lambda items: run_rows(self._classify, items), tensors, self.name
        )

    def _parse(self, request: Any) -> list[list[int]]:
        # Tokenizing here checks each text (empty, invalid UTF-8) for its own request.
        return self.encoder.tokens.encode(text_rows(get_input(request, "text", np.object_), "text"))

    def _classify(self, rows: list) -> dict[str, np.ndarray]:
        prediction = self.encoder.predict_tokens(rows)
        return {
            "intent": string_array(prediction.intents, (-1, 1)),
            "confidence": prediction.confidence.reshape(-1, 1),
            "probabilities": prediction.probabilities,
        }
