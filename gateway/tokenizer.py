"""The tiers' tokenizer and chat template, without transformers or torch.

The gateway needs token ids for three things: to render a multi-message conversation
through the tiers' chat template (the router only takes one prompt), to check the
prompt against the context before any server works on it, and to count usage exactly.

It does not duplicate the template: it renders the tokenizer's *own* Jinja template
(``chat_template.jinja``, the one ``apply_chat_template`` runs in the ``preprocessing``
model and the router) with the same sandboxed Jinja settings transformers uses, and
tokenizes with the same ``tokenizer.json`` through the ``tokenizers`` library. The
folder holding those files is what ``save_pretrained`` writes; the gateway exports it
once from the tokenizer the servers load (:func:`export`, needs the server's
packages) or is given one with ``--tokenizer-dir`` (a gateway-only image). A unit test
checks the ids equal ``apply_chat_template``'s.

Decoding is the router's own streaming detokenizer (:class:`serving.text.TokenText`:
exact byte-level pieces, never a split UTF-8 character), which imports nothing heavy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from gateway.errors import bad_request
from serving.errors import ConfigError
from serving.llm.tokenizer import TokenBytes
from serving.text import TokenText

log = logging.getLogger("gateway.tokenizer")

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "triton-llm-stack"


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class _VocabView:
    """What :class:`TokenBytes` reads from a transformers tokenizer, over ``tokenizers``."""

    def __init__(self, tok: Tokenizer) -> None:
        self._tok = tok
        self.all_special_ids = [
            idx for idx, added in tok.get_added_tokens_decoder().items() if added.special
        ]

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)


class ChatTokenizer:
    """``tokenizer.json`` + the chat template of one exported tokenizer folder."""

    def __init__(self, folder: Path) -> None:
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(f"{folder} holds no tokenizer.json (export it: docs/gateway.md)")
        self._tok = Tokenizer.from_file(str(path))
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template_path = folder / "chat_template.jinja"
        template = (
            template_path.read_text() if template_path.is_file() else config.get("chat_template")
        )
        if not template:
            raise ConfigError(f"{folder}: the tokenizer has no chat template")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self._template = env.from_string(template)
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        if self.eos_token is None or self._tok.token_to_id(self.eos_token) is None:
            raise ConfigError(f"{folder}: tokenizer_config.json names no known eos_token")
        self.end_id = int(self._tok.token_to_id(self.eos_token))
        pad = _token_text(config.get("pad_token"))
        pad_id = self._tok.token_to_id(pad) if pad else None
        self.pad_id = self.end_id if pad_id is None else int(pad_id)
        self.token_bytes = TokenBytes(_VocabView(self._tok))
        self.folder = folder

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=True,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as exc:
            raise bad_request(
                f"the chat template rejected the messages: {exc}", "messages"
            ) from None

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Ids of the conversation with the assistant's turn opened, as preprocessing does."""
        return self.encode(self.render(messages))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def detokenizer(self) -> TokenText:
        return TokenText(self.token_bytes)


def _raise(message: str) -> None:
    raise TemplateError(message)


def cache_folder(tokenizer_dir: str | None) -> Path:
    """Where the export of the tiers' tokenizer is kept (one per source)."""
    key = hashlib.sha256((tokenizer_dir or "smollm2").encode()).hexdigest()[:12]
    return CACHE / f"gateway-tokenizer-{key}"


def export(tokenizer_dir: str | None, folder: Path) -> None:
    """Save the servers' tokenizer (``serving.llm.tokenizer.tokenizer_for``) to ``folder``.

    Runs in a child interpreter: loading it imports transformers (and torch), which the
    gateway process itself never holds. Needs the ``[server]`` packages.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    code = (
        "import sys\n"
        "from serving.llm.tokenizer import tokenizer_for\n"
        "tokenizer_for(sys.argv[1] or None).save_pretrained(sys.argv[2])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, tokenizer_dir or "", str(tmp)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        tail = (result.stderr or "").strip().splitlines()[-1:] or ["no output"]
        raise ConfigError(
            "cannot export the tiers' tokenizer for the gateway (needs the [server] "
            f"packages, or pass --tokenizer-dir): {tail[0]}"
        )
    tmp.rename(folder)


def load(folder: Path | None, tokenizer_dir: str | None) -> ChatTokenizer:
    """The gateway's tokenizer: ``folder`` if given, else the cached export (made once)."""
    if folder is not None:
        return ChatTokenizer(folder)
    cached = cache_folder(tokenizer_dir)
    if not (cached / "tokenizer.json").is_file():
        log.info("exporting the tiers' tokenizer to %s (once)", cached)
        export(tokenizer_dir, cached)
    return ChatTokenizer(cached)
