"""The SDK above the wire: inputs, decoding, chunks, deadlines, cancellation, sync facade."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from client.errors import InvalidInput, Timeout
from client.sdk import Client, Generation, TextDecoder, llm_inputs
from tests.unit.client_fakes import FakeServer, text_chunks


def test_decoder_joins_a_character_split_across_chunks() -> None:
    decoder = TextDecoder()
    encoded = "café ☕".encode()
    pieces = [encoded[:4], encoded[4:5], encoded[5:8], encoded[8:]]
    assert "".join(decoder.feed(p) for p in pieces) + decoder.flush() == "café ☕"
    # The first piece ends inside 'é': nothing is emitted for the half character.
    assert TextDecoder().feed(encoded[:4]) == "caf"


def test_decoder_passes_str_through_and_flags_truncated_bytes() -> None:
    decoder = TextDecoder()
    assert decoder.feed("hé") == "hé"
    decoder.feed(b"\xe2\x98")
    assert decoder.flush() == "\ufffd"


def test_llm_inputs_follow_the_contract() -> None:
    inputs = llm_inputs(
        "hi", max_tokens=5, temperature=0.0, stream=True, intent="qa", tier="llm_large"
    )
    assert inputs["text_input"].dtype == object and inputs["text_input"][0] == b"hi"
    assert inputs["max_tokens"].dtype == np.int32 and inputs["max_tokens"][0] == 5
    assert inputs["temperature"].dtype == np.float32
    assert inputs["stream"].dtype == np.bool_ and bool(inputs["stream"][0])
    assert inputs["intent"][0] == b"qa" and inputs["model"][0] == b"llm_large"
    assert set(llm_inputs("hi", max_tokens=None, temperature=None, stream=False)) == {
        "text_input",
        "stream",
    }


@pytest.mark.parametrize(
    ("prompt", "options", "message"),
    [
        ("  ", {}, "prompt"),
        ("hi", {"max_tokens": 0}, "max_tokens"),
        ("hi", {"max_tokens": -3}, "max_tokens"),
        ("hi", {"temperature": -1.0}, "temperature"),
    ],
)
def test_bad_generation_input_is_rejected_before_sending(
    prompt: str, options: dict, message: str
) -> None:
    server = FakeServer(chunks=text_chunks(b"x"))
    with pytest.raises(InvalidInput, match=message):
        asyncio.run(server.generate(prompt, **options))
    assert server.requests == []


def test_chat_streams_chunks_and_reports_routing() -> None:
    chunks = text_chunks(
        b"Hel", b"lo ", b"\xe2\x98", b"\x95", intent=b"summarization", model=b"llm_small"
    )
    chunks[-1]["num_output_tokens"] = np.array([4], dtype=np.int32)
    server = FakeServer(chunks=chunks)

    async def scenario() -> tuple[list[str], Generation]:
        texts = [c.text async for c in server.chat("Summarize: x", stream=True)]
        whole = await server.chat("Summarize: x")
        return texts, whole

    texts, whole = asyncio.run(scenario())
    assert texts == ["Hel", "lo ", "", "☕"]
    assert whole.text == "Hello ☕"
    assert (whole.intent, whole.model, whole.num_output_tokens) == ("summarization", "llm_small", 4)
    model, inputs = server.requests[0]
    assert model == "router" and bool(inputs["stream"][0]) is True
    assert bool(server.requests[1][1]["stream"][0]) is False


def test_breaking_out_of_a_stream_closes_it() -> None:
    server = FakeServer(chunks=text_chunks(*[b"t"] * 50))

    async def scenario() -> None:
        stream = server.generate("hi", stream=True, model="llm_small_text")
        async for _ in stream:
            break
        await stream.aclose()

    asyncio.run(scenario())
    assert server.streams_closed_early == 1 and server.streams_finished == 0


def test_timeout_covers_the_whole_stream_and_cancels_it() -> None:
    server = FakeServer(chunks=text_chunks(*[b"t"] * 10), delay=0.05)
    server.timeout = 0.12

    async def scenario() -> list[str]:
        got = []
        with pytest.raises(Timeout):
            async for chunk in server.generate("hi", stream=True):
                got.append(chunk.text)
        return got

    got = asyncio.run(scenario())
    assert 1 <= len(got) < 10
    assert server.streams_closed_early == 1


def test_embed_sends_one_request_per_text_and_stacks_rows() -> None:
    def result(inputs: dict) -> dict:
        text = inputs["text"][0].decode()
        return {"embedding": np.full((1, 384), len(text), dtype=np.float32)}

    server = FakeServer(infer_result=result)
    vectors = asyncio.run(server.embed(["a", "bb", "ccc"]))
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert vectors[:, 0].tolist() == [1.0, 2.0, 3.0]
    assert len(server.requests) == 3
    with pytest.raises(InvalidInput):
        asyncio.run(server.embed([]))
    with pytest.raises(InvalidInput):
        asyncio.run(server.embed(["ok", " "]))


def test_classify_reads_the_three_outputs() -> None:
    server = FakeServer(
        infer_result=lambda _: {
            "intent": np.array([b"question_answering"], dtype=object),
            "confidence": np.array([0.8], dtype=np.float32),
            "probabilities": np.array([[0.1, 0.1, 0.8]], dtype=np.float32),
        }
    )
    result = asyncio.run(server.classify("Why is the sky blue?"))
    assert result.intent == "question_answering"
    assert result.confidence == pytest.approx(0.8)
    assert result.probabilities == pytest.approx([0.1, 0.1, 0.8])


def test_sync_client_streams_and_cancels_on_break() -> None:
    server = FakeServer(chunks=text_chunks(*[b"ab"] * 20), delay=0.001)
    with Client.over(server) as client:
        whole = client.generate("hi")
        assert whole.text == "ab" * 20
        for _ in client.chat("hi", stream=True):
            break
        assert [m.name for m in client.models()] == ["embedding", "router"]
    assert server.streams_finished == 1 and server.streams_closed_early == 1
