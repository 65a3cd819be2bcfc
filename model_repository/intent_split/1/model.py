"""Triton adapter for ``intent_split``: a prompt -> its instruction and whether a context follows.

The first step of ``intent_classifier``: the embedding step then embeds the instruction
alone and ``intent_head`` reads the flag. The rule is :func:`serving.intent.split_prompt`,
shared with the head's training. Empty or invalid UTF-8 text is INVALID_ARG for its own
request only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from serving.intent import PromptParts, split_prompt
from serving.text import text_rows
from serving.triton import ModelSetup, execute_batch, get_input, run_rows, string_array, tensors


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.name = ModelSetup(args).name

    def execute(self, requests: list[Any]) -> list[Any]:
        return execute_batch(
            requests, self._parse, lambda items: run_rows(self._split, items), tensors, self.name
        )

    @staticmethod
    def _parse(request: Any) -> list[PromptParts]:
        return [split_prompt(t) for t in text_rows(get_input(request, "text", np.object_), "text")]

    @staticmethod
    def _split(parts: list[PromptParts]) -> dict[str, np.ndarray]:
        return {
            "instruction": string_array([p.instruction for p in parts], (-1, 1)),
            "has_context": np.array([p.has_context for p in parts], dtype=np.bool_).reshape(-1, 1),
        }
