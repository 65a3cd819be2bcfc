"""The Triton adapter of ``embedding`` and ``intent_encoder``: texts in, vectors out.

One implementation for both models: their ``model.py`` files are the same import of
:class:`EmbeddingModel` (a unit test fails if one drifts). The config's ``encoder``
parameter picks the encoder from :data:`serving.embedding.ENCODERS` (``minilm`` when
absent). Each request may carry several rows; a bad row (empty, invalid UTF-8) fails only
its own request with INVALID_ARG.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from serving.embedding import EmbeddingRequest, Runtime, encoder_spec, load_embedder
from serving.triton import (
    ModelSetup,
    execute_batch,
    get_input,
    model_exception,
    run_rows,
    tensors,
)


class EmbeddingModel:
    def initialize(self, args: dict[str, str]) -> None:
        try:
            setup = ModelSetup(args)
            threads = setup.set_torch_threads(default=1)
            runtime = Runtime.parse(setup.params.get("runtime", str, default=Runtime.ONNX.value))
            spec = encoder_spec(setup.params.get("encoder", str, default="minilm"))
            device = "cpu"
            if args.get("model_instance_kind") == "GPU":
                device = f"cuda:{args.get('model_instance_device_id', '0')}"
            chunk_tokens = setup.params.get("chunk_tokens", int, default=256)
            self.embedder = load_embedder(
                runtime, threads, device, chunk_tokens=chunk_tokens, spec=spec
            )
        except Exception as exc:
            raise model_exception(exc) from exc
        self.name = setup.name

    def execute(self, requests: list[Any]) -> list[Any]:
        return execute_batch(
            requests,
            self._parse,
            lambda items: run_rows(self._embed, items),
            tensors,
            self.name,
        )

    @staticmethod
    def _parse(request: Any) -> list[str]:
        return EmbeddingRequest.from_array(get_input(request, "text", np.object_)).texts

    def _embed(self, texts: list[str]) -> dict[str, np.ndarray]:
        result = self.embedder.embed(texts)
        return {"embedding": result.vectors, "truncated": result.truncated.reshape(-1, 1)}
