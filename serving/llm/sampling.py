"""Token selection: greedy, or temperature / top-k / top-p sampling with a per-request seed.

Each sampled request owns a ``torch.Generator`` seeded from its ``seed``, so its tokens do
not depend on which other requests happen to share the batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from serving.errors import ValidationError


@dataclass(frozen=True)
class SamplingParams:
    """The ``tensorrt_llm`` sampling inputs. ``temperature == 0`` or ``top_k == 1`` is greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 0.0
    seed: int | None = None

    def validate(self) -> None:
        if not self.temperature >= 0.0:  # also rejects NaN
            raise ValidationError(
                f"'temperature' must be >= 0 (0 means greedy), got {self.temperature}"
            )
        if self.top_k < 0:
            raise ValidationError(f"'runtime_top_k' must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValidationError(
                f"'runtime_top_p' must be in [0, 1] (0 or 1 disables it), got {self.top_p}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


class Sampler:
    """Picks the next token of one sequence from its logits."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._generator: torch.Generator | None = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else random.getrandbits(63)
            self._generator = torch.Generator().manual_seed(seed % (1 << 63))

    def sample(self, logits: torch.Tensor) -> int:
        """Sample one token id from ``logits`` ``[vocab]`` (float32)."""
        p = self.params
        scores = logits / p.temperature
        if p.top_k > 0:
            kth = torch.topk(scores, min(p.top_k, scores.shape[-1])).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if 0.0 < p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (always the first token).
            drop = cumulative - sorted_probs >= p.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            choice = torch.multinomial(sorted_probs, 1, generator=self._generator)
            return int(order[choice])
        return int(torch.multinomial(probs, 1, generator=self._generator))


def pick_tokens(logits: torch.Tensor, samplers: list[Sampler]) -> list[int]:
    """Next token for each row of ``logits`` ``[n, vocab]``; greedy rows in one argmax."""
    tokens = logits.argmax(dim=-1).tolist()
    for row, sampler in enumerate(samplers):
        if not sampler.params.greedy:
            tokens[row] = sampler.sample(logits[row])
    return tokens
