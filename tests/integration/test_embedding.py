"""The ``embedding`` model through the real server, over HTTP and gRPC."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

MODEL = "embedding"
CLIENTS = {"http": httpclient, "grpc": grpcclient}


def _client(server, protocol: str):
    url = server.http_url if protocol == "http" else server.grpc_url
    return CLIENTS[protocol].InferenceServerClient(url)


def _embed(server, protocol: str, *rows: bytes | str) -> dict[str, np.ndarray]:
    module = CLIENTS[protocol]
    data = np.array([[r.encode() if isinstance(r, str) else r] for r in rows], dtype=object)
    text = module.InferInput("text", list(data.shape), "BYTES")
    text.set_data_from_numpy(data)
    outputs = [module.InferRequestedOutput(n) for n in ("embedding", "truncated")]
    result = _client(server, protocol).infer(MODEL, [text], outputs=outputs)
    return {n: result.as_numpy(n) for n in ("embedding", "truncated")}


@pytest.mark.parametrize("protocol", list(CLIENTS))
def test_embeddings_are_unit_vectors(server, protocol):
    out = _embed(server, protocol, "A man is playing a guitar.", "What is the capital of France?")
    assert out["embedding"].shape == (2, 384) and out["embedding"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, atol=1e-5)
    assert out["truncated"].tolist() == [[False], [False]]


def test_http_and_grpc_agree(server):
    text = "Triton serves this embedding over both protocols."
    a = _embed(server, "http", text)["embedding"][0]
    b = _embed(server, "grpc", text)["embedding"][0]
    assert float(a @ b) > 0.9999


def test_semantically_close_sentences_score_higher(server):
    e = _embed(
        server,
        "grpc",
        "How do I reset my password?",
        "I forgot my password and need to change it.",
        "The recipe needs two cups of flour.",
    )["embedding"]
    assert e[0] @ e[1] > e[0] @ e[2] + 0.3


def test_long_text_is_truncated_and_says_so(server):
    out = _embed(server, "http", "short", "lorem ipsum " * 400)
    assert out["truncated"].tolist() == [[False], [True]]


@pytest.mark.parametrize("protocol", list(CLIENTS))
@pytest.mark.parametrize(
    ("bad", "needle"),
    [(b"", "'text[1]' is empty"), (b"\xff\xfeoops", "'text[1]' is not valid UTF-8")],
)
def test_request_with_one_bad_row_is_invalid_arg(server, protocol, bad, needle):
    with pytest.raises(InferenceServerException) as info:
        _embed(server, protocol, "fine", bad, "also fine")
    assert needle in info.value.message()
    assert info.value.status() in ("400", "StatusCode.INVALID_ARGUMENT")
    # The server is still up and serving.
    assert _embed(server, protocol, "still works")["embedding"].shape == (1, 384)


def test_concurrent_requests_with_one_bad_one(server):
    """Requests batched together: only the bad one fails, the others get their vectors."""
    texts: list[bytes] = [f"sentence number {i} about the weather".encode() for i in range(24)]
    texts[7] = b"\xc3\x28"

    def call(text: bytes):
        try:
            return _embed(server, "grpc", text)["embedding"][0]
        except InferenceServerException as exc:
            return exc

    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(call, texts))
    failed = [i for i, r in enumerate(results) if isinstance(r, InferenceServerException)]
    assert failed == [7]
    assert "not valid UTF-8" in results[7].message()
    alone = _embed(server, "grpc", texts[0])["embedding"][0]
    assert float(alone @ results[0]) > 0.9999
