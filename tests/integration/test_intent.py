"""``intent_classifier`` (intent_split -> intent_encoder -> intent_head) and its steps in the server."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from serving.intent import DIM, LABELS
from serving.intent_training import read_jsonl
from tests.conftest import ROOT

CLEAR = ROOT / "tests" / "data" / "intent_clear.jsonl"
# The README's example prompts (curl, client chat, the openai SDK), and the one-line form a
# new user tried, as a reader expects them routed.
README_PROMPTS = {
    "Summarize the following text in one sentence.\n\nThe city council voted on Tuesday to "
    "expand the bike lane network by 40 km.": "summarization",
    "What is the capital of France?": "question_answering",
    "Summarize: Triton batches requests so GPUs stay busy.": "summarization",
}
CLIENTS = {"http": httpclient, "grpc": grpcclient}
OUTPUTS = ("intent", "confidence", "probabilities")
PROMPTS = {
    "Summarize the following article in two sentences.\n\nThe city council met on Tuesday "
    "to discuss the new budget. After hours of debate, members approved funding for road "
    "repairs and a new library.": "summarization",
    "When did the council meet?\n\nThe city council met on Tuesday to discuss the new "
    "budget.": "question_answering",
    "Write a short story about a robot learning to paint.": "completion",
    "Tell me a story about a brave knight.": "completion",
    "What is the capital of France?": "question_answering",
}


def _classify(server, protocol: str, *texts: bytes | str) -> dict[str, np.ndarray]:
    module = CLIENTS[protocol]
    client = module.InferenceServerClient(
        server.http_url if protocol == "http" else server.grpc_url
    )
    data = np.array([[t.encode() if isinstance(t, str) else t] for t in texts], dtype=object)
    text = module.InferInput("text", list(data.shape), "BYTES")
    text.set_data_from_numpy(data)
    result = client.infer(
        "intent_classifier", [text], outputs=[module.InferRequestedOutput(n) for n in OUTPUTS]
    )
    return {n: result.as_numpy(n) for n in OUTPUTS}


@pytest.mark.parametrize("protocol", list(CLIENTS))
def test_classifier_names_the_intent_of_clear_prompts(server, protocol):
    out = _classify(server, protocol, *PROMPTS)
    assert [v.decode() for v in out["intent"].reshape(-1)] == list(PROMPTS.values())
    probs = out["probabilities"]
    assert probs.shape == (len(PROMPTS), 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out["confidence"].reshape(-1), probs.max(axis=1), atol=1e-6)
    assert [LABELS[i] for i in probs.argmax(axis=1)] == list(PROMPTS.values())


@pytest.mark.parametrize(("bad", "needle"), [(b"  ", "is empty"), (b"\xff", "not valid UTF-8")])
def test_classifier_rejects_bad_text(server, bad, needle):
    with pytest.raises(InferenceServerException) as info:
        _classify(server, "grpc", bad)
    assert needle in info.value.message()
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert _classify(server, "grpc", "Who wrote Hamlet?")["intent"].shape == (1, 1)


def test_split_step_feeds_the_head_the_instruction_alone(server):
    """The served classifier equals the head applied to the embedding of the instruction."""
    client = httpclient.InferenceServerClient(server.http_url)

    def infer(model, inputs, outputs):
        tensors = []
        for name, (array, dtype) in inputs.items():
            tensor = httpclient.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        result = client.infer(
            model, tensors, outputs=[httpclient.InferRequestedOutput(n) for n in outputs]
        )
        return {n: result.as_numpy(n) for n in outputs}

    prompt = next(iter(PROMPTS))
    split = infer(
        "intent_split",
        {"text": (np.array([[prompt.encode()]], dtype=object), "BYTES")},
        ["instruction", "has_context"],
    )
    assert (
        split["instruction"].reshape(-1)[0] == b"Summarize the following article in two sentences."
    )
    assert split["has_context"].reshape(-1).tolist() == [True]
    embedding = infer("intent_encoder", {"text": (split["instruction"], "BYTES")}, ["embedding"])
    assert embedding["embedding"].shape == (1, DIM)
    head = infer(
        "intent_head",
        {
            "embedding": (embedding["embedding"], "FP32"),
            "has_context": (split["has_context"], "BOOL"),
        },
        OUTPUTS,
    )
    whole = _classify(server, "http", prompt)
    np.testing.assert_allclose(head["probabilities"], whole["probabilities"], atol=1e-6)


def test_head_rejects_non_finite_embeddings(server):
    client = httpclient.InferenceServerClient(server.http_url)
    emb = httpclient.InferInput("embedding", [1, DIM], "FP32")
    emb.set_data_from_numpy(np.full((1, DIM), np.nan, dtype=np.float32))
    flag = httpclient.InferInput("has_context", [1, 1], "BOOL")
    flag.set_data_from_numpy(np.array([[False]]))
    with pytest.raises(InferenceServerException, match="NaN or infinite"):
        client.infer("intent_head", [emb, flag])


def test_classifier_gets_the_clear_test_set_right(server):
    """>= 0.97 on the hand-written prompts (tests/data/intent_clear.jsonl, never trained on)."""
    rows = read_jsonl(CLEAR)
    out = _classify(server, "grpc", *(r["text"] for r in rows))
    predicted = [v.decode() for v in out["intent"].reshape(-1)]
    wrong = [(r["text"][:60], p) for r, p in zip(rows, predicted, strict=True) if p != r["intent"]]
    assert 1 - len(wrong) / len(rows) >= 0.97, wrong


def test_readme_prompts_get_the_intent_a_reader_expects(server):
    out = _classify(server, "http", *README_PROMPTS)
    assert [v.decode() for v in out["intent"].reshape(-1)] == list(README_PROMPTS.values())
