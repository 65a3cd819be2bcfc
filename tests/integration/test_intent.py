"""``intent_classifier`` (embedding -> intent_head ensemble) and ``intent_head`` in the server."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from serving.intent import LABELS

CLIENTS = {"http": httpclient, "grpc": grpcclient}
OUTPUTS = ("intent", "confidence", "probabilities")
PROMPTS = {
    "Summarize the following article in two sentences.\n\nThe city council met on Tuesday "
    "to discuss the new budget. After hours of debate, members approved funding for road "
    "repairs and a new library.": "summarization",
    "Write a short story about a robot learning to paint.": "completion",
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
    assert probs.shape == (3, 3) and probs.dtype == np.float32
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


def test_head_rejects_non_finite_embeddings(server):
    client = httpclient.InferenceServerClient(server.http_url)
    emb = httpclient.InferInput("embedding", [1, 384], "FP32")
    emb.set_data_from_numpy(np.full((1, 384), np.nan, dtype=np.float32))
    with pytest.raises(InferenceServerException, match="NaN or infinite"):
        client.infer("intent_head", [emb])
