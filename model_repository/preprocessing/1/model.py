"""preprocessing: prompt text -> the LLM tier's inputs (chat template, token ids, options).

Resolves every optional text-level input (``max_tokens``, ``temperature``, ``stream``)
to a concrete tensor, so the ensembles never pass an absent optional input downstream,
and rejects bad text early with a message about the text-level field.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from serving.errors import ValidationError
from serving.llm.service import PreprocessConfig, Preprocessor, PromptRequest
from serving.llm.tokenizer import tokenizer_for
from serving.text import decode_utf8
from serving.triton import (
    ModelSetup,
    execute_batch,
    get_input,
    get_optional_scalar,
    model_exception,
    tensors,
)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        try:
            setup = ModelSetup(args)
            self.name = setup.name
            config = PreprocessConfig.from_params(setup.params)
            tokenizer = tokenizer_for(setup.params.get("tokenizer_dir", str, None))
            self.preprocess = Preprocessor(tokenizer, config)
        except Exception as exc:
            raise model_exception(exc) from exc

    def _parse(self, request: Any) -> PromptRequest:
        text = get_input(request, "text_input", np.object_)
        if text.size != 1:
            raise ValidationError(
                f"'text_input' must hold one string, got shape {list(text.shape)}"
            )
        max_tokens = get_optional_scalar(request, "max_tokens", np.int32)
        temperature = get_optional_scalar(request, "temperature", np.float32)
        stream = get_optional_scalar(request, "stream", np.bool_)
        return self.preprocess.request(
            decode_utf8(text.reshape(-1)[0], "text_input"),
            max_tokens,
            temperature,
            bool(stream),
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        # Tokenizing is per request and can reject it (context), so it happens in the
        # parse step: a bad request gets its own error and the rest of the batch runs.
        return execute_batch(
            requests,
            lambda request: self.preprocess(self._parse(request)),
            lambda items: items,
            tensors,
            self.name,
        )
