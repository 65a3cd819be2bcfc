"""Exact streaming text: token bytes, UTF-8 alignment, tier chunks, pre/postprocessing logic."""

from __future__ import annotations

import numpy as np
import pytest

from serving.errors import ConfigError, ValidationError
from serving.llm.engine import FinishReason, StepOutput
from serving.llm.service import (
    PreprocessConfig,
    Preprocessor,
    PromptRequest,
    TierConfig,
    TierStream,
    detokenize_batch,
    output_arrays,
    tier_request,
)
from serving.llm.tokenizer import MAX_HELD_TOKENS, TokenBytes, Utf8Aligner, incomplete_tail
from serving.params import Params

#: Emoji (4-byte, split over tokens), accents, CJK, leading/double spaces and a newline.
TEXTS = [
    "Très bien, ça va? naïve café 🙂🎉",
    "你好，世界！日本語もOK。",
    "  double  spaces\n\tand a tab",
    "Ünïcödé ✓ → ∞ 👩‍💻",
]


@pytest.fixture(scope="module")
def tokenizer():
    from serving.assets import smollm2_gguf
    from serving.llm.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_gguf())


@pytest.fixture(scope="module")
def token_bytes(tokenizer) -> TokenBytes:
    return TokenBytes(tokenizer)


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_round_trip(tokenizer, token_bytes, text) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert token_bytes.bytes_of(ids) == text.encode("utf-8")


def test_every_token_matches_the_tokenizer_where_it_is_text(tokenizer, token_bytes) -> None:
    """Byte-exact where decode is defined: every id whose bytes are valid UTF-8."""
    special = set(tokenizer.all_special_ids)
    mismatched = []
    for token in range(len(token_bytes)):
        try:
            text = token_bytes.bytes_of([token]).decode("utf-8")
        except UnicodeDecodeError:
            continue  # a piece of a character: decode([token]) alone can only give U+FFFD
        if token not in special and text != tokenizer.decode([token]):
            mismatched.append(token)
    assert mismatched == []


def test_special_tokens_have_no_text(tokenizer, token_bytes) -> None:
    assert token_bytes.bytes_of([tokenizer.eos_token_id, tokenizer.bos_token_id]) == b""


def test_incomplete_tail() -> None:
    smile = "🙂".encode()
    assert incomplete_tail(smile[:2])
    assert not incomplete_tail(smile)
    assert not incomplete_tail(b"abc")
    assert not incomplete_tail(b"\xff")  # invalid, not incomplete: more bytes cannot fix it


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_stream_is_exact(tokenizer, token_bytes, text) -> None:
    """What the naive per-token decode breaks: every chunk must decode, and join exactly."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    stream = TierStream(token_bytes, streaming=True)
    chunks: list[bytes] = []
    for i, token in enumerate(ids):
        last = i == len(ids) - 1
        event = StepOutput([token], finished=last, reason=FinishReason.LENGTH if last else None)
        for tokens, final in stream.on_event(event):
            assert final == last
            chunks.append(detokenize_batch(token_bytes, *_arrays(tokens))[0])
    pieces = [c.decode("utf-8") for c in chunks]  # strict: raises on a split character
    assert "".join(pieces) == text
    assert len(chunks) > 1


def _arrays(tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    out = output_arrays(tokens)
    return out["output_ids"], out["sequence_length"]


def test_non_streaming_sends_one_final_response(tokenizer, token_bytes) -> None:
    ids = tokenizer.encode(TEXTS[1], add_special_tokens=False)
    stream = TierStream(token_bytes, streaming=False)
    sent = []
    for token in ids:
        sent += stream.on_event(StepOutput([token]))
    sent += stream.on_event(StepOutput([], finished=True, reason=FinishReason.END_ID))
    assert len(sent) == 1
    tokens, final = sent[0]
    assert final and token_bytes.text_of(tokens) == TEXTS[1]


def test_aligner_releases_bytes_that_never_complete(token_bytes) -> None:
    # A lone continuation byte is invalid, not incomplete: it goes out at once.
    lone = next(i for i in range(len(token_bytes)) if token_bytes.bytes_of([i]) == b"\x8e")
    assert Utf8Aligner(token_bytes).push([lone]) == [lone]
    # A lead byte repeated forever is released after MAX_HELD_TOKENS.
    lead = next(i for i in range(len(token_bytes)) if token_bytes.bytes_of([i]) == b"\xf0\x9f")
    aligner = Utf8Aligner(token_bytes)
    assert aligner.push([lead]) == []
    released = []
    for _ in range(MAX_HELD_TOKENS):
        released += aligner.push([lead])
    assert released


def test_detokenize_batch_respects_sequence_length(tokenizer, token_bytes) -> None:
    ids = tokenizer.encode("Paris is nice", add_special_tokens=False)
    tokens = np.array([[[*ids, 0, 0]]], dtype=np.int32)
    assert detokenize_batch(token_bytes, tokens, np.array([[len(ids)]])) == [b"Paris is nice"]
    with pytest.raises(ValidationError, match="2-D or 3-D"):
        detokenize_batch(token_bytes, np.zeros(3, dtype=np.int32), None)


def test_tier_request_from_tensors() -> None:
    request = tier_request(np.array([[5, 6, 7, 0]], dtype=np.int32), 3, 10, end_id=2, seed=4)
    assert request.input_ids == [5, 6, 7]
    assert request.max_new_tokens == 10 and request.end_id == 2
    assert request.sampling.greedy and request.sampling.seed == 4
    with pytest.raises(ValidationError, match="input_lengths"):
        tier_request(np.array([[5, 6]], dtype=np.int32), 3, 10)
    with pytest.raises(ValidationError, match="one sequence per request"):
        tier_request(np.zeros((2, 3), dtype=np.int32), None, 10)


def _params(**values: str) -> Params:
    return Params({"parameters": {k: {"string_value": v} for k, v in values.items()}})


def test_tier_config_reads_parameters() -> None:
    config = TierConfig.from_params(_params(max_active_sequences="4", dtype="float32"))
    assert config.limits.max_active == 4 and config.dtype == "float32"
    assert TierConfig.from_params(_params(dtype="int8")).dtype == "int8"
    with pytest.raises(ConfigError, match="dtype"):
        TierConfig.from_params(_params(dtype="int4"))
    with pytest.raises(ConfigError, match="checkpoint"):
        TierConfig.from_params(_params(checkpoint="meta-llama/Llama-3.1-8B"))


@pytest.fixture(scope="module")
def preprocessor(tokenizer) -> Preprocessor:
    config = PreprocessConfig.from_params(
        _params(max_output_len="64", max_context="128", default_max_tokens="16")
    )
    return Preprocessor(tokenizer, config)


def test_preprocessing_applies_chat_template(preprocessor, tokenizer) -> None:
    out = preprocessor(PromptRequest("What is the capital of France?", 16, 0.0, True))
    ids = out["input_ids"][0].tolist()
    assert tokenizer.decode(ids).startswith("<|im_start|>system")
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    assert out["input_lengths"].tolist() == [[len(ids)]]
    assert out["request_output_len"].tolist() == [[16]]
    assert out["end_id"].tolist() == [[tokenizer.eos_token_id]]
    assert out["streaming"].tolist() == [[True]]


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (PromptRequest("   ", 8, 0.0, False), "empty"),
        (PromptRequest("hi", 0, 0.0, False), "between 1 and 64"),
        (PromptRequest("hi", -3, 0.0, False), "between 1 and 64"),
        (PromptRequest("hi", 65, 0.0, False), "between 1 and 64"),
        (PromptRequest("hi", 8, -1.0, False), "temperature"),
        (PromptRequest("word " * 200, 8, 0.0, False), "shorten the prompt"),
    ],
)
def test_preprocessing_rejects_bad_input(preprocessor, request_, message) -> None:
    with pytest.raises(ValidationError, match=message):
        preprocessor(request_)
