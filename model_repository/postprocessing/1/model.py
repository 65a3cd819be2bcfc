"""postprocessing: token ids -> exact UTF-8 text, one stateless step per tier response.

Stateless by design (an ensemble step keeps no per-request state): each response's
tokens are mapped to their exact bytes, never decoded with per-chunk space or
replacement rules. The CPU tiers send character-aligned chunks, so every chunk is valid
UTF-8 and the concatenated stream equals the whole text (docs/llm.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from serving.llm.service import detokenize_batch
from serving.llm.tokenizer import TokenBytes, tokenizer_for
from serving.triton import ModelSetup, execute_batch, get_input, model_exception, tensor


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        try:
            setup = ModelSetup(args)
            self.name = setup.name
            self.token_bytes = TokenBytes(
                tokenizer_for(setup.params.get("tokenizer_dir", str, None))
            )
        except Exception as exc:
            raise model_exception(exc) from exc

    def _detokenize(self, request: Any) -> np.ndarray:
        tokens = get_input(request, "tokens_batch", np.int32)
        lengths = get_input(request, "sequence_length", np.int32, required=False)
        texts = detokenize_batch(self.token_bytes, tokens, lengths)
        return np.array(texts, dtype=np.object_).reshape(len(texts), 1)

    def execute(self, requests: list[Any]) -> list[Any]:
        return execute_batch(
            requests,
            self._detokenize,  # per request, so a bad one fails alone
            lambda items: items,
            lambda text: [tensor("text_output", text)],
            self.name,
        )
