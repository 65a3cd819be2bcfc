"""The embedding runtime against the PyTorch reference, and the ``embedding`` model.py."""

from __future__ import annotations

import numpy as np
import pytest

from serving.embedding import (
    DIM,
    PREFIX_LAYERS,
    SMOLLM2_PREFIX,
    Embedder,
    EmbeddingRequest,
    Runtime,
    export_onnx,
    load_embedder,
    max_tokens,
)
from serving.errors import ConfigError, ValidationError
from serving.triton import run_rows
from tests.conftest import FakeRequest, TritonError, load_model_module, model_args

TEXTS = [
    "A man is playing a guitar.",
    "Summarize the following article about the history of the Roman empire in three sentences.",
    "hi",
    "What is the capital of France?",
    "word " * 400,  # longer than the 256-token window
    "Ünïcödé text, emoji 🎸 and punctuation!?",
]


@pytest.fixture(scope="module")
def model_dir():
    from serving.assets import minilm_dir

    return minilm_dir()


@pytest.fixture(scope="module")
def reference(model_dir):
    """Independent PyTorch reference: transformers + mean pooling + L2 norm, batch of one."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    bert = AutoModel.from_pretrained(model_dir).eval()

    def embed(texts):
        out = []
        for text in texts:
            enc = tok(text, truncation=True, max_length=256, return_tensors="pt")
            with torch.inference_mode():
                hidden = bert(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            out.append(torch.nn.functional.normalize(pooled, dim=1)[0].numpy())
        return np.stack(out)

    return embed


@pytest.fixture(scope="module")
def onnx_embedder(model_dir):
    return load_embedder(Runtime.ONNX, threads=1, model_dir=model_dir)


def test_window_is_256_tokens(model_dir):
    assert max_tokens(model_dir) == 256


@pytest.mark.parametrize("runtime", list(Runtime))
def test_runtime_within_cosine_099_of_pytorch_reference(
    runtime, model_dir, reference, onnx_embedder
):
    embedder = (
        onnx_embedder if runtime is Runtime.ONNX else load_embedder(runtime, 1, model_dir=model_dir)
    )
    ref = reference(TEXTS)
    # One mixed batch (padding and length-sorting in play) and every row alone.
    batched = embedder.embed(TEXTS).vectors
    single = np.stack([embedder.embed([t]).vectors[0] for t in TEXTS])
    for got in (batched, single):
        assert got.shape == (len(TEXTS), DIM) and got.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        cosine = (got * ref).sum(axis=1)
        assert cosine.min() >= 0.99, cosine


def test_long_text_is_truncated_and_flagged(onnx_embedder):
    result = onnx_embedder.embed(TEXTS)
    assert result.truncated.tolist() == [False, False, False, False, True, False]
    # Everything past the window is ignored: a longer tail gives the same vector.
    longer = onnx_embedder.embed(["word " * 1000]).vectors[0]
    assert float(longer @ result.vectors[4]) > 0.9999


def test_similar_sentences_score_higher_than_unrelated(onnx_embedder):
    a, b, c = onnx_embedder.embed(
        [
            "A man is playing a guitar.",
            "Someone plays an acoustic guitar.",
            "The stock market fell today.",
        ]
    ).vectors
    assert a @ b > a @ c + 0.3


def test_chunks_group_similar_lengths_and_bound_padding(model_dir):
    embedder = Embedder(model_dir, encoder=lambda ids, mask: None, chunk_tokens=100, max_rows=3)
    lengths = [50, 5, 6, 7, 8, 40]
    groups = embedder.chunks(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        assert len(group) <= 3
        assert len(group) == 1 or len(group) * max(lengths[i] for i in group) <= 100
    assert groups[0] == [1, 2, 3]  # the shortest rows together


def test_export_is_reused(model_dir, onnx_embedder):
    first = export_onnx(model_dir)
    mtime = first.stat().st_mtime_ns
    assert export_onnx(model_dir) == first and first.stat().st_mtime_ns == mtime


def test_runtime_parse_lists_choices():
    assert Runtime.parse("torch") is Runtime.TORCH
    with pytest.raises(ConfigError, match="onnx, torch"):
        Runtime.parse("tensorrt")


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([b""], "'text' is empty"),
        ([b"   \n"], "'text' is empty"),
        ([b"fine", b"\xff\xfe"], r"'text\[1\]' is not valid UTF-8"),
        ([], "no rows"),
    ],
)
def test_bad_request_rows_are_named(rows, message):
    with pytest.raises(ValidationError, match=message):
        EmbeddingRequest.from_array(np.array(rows, dtype=object).reshape(-1, 1))


def test_request_rows_decode():
    req = EmbeddingRequest.from_array(np.array([[b"one"], ["two"]], dtype=object))
    assert req.texts == ["one", "two"]


def test_run_rows_splits_outputs_per_request():
    calls = []

    def fn(rows):
        calls.append(rows)
        return {"double": np.array([2 * r for r in rows]), "one": np.ones((len(rows), 1))}

    out = run_rows(fn, [[1, 2], [3], [4, 5, 6]])
    assert calls == [[1, 2, 3, 4, 5, 6]]  # one call for the whole batch
    assert [o["double"].tolist() for o in out] == [[2, 4], [6], [8, 10, 12]]
    assert [o["one"].shape for o in out] == [(2, 1), (1, 1), (3, 1)]


@pytest.fixture(scope="module")
def model(onnx_embedder):
    module = load_model_module("embedding")
    instance = module.TritonPythonModel()
    instance.initialize(model_args("embedding"))
    return instance


def _text(*rows):
    return {"text": np.array([[r] for r in rows], dtype=object)}


def test_model_isolates_bad_requests_in_a_batch(model):
    requests = [
        FakeRequest(_text(b"A man is playing a guitar.", b"hello")),
        FakeRequest(_text(b"ok", b"\xc3\x28")),  # one invalid UTF-8 row fails this request
        FakeRequest(_text(b"")),
        FakeRequest(_text(("word " * 300).encode())),
        FakeRequest({"text": np.array([[1.0]], dtype=np.float32)}),
    ]
    responses = model.execute(requests)
    assert len(responses) == len(requests)
    ok = [responses[0], responses[3]]
    for response in ok:
        assert not response.has_error()
    emb0 = {t.name(): t.as_numpy() for t in responses[0].output_tensors()}
    emb3 = {t.name(): t.as_numpy() for t in responses[3].output_tensors()}
    assert emb0["embedding"].shape == (2, DIM) and emb0["embedding"].dtype == np.float32
    assert emb0["truncated"].tolist() == [[False], [False]]
    assert emb3["truncated"].tolist() == [[True]]
    for bad, needle in [(1, "text[1]' is not valid UTF-8"), (2, "empty"), (4, "must be BYTES")]:
        err = responses[bad].error()
        assert err.code() == TritonError.INVALID_ARG and needle in err.message()


def test_model_matches_library(model, onnx_embedder):
    response = model.execute([FakeRequest(_text(TEXTS[0].encode()))])[0]
    got = response.output_tensors()[0].as_numpy()
    np.testing.assert_allclose(got[0], onnx_embedder.embed([TEXTS[0]]).vectors[0], atol=1e-6)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("runtime", "tensorrt", "runtime must be one of onnx, torch"),
        ("encoder", "bert", "encoder must be one of minilm, smollm2_prefix"),
        ("chunk_tokens", "0", "chunk_tokens must be >= 1"),
        ("chunk_tokens", "many", "'chunk_tokens'='many' is not a valid int"),
    ],
)
def test_model_rejects_bad_parameters_at_load(key, value, message):
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    from tests.conftest import ROOT, TritonModelException

    text = (ROOT / "model_repository/embedding/config.pbtxt").read_text()
    cfg = json_format.MessageToDict(
        text_format.Parse(text, model_config_pb2.ModelConfig()), preserving_proto_field_name=True
    )
    cfg["parameters"][key] = {"string_value": value}
    instance = load_model_module("embedding").TritonPythonModel()
    with pytest.raises(TritonModelException, match=message):
        instance.initialize(model_args("embedding", cfg))


@pytest.mark.parametrize("model_name", ["embedding", "intent_encoder"])
def test_both_encoder_models_serve_the_one_shared_adapter(model_name):
    """``embedding`` and ``intent_encoder`` are the same import; neither drifts."""
    from serving.embedding_model import EmbeddingModel
    from tests.conftest import ROOT

    path = ROOT / "model_repository" / model_name / "1" / "model.py"
    code = [line for line in path.read_text().splitlines() if line and not line.startswith('"')]
    assert code == [
        "from serving.embedding_model import EmbeddingModel as TritonPythonModel",
        '__all__ = ["TritonPythonModel"]',
    ]
    assert load_model_module(model_name).TritonPythonModel is EmbeddingModel


@pytest.fixture(scope="module")
def prefix_embedder():
    return load_embedder(Runtime.ONNX, threads=1, spec=SMOLLM2_PREFIX)


@pytest.fixture(scope="module")
def prefix_reference():
    """transformers' own hidden state after layer 8, token mean, one text at a time.

    Written independently of :func:`prefix_module`: the whole 30-layer model with
    ``output_hidden_states``, whose entry 8 is the input of layer 9.
    """
    import torch

    from serving.assets import smollm2_gguf
    from serving.llm.runner import load_hf_model
    from serving.llm.tokenizer import load_tokenizer

    full = load_hf_model(smollm2_gguf())
    tokenizer = load_tokenizer(smollm2_gguf())

    def reference(texts):
        rows = []
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            with torch.inference_mode():
                out = full(input_ids=ids, output_hidden_states=True)
            rows.append(out.hidden_states[PREFIX_LAYERS][0].mean(0).numpy())
        return np.stack(rows)

    return reference


PREFIX_TEXTS = [*TEXTS[:4], TEXTS[5]]


def test_intent_encoder_torch_equals_transformers_hidden_states(prefix_reference):
    """The module both runtimes compute is layer 8's hidden state, mean pooled, in float32.

    The torch runtime serves it as is (the H100 profile); the ONNX export stores its
    weights in int8 (the next test).
    """
    embedder = load_embedder(Runtime.TORCH, threads=1, spec=SMOLLM2_PREFIX)
    # float32 is batch-invariant: the GPU runtime batches rows (only int8 goes one by one)
    assert [len(g) for g in embedder.chunks([8] * len(PREFIX_TEXTS))] == [len(PREFIX_TEXTS)]
    got = embedder.embed(PREFIX_TEXTS)
    ref = prefix_reference(PREFIX_TEXTS)
    np.testing.assert_allclose(got.vectors, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


def test_intent_encoder_int8_onnx_within_cosine_099_of_float32(prefix_embedder, prefix_reference):
    """The served export (int8 weights) keeps the float32 vectors' direction and length."""
    got = prefix_embedder.embed(PREFIX_TEXTS)
    assert got.vectors.shape == (len(PREFIX_TEXTS), SMOLLM2_PREFIX.dim)
    assert not got.truncated.any()
    ref = prefix_reference(PREFIX_TEXTS)
    norms = np.linalg.norm(got.vectors, axis=1), np.linalg.norm(ref, axis=1)
    cosine = (got.vectors * ref).sum(axis=1) / (norms[0] * norms[1])
    assert cosine.min() >= 0.99, cosine
    # lengths within 10 % (measured: 5.2 % at most over these texts)
    np.testing.assert_allclose(norms[0], norms[1], rtol=0.1)


def test_int8_encoder_row_does_not_depend_on_its_batch(prefix_embedder):
    """Dynamic quantization scales over the whole input: rows are encoded one per call."""
    assert [len(g) for g in prefix_embedder.chunks([8, 8, 8])] == [1, 1, 1]
    batched = prefix_embedder.embed(PREFIX_TEXTS).vectors
    alone = np.stack([prefix_embedder.embed([t]).vectors[0] for t in PREFIX_TEXTS])
    np.testing.assert_array_equal(batched, alone)


def test_int8_export_quantizes_weight_matmuls_only(prefix_embedder):
    """Projections read int8 weights; the attention products of two activations do not."""
    import onnx

    from serving.assets import smollm2_gguf
    from serving.embedding import onnx_path

    graph = onnx.load(
        str(onnx_path(smollm2_gguf(), SMOLLM2_PREFIX)), load_external_data=False
    ).graph
    ops = [n.op_type for n in graph.node]
    # 7 projections and 2 attention products per layer
    assert ops.count("MatMulInteger") == 7 * PREFIX_LAYERS
    assert ops.count("MatMul") == 2 * PREFIX_LAYERS


def test_intent_encoder_model_serves_576_floats_and_flags_long_text():
    import json

    args = model_args("intent_encoder")
    (output, _) = json.loads(args["model_config"])["output"]
    assert (output["name"], output["dims"]) == ("embedding", [str(SMOLLM2_PREFIX.dim)])
    instance = load_model_module("intent_encoder").TritonPythonModel()
    instance.initialize(args)
    responses = instance.execute(
        [
            FakeRequest(_text(b"Write a haiku about rain.", ("word " * 300).encode())),
            FakeRequest(_text(b"")),
        ]
    )
    out = {t.name(): t.as_numpy() for t in responses[0].output_tensors()}
    assert out["embedding"].shape == (2, SMOLLM2_PREFIX.dim)
    assert out["truncated"].tolist() == [[False], [True]]
    assert responses[1].error().code() == TritonError.INVALID_ARG
