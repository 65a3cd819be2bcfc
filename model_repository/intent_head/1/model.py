"""Triton adapter for ``intent_head``: instruction embedding + has_context -> intent.

The head (features, weights, softmax, labels) is :class:`serving.intent.IntentHead`; this
file only moves tensors. The ``intent_classifier`` ensemble feeds it from ``intent_split``
and ``intent_encoder``. A version folder written by ``scripts/retrain_intent.py`` is a
copy of this file beside that version's weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from serving.intent import (
    IntentHead,
    check_context_flags,
    check_embeddings,
    features,
    weights_path,
)
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
            configured = setup.params.get("weights", str, default="")
            path = weights_path(args["model_repository"], args["model_version"], configured)
            self.head = IntentHead.load(path)
        except Exception as exc:
            raise model_exception(exc) from exc
        self.name = setup.name

    def execute(self, requests: list[Any]) -> list[Any]:
        return execute_batch(
            requests,
            self._parse,
            lambda items: run_rows(self._classify, items),
            tensors,
            self.name,
        )

    @staticmethod
    def _parse(request: Any) -> list[tuple[np.ndarray, bool]]:
        embeddings = check_embeddings(get_input(request, "embedding", np.float32))
        flags = check_context_flags(get_input(request, "has_context", np.bool_), len(embeddings))
        return list(zip(embeddings, flags.tolist(), strict=True))

    def _classify(self, rows: list[tuple[np.ndarray, bool]]) -> dict[str, np.ndarray]:
        embeddings, flags = zip(*rows, strict=True)
        prediction = self.head.predict(features(np.stack(embeddings), np.array(flags)))
        return {
            "intent": string_array(prediction.intents, (-1, 1)),
            "confidence": prediction.confidence.reshape(-1, 1),
            "probabilities": prediction.probabilities,
        }
