"""A fake Triton for the gateway's unit tests: the model contracts, no server.

``FakeTriton`` answers ``intent_classifier``, ``embedding``, the tiers (token ids in,
token ids out, as the ``tensorrt_llm`` interface) and ``router`` (text in, text out with
the routing fields), so the HTTP layer, routing, streaming, stop sequences and usage
are tested end to end in process.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np

from client.errors import ServerUnavailable
from client.sdk import BaseAsyncClient
from client.transport import ModelStatus, Tensors
from gateway.auth import KeyStore, parse_keys
from gateway.config import DEFAULT_ROUTER_CONFIG, RoutingSettings, Topology
from gateway.service import Gateway
from gateway.tokenizer import ChatTokenizer, load

ROUTING = RoutingSettings.from_file(DEFAULT_ROUTER_CONFIG)


def tokenizer() -> ChatTokenizer:
    """The tiers' real tokenizer, exported once into the user's cache."""
    return load(None, ROUTING.tokenizer_dir)


class FakeTriton(BaseAsyncClient):
    """One fake server; ``answer`` is the text every tier generates."""

    def __init__(
        self,
        url: str = "fake:1",
        *,
        answer: str = "Paris is the capital of France.",
        intent: str = "question_answering",
        confidence: float = 0.9,
        delay: float = 0.0,
        down: bool = False,
    ) -> None:
        super().__init__(None)
        self.url = url
        self.answer = answer
        self.intent = intent
        self.confidence = confidence
        self.delay = delay
        self.down = down
        self.calls: list[tuple[str, Tensors, str]] = []
        self.cancelled = 0
        self._tok = tokenizer()

    async def infer_tensors(
        self, model: str, inputs: Tensors, outputs: list[str], request_id: str = ""
    ) -> Tensors:
        self.calls.append((model, inputs, request_id))
        if self.down:
            raise ServerUnavailable(f"{self.url}: connection refused")
        await asyncio.sleep(self.delay)
        if model == "intent_classifier":
            return {
                "intent": np.array([self.intent.encode()], dtype=object),
                "confidence": np.array([self.confidence], dtype=np.float32),
            }
        if model == "embedding":
            vec = np.ones(384, dtype=np.float32) / np.sqrt(384)
            return {"embedding": vec[np.newaxis]}
        raise AssertionError(f"unexpected infer on {model}")

    async def stream_tensors(
        self, model: str, inputs: Tensors, request_id: str = ""
    ) -> AsyncIterator[Tensors]:
        self.calls.append((model, inputs, request_id))
        if self.down:
            raise ServerUnavailable(f"{self.url}: connection refused")
        ids = self._tok.encode(self.answer)
        finished = False
        try:
            if model == "router":
                limit = int(inputs["max_tokens"].reshape(-1)[0])
                ids = ids[:limit]
                prompt = self._tok.encode_chat(
                    [{"role": "user", "content": inputs["text_input"][0].decode()}]
                )
                tier = "llm_large"
                for n, token in enumerate(ids, 1):
                    await asyncio.sleep(self.delay)
                    yield {
                        "text_output": np.array(
                            [self._tok.token_bytes.bytes_of([token])], dtype=object
                        ),
                        "model": np.array([tier.encode()], dtype=object),
                        "intent": np.array([self.intent.encode()], dtype=object),
                        "confidence": np.array([self.confidence], dtype=np.float32),
                        "num_input_tokens": np.array([len(prompt)], dtype=np.int32),
                        "num_output_tokens": np.array([n], dtype=np.int32),
                    }
            else:
                limit = int(inputs["request_output_len"].reshape(-1)[0])
                for token in ids[:limit]:
                    await asyncio.sleep(self.delay)
                    yield {
                        "output_ids": np.array([[[token]]], dtype=np.int32),
                        "sequence_length": np.array([[1]], dtype=np.int32),
                    }
            finished = True
        finally:
            if not finished:
                self.cancelled += 1

    async def models(self) -> list[ModelStatus]:
        return []

    async def server_ready(self) -> bool:
        return not self.down

    async def close(self) -> None:
        pass


def make_gateway(
    servers: dict[str, FakeTriton], topology: Topology | None = None, **kwargs: object
) -> Gateway:
    """A gateway whose replicas are the fakes, by url (single placement by default)."""
    topology = topology or Topology.single("fake:1", None)
    return Gateway(
        topology,
        ROUTING,
        tokenizer(),
        client_factory=lambda url: servers[url],
        **kwargs,  # type: ignore[arg-type]
    )


def key_store(tmp_path: Path, **limits: int) -> tuple[KeyStore, str]:
    """A key file with one key, ``sk-test``, and the given limits."""
    import hashlib

    key = "sk-test"
    entry = {"name": "team", "sha256": hashlib.sha256(key.encode()).hexdigest(), **limits}
    return KeyStore(parse_keys({"keys": [entry]}, "test")), key
