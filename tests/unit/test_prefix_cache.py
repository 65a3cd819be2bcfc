"""The prefix store behind KV cache reuse: what it finds, keeps and drops (no model)."""

from __future__ import annotations

import pytest
import torch

from serving.llm.prefix_cache import PrefixCache


def _save(saved: list[int]):
    """A ``save`` callback that records the lengths asked for; K/V mark the length."""

    def save(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        saved.append(n)
        return torch.full((1, 1, n, 1), float(n)), torch.full((1, 1, n, 1), -float(n))

    return save


SYSTEM = list(range(100, 124))  # 24 shared tokens, as SmolLM2's chat template


def test_a_prompt_reuses_the_longest_shared_prefix_and_computes_at_least_one_token() -> None:
    cache = PrefixCache(capacity=1000)
    saved: list[int] = []
    first = [*SYSTEM, 1, 2, 3]
    assert cache.lookup(first) == (None, 0)
    cache.insert(first, _save(saved))
    assert saved == [len(first)] and cache.tokens == len(first)

    stored, n = cache.lookup([*SYSTEM, 7, 8])
    assert n == len(SYSTEM) and stored is not None
    assert torch.equal(stored.keys[0, 0, :, 0], torch.full((len(first),), float(len(first))))
    # The same prompt again: everything but its last token.
    assert cache.lookup(first)[1] == len(first) - 1
    # A prompt that is a prefix of a stored one still computes its last token.
    assert cache.lookup(SYSTEM)[1] == len(SYSTEM) - 1
    assert cache.reused_tokens == len(SYSTEM) + len(first) - 1 + len(SYSTEM) - 1
    assert cache.lookups == 4


def test_short_shared_prefixes_are_recomputed() -> None:
    cache = PrefixCache(capacity=1000, min_tokens=16)
    cache.insert(list(range(40)), _save([]))
    assert cache.lookup([*range(15), 999, 998]) == (None, 0)
    assert cache.lookup([*range(16), 999])[1] == 16
    saved: list[int] = []
    cache.insert(list(range(10)), _save(saved))  # too short to keep
    assert saved == [] and len(cache) == 1


def test_covered_prompts_are_not_stored_twice_and_extended_ones_are_replaced() -> None:
    cache = PrefixCache(capacity=1000)
    saved: list[int] = []
    cache.insert([*SYSTEM, 1, 2, 3], _save(saved))
    cache.insert([*SYSTEM, 1, 2], _save(saved))  # covered by the stored prompt
    assert saved == [27] and len(cache) == 1
    cache.insert([*SYSTEM, 1, 2, 3, 4], _save(saved))  # extends it: replaces it
    assert saved == [27, 28] and len(cache) == 1 and cache.tokens == 28


def test_least_recently_used_prompts_go_first_within_the_capacity() -> None:
    cache = PrefixCache(capacity=60)
    a, b, c = ([*SYSTEM, k] for k in (1, 2, 3))  # 25 tokens each
    cache.insert(a, _save([]))
    cache.insert(b, _save([]))
    assert cache.lookup(a)[0].tokens.tolist() == a  # a is now the most recent
    cache.insert(c, _save([]))  # 75 > 60: b, the least recently used, goes
    assert cache.tokens == 50
    kept = {tuple(cache.lookup(p)[0].tokens.tolist()) for p in (a, c)}
    assert kept == {tuple(a), tuple(c)}
    assert cache.lookup([*b[:-1], 5])[0].tokens.tolist() in (a, c)  # b's prefix survives
    cache.insert(list(range(61)), _save(saved := []))  # longer than the whole store
    assert saved == []


def test_a_tie_goes_to_the_most_recently_used_prompt() -> None:
    cache = PrefixCache(capacity=1000)
    cache.insert([*SYSTEM, 1], _save([]))
    cache.insert([*SYSTEM, 2], _save([]))
    assert cache.lookup([*SYSTEM, 3])[0].tokens.tolist() == [*SYSTEM, 2]
    cache.lookup([*SYSTEM, 1])
    assert cache.lookup([*SYSTEM, 3])[0].tokens.tolist() == [*SYSTEM, 1]


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="capacity"):
        PrefixCache(capacity=-1)
    with pytest.raises(ValueError, match="min_tokens"):
        PrefixCache(capacity=10, min_tokens=0)
