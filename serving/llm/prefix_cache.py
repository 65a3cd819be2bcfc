"""KV cache reuse across requests: a prompt that starts like an earlier one skips that part.

Every chat request through the tier starts with the same system prompt (24 tokens of
SmolLM2's template before the user's words), and clients retry and repeat prompts. The
engine keeps the KV cache of recent prompts here and, at admission, copies the longest
shared prefix into the new sequence's slot, so the prefill computes only the rest
(TensorRT-LLM calls this KV cache reuse, vLLM automatic prefix caching). Sixteen Dolly
prompts of 35-59 tokens took 1.7 s to prefill packed, and 0.75-0.82 s with the template's
24 tokens reused (AVX2 EPYC, float32). The logits stay within 6e-5 of a full prefill's:
the cached positions are the same float32 values, only attention's summation runs over
the cache instead of fresh tensors.

Matching is per token, not per block: a prompt shares the longest common prefix with any
stored prompt (the most recently used wins a tie), and at least one token is always
computed, since the prefill's last position gives the first new token. The store holds
whole prompts, least recently used first out, within ``capacity`` tokens.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

#: A shared prefix shorter than this is recomputed rather than copied: the saving is too
#: small to be worth a second attention path.
MIN_REUSE_TOKENS = 16


@dataclass
class StoredPrefix:
    """One stored prompt: its tokens and its K and V, ``[layers, kv_heads, n, head_dim]``."""

    tokens: np.ndarray
    keys: torch.Tensor
    values: torch.Tensor


class PrefixCache:
    """Recent prompts' KV, found by longest common token prefix, bounded in tokens.

    Used from the engine thread only; not thread-safe.
    """

    def __init__(self, capacity: int, min_tokens: int = MIN_REUSE_TOKENS) -> None:
        if capacity < 0 or min_tokens < 1:
            raise ValueError("capacity must be >= 0 and min_tokens >= 1")
        self.capacity = capacity
        self.min_tokens = min_tokens
        self._entries: OrderedDict[int, StoredPrefix] = OrderedDict()
        self._ids = 0
        self.tokens = 0  # tokens held
        self.lookups = 0
        self.reused_tokens = 0  # prompt tokens not recomputed, over all lookups

    def __len__(self) -> int:
        return len(self._entries)

    def _longest(self, ids: np.ndarray) -> tuple[int | None, int]:
        """(key, length) of the stored prompt sharing the longest prefix with ``ids``."""
        best, best_len = None, 0
        for key in reversed(self._entries):  # most recent first: it wins a tie
            length = _shared(self._entries[key].tokens, ids)
            if length > best_len:
                best, best_len = key, length
        return best, best_len

    def lookup(self, prompt: list[int]) -> tuple[StoredPrefix | None, int]:
        """The stored prompt to copy from and how many leading tokens to take from it.

        The length leaves the prompt's last token to compute; ``(None, 0)`` when fewer
        than ``min_tokens`` would be reused.
        """
        self.lookups += 1
        key, length = self._longest(np.asarray(prompt, dtype=np.int64))
        length = min(length, len(prompt) - 1)
        if key is None or length < self.min_tokens:
            return None, 0
        self._entries.move_to_end(key)
        self.reused_tokens += length
        return self._entries[key], length

    def insert(
        self, prompt: list[int], save: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        """Keep ``prompt``'s KV (``save(n)`` copies its first ``n`` positions) unless a
        stored prompt already starts with all of it; stored prompts it extends are dropped.
        """
        if not self.min_tokens <= len(prompt) <= self.capacity:
            return
        ids = np.asarray(prompt, dtype=np.int64)
        key, length = self._longest(ids)
        if key is not None and length == len(ids):
            self._entries.move_to_end(key)
            return
        extended = [k for k, e in self._entries.items() if _shared(e.tokens, ids) == len(e.tokens)]
        for old in extended:
            self._drop(old)
        keys, values = save(len(ids))
        self._ids += 1
        self._entries[self._ids] = StoredPrefix(ids, keys, values)
        self.tokens += len(ids)
        while self.tokens > self.capacity:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: int) -> None:
        self.tokens -= len(self._entries.pop(key).tokens)


def _shared(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens ``a`` and ``b`` have in common."""
    n = min(len(a), len(b))
    same = a[:n] == b[:n]
    return n if same.all() else int(same.argmin())
