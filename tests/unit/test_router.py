"""The router's request handling against scripted BLS models (no Triton)."""

from __future__ import annotations

import codecs
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serving.errors import INVALID_INPUT, ConfigError
from serving.llm.service import PreprocessConfig, Preprocessor
from serving.router import Router, RouterMetrics, RouterModels
from serving.routing import RoutingPolicy
from serving.triton import BlsDeadlines
from tests.conftest import (
    SENT_REQUESTS,
    TRITONSERVER_RESPONSE_COMPLETE_FINAL,
    FakeRequest,
    InferenceResponse,
    ResponseSender,
    Tensor,
    TritonError,
    eventually,
)

FINAL = TRITONSERVER_RESPONSE_COMPLETE_FINAL
POLICY = RoutingPolicy(
    table={
        "completion": "llm_medium",
        "summarization": "llm_small",
        "question_answering": "llm_large",
    },
    tiers=("llm_small", "llm_medium", "llm_large"),
    confidence_threshold=0.5,
    low_confidence_tier="llm_medium",
    fallbacks={"llm_large": "llm_medium", "llm_medium": "llm_small", "llm_small": "llm_medium"},
)
#: The tier "generates" these UTF-8 bytes one byte per token: 'é' and the emoji are
#: split across tokens, so a router that decoded token by token would garble them.
ANSWER = "Café ☕ is open."
TOKENS = list(ANSWER.encode("utf-8"))


class ByteDetokenizer:
    """Token id = one UTF-8 byte: the hardest case for streaming text."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()

    def push(self, ids: Sequence[int]) -> str:
        return self._decoder.decode(bytes(ids))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


def response(**outputs: Any) -> InferenceResponse:
    return InferenceResponse([Tensor(k, np.asarray(v)) for k, v in outputs.items()])


def error(message: str, code: int = TritonError.INTERNAL) -> InferenceResponse:
    return InferenceResponse(error=TritonError(message, code))


def token_stream(tokens: Sequence[int]) -> list[InferenceResponse]:
    return [
        response(
            output_ids=np.array([[[t]]], dtype=np.int32),
            sequence_length=np.array([[1]], dtype=np.int32),
        )
        for t in tokens
    ]


class Downstream:
    """Scripted classifier and tiers; records what each was sent."""

    def __init__(self, bls: dict, intent: str = "summarization", confidence: float = 0.9) -> None:
        self.calls: dict[str, list[dict[str, np.ndarray]]] = {}
        self.intent, self.confidence = intent, confidence
        bls["intent_classifier"] = self._record("intent_classifier", self.classify)
        for tier in POLICY.tiers:
            bls[tier] = self._record(tier, self.generate)
        self.bls = bls

    def _record(self, name: str, handler: Any) -> Any:
        def run(inputs: dict[str, np.ndarray]) -> Any:
            self.calls.setdefault(name, []).append(inputs)
            return handler(inputs)

        return run

    def classify(self, inputs: dict[str, np.ndarray]) -> InferenceResponse:
        return response(
            intent=np.array([[self.intent.encode()]], dtype=np.object_),
            confidence=np.array([[self.confidence]], dtype=np.float32),
        )

    @staticmethod
    def generate(inputs: dict[str, np.ndarray]) -> list[InferenceResponse]:
        if "stop" in inputs:
            return [InferenceResponse()]
        return token_stream(TOKENS[: int(inputs["request_output_len"].reshape(-1)[0])])

    def tiers_called(self) -> list[str]:
        return [t for t in POLICY.tiers if t in self.calls]


def serve(router: Router, request: FakeRequest) -> None:
    """What ``submit`` does for one request, on this thread."""
    accepted = router.accept(request)
    if accepted is not None:
        router.serve(*accepted)


class WordTokenizer:
    """One token per word, ids from 1; end and pad id 2."""

    eos_token_id = pad_token_id = 2

    @staticmethod
    def encode(text: str, add_special_tokens: bool = False) -> list[int]:
        return list(range(1, len(text.split()) + 1))


#: The real Preprocessor (defaults, limits, context check) over the word tokenizer.
PREPROCESSOR = Preprocessor(
    WordTokenizer(),
    PreprocessConfig(
        default_max_tokens=64, max_tokens_limit=512, max_context=256, chat_template=False
    ),
)


def make_router(
    metrics: RouterMetrics | None = None,
    workers: int = 2,
    max_queue: int = 64,
    deadlines: BlsDeadlines | None = None,
) -> Router:
    return Router(
        name="router",
        policy=POLICY,
        models=RouterModels(classifier="intent_classifier"),
        detokenizer=ByteDetokenizer,
        preprocessor=PREPROCESSOR,
        workers=workers,
        batched=True,
        metrics=metrics,
        max_queue=max_queue,
        deadlines=deadlines,
    )


def router_request(text: str | bytes = "Summarize this text for me please", **extra: Any) -> Any:
    raw = text if isinstance(text, bytes) else text.encode()
    inputs: dict[str, Any] = {"text_input": np.array([[raw]], dtype=np.object_)}
    kinds = {"max_tokens": np.int32, "temperature": np.float32, "stream": np.bool_}
    for name, value in extra.items():
        if name in ("intent", "model"):
            inputs[name] = np.array([[value.encode()]], dtype=np.object_)
        else:
            inputs[name] = np.array([[value]], dtype=kinds[name])
    return FakeRequest(inputs)


def value(resp: InferenceResponse, name: str) -> Any:
    tensor = next(t for t in resp.output_tensors() if t.name() == name)
    item = tensor.as_numpy().reshape(-1)[0]
    return item.decode() if isinstance(item, bytes) else item.item()


def error_of(request: FakeRequest) -> TritonError:
    (resp, flags), *_ = request.sender.sent
    assert flags & FINAL and len(request.sender.sent) == 1
    assert resp.has_error()
    return resp.error()


def test_streams_text_right_across_split_characters(bls: dict) -> None:
    down = Downstream(bls, intent="summarization")
    request = router_request(stream=True)
    serve(make_router(), request)

    chunks = request.sender.responses()
    assert "".join(value(r, "text_output") for r in chunks) == ANSWER
    assert len(chunks) > 3  # really streamed, not one blob
    assert request.sender.closed and request.sender.sent[-1][1] & FINAL
    for r in chunks:  # every response carries the decision
        assert value(r, "intent") == "summarization"
        assert value(r, "model") == "llm_small"
        assert value(r, "confidence") == pytest.approx(0.9)
        assert value(r, "num_input_tokens") == 6
    assert value(chunks[-1], "num_output_tokens") == len(TOKENS)
    assert down.tiers_called() == ["llm_small"]
    sent = down.calls["llm_small"][0]
    assert sent["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6]]
    assert sent["request_output_len"].tolist() == [[64]]  # preprocessing's default
    assert sent["streaming"].tolist() == [[True]]  # the router always streams the tier
    assert sent["end_id"].tolist() == [[2]] and sent["temperature"].tolist() == [[0.0]]


def test_non_streaming_returns_one_response_with_the_whole_text(bls: dict) -> None:
    Downstream(bls, intent="question_answering")
    request = router_request("What is the capital of France?", max_tokens=5, temperature=0.0)
    serve(make_router(), request)

    assert len(request.sender.sent) == 1
    resp, flags = request.sender.sent[0]
    assert flags & FINAL
    assert value(resp, "text_output") == ANSWER.encode()[:5].decode()
    assert value(resp, "model") == "llm_large"
    assert value(resp, "num_output_tokens") == 5


def test_temperature_reaches_the_tier(bls: dict) -> None:
    down = Downstream(bls, intent="completion")
    serve(make_router(), router_request("Write a story", temperature=0.7))
    assert down.calls["llm_medium"][0]["temperature"].tolist() == [[pytest.approx(0.7)]]


def test_low_confidence_goes_to_the_fallback_tier(bls: dict) -> None:
    down = Downstream(bls, intent="question_answering", confidence=0.4)
    request = router_request("hmm?")
    serve(make_router(), request)
    assert value(request.sender.responses()[0], "model") == "llm_medium"
    assert down.tiers_called() == ["llm_medium"]


def test_intent_override_skips_classification(bls: dict) -> None:
    down = Downstream(bls)
    request = router_request("Tell me about whales", intent="question_answering")
    serve(make_router(), request)
    resp = request.sender.responses()[0]
    assert "intent_classifier" not in down.calls
    assert (value(resp, "intent"), value(resp, "model")) == ("question_answering", "llm_large")
    assert value(resp, "confidence") == 1.0


def test_model_override_forces_the_tier(bls: dict) -> None:
    down = Downstream(bls, intent="summarization")
    request = router_request(model="llm_large")
    serve(make_router(), request)
    resp = request.sender.responses()[0]
    assert (value(resp, "intent"), value(resp, "model")) == ("summarization", "llm_large")
    assert down.tiers_called() == ["llm_large"]


def test_unloaded_tier_falls_back_and_is_counted(bls: dict) -> None:
    down = Downstream(bls, intent="question_answering")
    del bls["llm_large"]  # not loaded: Triton answers NOT_FOUND
    metrics = RouterMetrics()
    request = router_request("What is the capital of France?", stream=True)
    serve(make_router(metrics), request)

    chunks = request.sender.responses()
    assert "".join(value(r, "text_output") for r in chunks) == ANSWER
    assert {value(r, "model") for r in chunks} == {"llm_medium"}
    assert down.tiers_called() == ["llm_medium"]
    assert metrics.fallbacks.labels(from_tier="llm_large", to_tier="llm_medium").value == 1
    served = metrics.requests.labels(intent="question_answering", tier="llm_medium", reason="table")
    assert served.value == 1


@pytest.mark.parametrize(
    "message",
    [
        "llm_medium: internal error (RuntimeError); see the server log",
        "Failed for execute the inference request. Model 'llm_medium' is not ready.",
        "Stub process 'llm_medium_0_0' is not healthy.",
        "unexpected inference input 'stop' for model 'llm_medium'",
    ],
)
def test_tier_failing_before_first_token_falls_back(bls: dict, message: str) -> None:
    Downstream(bls, intent="completion")
    bls["llm_medium"] = lambda inputs: [error(message)]
    request = router_request("Write a poem")
    serve(make_router(), request)
    assert value(request.sender.responses()[0], "model") == "llm_small"


def test_exec_raising_falls_back(bls: dict) -> None:
    Downstream(bls, intent="completion")

    def not_ready(inputs: dict) -> Any:
        raise RuntimeError("Model 'llm_medium' is not ready")

    bls["llm_medium"] = not_ready
    request = router_request("Write a poem")
    serve(make_router(), request)
    assert value(request.sender.responses()[0], "model") == "llm_small"


def test_forced_tier_that_is_down_is_unavailable_not_substituted(bls: dict) -> None:
    down = Downstream(bls)
    del bls["llm_large"]
    request = router_request(model="llm_large")
    serve(make_router(), request)
    err = error_of(request)
    assert err.code() == TritonError.UNAVAILABLE
    assert "(tried llm_large): llm_large: Request for unknown model" in err.message()
    assert down.tiers_called() == []


def test_every_tier_down_is_unavailable(bls: dict) -> None:
    Downstream(bls, intent="question_answering")
    for tier in POLICY.tiers:
        del bls[tier]
    request = router_request("What is the capital of France?")
    serve(make_router(), request)
    err = error_of(request)
    assert err.code() == TritonError.UNAVAILABLE
    assert "tried llm_large, llm_medium, llm_small" in err.message()


@pytest.mark.parametrize("code", [TritonError.INVALID_ARG, TritonError.INTERNAL])
def test_tier_rejecting_the_input_is_invalid_arg_without_fallback(bls: dict, code: int) -> None:
    """Triton 2.51's BLS hands every downstream error over as INTERNAL: the router still
    tells a rejected input (the tier's message, marked as the project's client faults
    are) from a failing tier."""
    down = Downstream(bls, intent="summarization")
    too_long = "prompt is 9000 tokens, over the 8192-token context"
    bls["llm_small"] = lambda inputs: [error(INVALID_INPUT + too_long, code)]
    request = router_request()
    serve(make_router(), request)
    err = error_of(request)
    assert err.code() == TritonError.INVALID_ARG and too_long in err.message()
    assert "llm_medium" not in down.calls


@pytest.mark.parametrize(
    "message",
    [
        "overloaded: 32 requests already wait for one of 16 generation slots",
        "Encountered an error in forwardAsync function: CUDA error: out of memory",
        "some failure nobody anticipated",
    ],
)
def test_unknown_downstream_errors_are_the_tiers_and_fall_back(bls: dict, message: str) -> None:
    """Anything but a marked client fault is the tier's failure: the fallback serves it."""
    down = Downstream(bls, intent="summarization")
    bls["llm_small"] = lambda inputs: [error(message, TritonError.INTERNAL)]
    request = router_request()
    serve(make_router(), request)
    assert "llm_medium" in down.calls
    assert all(not resp.has_error() for resp, _ in request.sender.sent if resp is not None)


def test_error_after_first_token_ends_the_stream_with_an_error(bls: dict) -> None:
    down = Downstream(bls, intent="summarization")
    bls["llm_small"] = lambda inputs: [*token_stream(b"Hi"), error("out of memory")]
    request = router_request(stream=True)
    serve(make_router(), request)
    resp, flags = request.sender.sent[-1]
    assert flags & FINAL and resp.has_error()
    assert value(request.sender.responses()[0], "text_output") == "H"
    assert "llm_medium" not in down.calls  # no fallback once text was sent


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (lambda: router_request(""), "empty"),
        (lambda: router_request("  \n\t "), "empty"),
        (lambda: router_request(b"caf\xc3"), "UTF-8"),
        (lambda: router_request(intent="chitchat"), "unknown intent override 'chitchat'"),
        (lambda: router_request(model="gpt-5"), "unknown model override 'gpt-5'"),
        (lambda: router_request(max_tokens=-3), "'max_tokens' must be at least 1, got -3"),
        (lambda: router_request(max_tokens=0), "at least 1"),
        (lambda: router_request(temperature=-1.0), "'temperature' must be >= 0"),
        (
            lambda: FakeRequest(
                {
                    "text_input": np.array([[b"hi"]], dtype=np.object_),
                    "max_tokens": np.array([[5.0]], dtype=np.float32),
                }
            ),
            "input 'max_tokens' must be INT32, got FP32",
        ),
    ],
)
def test_bad_input_is_invalid_arg_before_any_model_runs(
    bls: dict, request_: Any, message: str
) -> None:
    down = Downstream(bls)
    request = request_()
    serve(make_router(), request)
    err = error_of(request)
    assert err.code() == TritonError.INVALID_ARG
    assert message in err.message()
    assert down.calls == {}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"max_tokens": 128, "text": "word " * 200}, "exceeds the context of 256 tokens"),
        ({"max_tokens": 600}, "'max_tokens' must be between 1 and 512"),
        ({"temperature": -1.0}, "temperature"),
    ],
)
def test_preprocessing_rejection_is_invalid_arg(bls: dict, extra: dict, message: str) -> None:
    down = Downstream(bls)
    request = router_request(**extra)
    serve(make_router(), request)
    err = error_of(request)
    assert err.code() == TritonError.INVALID_ARG and message in err.message()
    assert down.tiers_called() == []


class CancelAfter(ResponseSender):
    """A client that cancels after ``checks`` calls to ``is_cancelled``."""

    def __init__(self, checks: int) -> None:
        super().__init__()
        self.checks = checks

    def is_cancelled(self) -> bool:
        self.checks -= 1
        return self.checks < 0


def test_cancelled_stream_stops_the_tier(bls: dict) -> None:
    SENT_REQUESTS.clear()
    down = Downstream(bls, intent="summarization")
    request = router_request(stream=True)
    request.sender = CancelAfter(checks=3)
    metrics = RouterMetrics()
    serve(make_router(metrics), request)
    assert metrics.cancellations.labels(tier="llm_small").value == 1

    assert request.sender.closed
    text = "".join(value(r, "text_output") for r in request.sender.responses())
    assert len(text) < len(ANSWER)
    first, stop = down.calls["llm_small"]
    assert stop["stop"].tolist() == [[True]]
    assert stop["input_ids"].shape == (1, 1)
    assert {"input_ids", "input_lengths", "request_output_len"} <= stop.keys()  # required
    assert "stop" not in first
    # tensorrt_llm's stop ends the running request with the same id: it must carry it.
    tier_requests = [r for r in SENT_REQUESTS if r.model_name == "llm_small"]
    assert len(tier_requests) == 2 and tier_requests[0].request_id
    assert tier_requests[1].request_id == tier_requests[0].request_id


def test_request_cancelled_while_queued_runs_nothing(bls: dict) -> None:
    down = Downstream(bls)
    request = router_request()
    request.sender.cancelled = True
    serve(make_router(), request)
    assert request.sender.sent == [(None, FINAL)]
    assert down.calls == {}


def test_metrics_count_requests_and_classifier_latency(bls: dict) -> None:
    Downstream(bls, intent="summarization")
    metrics = RouterMetrics()
    router = make_router(metrics)
    serve(router, router_request())
    serve(router, router_request(model="llm_medium"))
    serve(router, router_request(intent="completion"))

    def count(**labels: str) -> float:
        return metrics.requests.labels(**labels).value

    assert count(intent="summarization", tier="llm_small", reason="table") == 1
    assert count(intent="summarization", tier="llm_medium", reason="model_override") == 1
    assert count(intent="completion", tier="llm_medium", reason="intent_override") == 1
    # two classifications observed (the intent override skipped one), in microseconds
    assert metrics.classifier_latency.labels(model="intent_classifier").value > 0


def test_submit_serves_concurrent_requests_on_workers(bls: dict) -> None:
    Downstream(bls, intent="summarization")
    router = make_router()
    requests = [router_request(stream=True) for _ in range(5)]
    router.submit(requests)
    router.close()
    for request in requests:
        assert request.sender.closed
        assert "".join(value(r, "text_output") for r in request.sender.responses()) == ANSWER


def test_token_text_keeps_spaces_and_split_characters() -> None:
    """The detokenizer the model builds, on the real SmolLM2 tokenizer."""
    from serving.assets import smollm2_gguf
    from serving.llm.tokenizer import TokenBytes, load_tokenizer
    from serving.text import TokenText

    tokenizer = load_tokenizer(smollm2_gguf())
    text = "Crème brûlée, 東京 and 🙂 emoji, with  two spaces."
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = TokenText(TokenBytes(tokenizer))
    chunks = [detok.push([i]) for i in ids] + [detok.flush()]
    assert "".join(chunks) == text
    assert all("\ufffd" not in c for c in chunks)


def test_model_py_initializes_from_its_config_and_serves(bls: dict) -> None:
    from tests.conftest import load_model_module, model_args

    module = load_model_module("router")
    model = module.TritonPythonModel()
    model.initialize(model_args("router"))
    try:
        assert model.router.policy.table["summarization"] == "llm_small"
        assert model.router.models.classifier == "intent_classifier"
        Downstream(bls, intent="summarization")
        request = router_request()
        assert model.execute([request]) is None
    finally:
        model.finalize()
    assert request.sender.closed
    assert value(request.sender.responses()[0], "model") == "llm_small"


@pytest.mark.parametrize("profile", ["cpu", "h100"])
def test_router_agrees_with_the_models_it_calls(profile: str) -> None:
    """Names the router sends and reads exist, with its tokenizer, in both profiles."""
    from serving.repository import config_path, parse_config
    from serving.router import PRE_TO_TIER, TIER_OUTPUTS

    repo = Path(__file__).resolve().parents[2] / "model_repository"

    def config(model: str) -> Any:
        return parse_config(config_path(repo / model, profile))

    router = config("router")
    param = {k: v.string_value for k, v in router.parameters.items()}
    pre = config("preprocessing")
    assert {o.name for o in pre.output} >= set(PRE_TO_TIER)
    for name, shared in pre.parameters.items():  # tokenizer, template, defaults, limits
        assert param[name] == shared.string_value, name
    classifier = config(param["intent_classifier_model"])
    assert {i.name for i in classifier.input} == {"text"}
    assert {"intent", "confidence"} <= {o.name for o in classifier.output}
    for tier in param["tiers"].split(","):
        tier_config = config(tier)
        names = {i.name for i in tier_config.input}
        assert names >= {*PRE_TO_TIER.values(), "streaming", "stop"}, tier
        assert {o.name for o in tier_config.output} >= set(TIER_OUTPUTS)
        assert tier_config.model_transaction_policy.decoupled


def test_full_router_queue_answers_overloaded_at_once(bls: dict) -> None:
    """Beyond max_concurrent_requests + max_queue_size, a request fails fast (UNAVAILABLE)."""
    gate = threading.Event()
    down = Downstream(bls, intent="summarization")

    def held_classify(inputs: dict[str, np.ndarray]) -> InferenceResponse:
        gate.wait(30)
        return down.classify(inputs)

    bls["intent_classifier"] = held_classify
    router = make_router(workers=1, max_queue=1)
    try:
        running, queued, rejected = (router_request() for _ in range(3))
        router.submit([running, queued])
        started = time.monotonic()
        router.submit([rejected])
        assert time.monotonic() - started < 1.0
        err = error_of(rejected)
        assert err.code() == TritonError.UNAVAILABLE and "overloaded: 2 router" in err.message()
        gate.set()
    finally:
        gate.set()
        router.close()
    for request in (running, queued):
        assert request.sender.sent and not any(
            resp is not None and resp.has_error() for resp, _ in request.sender.sent
        )
    assert router._admitted == 0  # every admitted request gave its place back
    with pytest.raises(ConfigError, match="max_queue_size"):
        make_router(max_queue=-1)


# -- deadlines: a tier that accepts a request and never answers ----------------------


class StoppableTier:
    """A tensorrt_llm-style tier: ``stop`` with a request id ends that request.

    ``hang_first`` makes it accept a request and send nothing; otherwise it streams
    ``tokens`` and then waits (never ending by itself) until it is stopped. Every stop
    ends the stopped request with a bare final response, as tensorrt_llm does.
    """

    def __init__(self, tokens: Sequence[int] = (), hang_first: bool = False) -> None:
        self.tokens, self.hang_first = list(tokens), hang_first
        self.stopped: dict[str, threading.Event] = {}
        self.sent: dict[str, int] = {}
        self.stop_ids: list[str] = []
        self._lock = threading.Lock()

    def _event(self, request_id: str) -> threading.Event:
        with self._lock:
            return self.stopped.setdefault(request_id, threading.Event())

    def __call__(self, inputs: dict[str, np.ndarray], request: Any) -> Any:
        stop = self._event(request.request_id)
        if "stop" in inputs:
            self.stop_ids.append(request.request_id)
            stop.set()
            return [InferenceResponse()]
        if self.hang_first:
            stop.wait(30)
            return [InferenceResponse()]
        return self._stream(request.request_id, stop)

    def _stream(self, request_id: str, stop: threading.Event) -> Any:
        for response in token_stream(self.tokens):
            self.sent[request_id] = self.sent.get(request_id, 0) + 1
            yield response
        stop.wait(30)
        yield InferenceResponse()

    def release(self) -> None:
        for event in list(self.stopped.values()):
            event.set()


DEADLINES = BlsDeadlines(first_response=1.0, next_response=1.0)


def deadline_router(metrics: RouterMetrics) -> Router:
    return make_router(metrics, deadlines=DEADLINES)


def tier_request_ids(model: str) -> list[str]:
    return [r.request_id for r in SENT_REQUESTS if r.model_name == model]


def abandoned(metrics: RouterMetrics, model: str) -> float:
    return metrics.bls.abandoned.labels(model=model).value


def test_tier_that_never_answers_times_out_falls_back_and_is_stopped(bls: dict) -> None:
    SENT_REQUESTS.clear()
    down = Downstream(bls, intent="summarization")  # llm_small, then llm_medium
    hung = StoppableTier(hang_first=True)
    bls["llm_small"] = hung
    metrics = RouterMetrics()
    router = deadline_router(metrics)
    request = router_request(stream=True)
    try:
        serve(router, request)
    finally:
        router.close()  # waits for the stop sent in the background
        hung.release()
    chunks = request.sender.responses()
    assert "".join(value(r, "text_output") for r in chunks) == ANSWER
    assert {value(r, "model") for r in chunks} == {"llm_medium"}
    assert down.tiers_called() == ["llm_medium"]
    assert metrics.fallbacks.labels(from_tier="llm_small", to_tier="llm_medium").value == 1
    assert metrics.bls.timeouts.labels(model="llm_small", phase="first_response").value == 1
    # The hung request was sent a stop carrying its own request id, which ended it.
    (hung_id, stop_id) = tier_request_ids("llm_small")
    assert hung.stop_ids == [hung_id] and stop_id == hung_id
    assert eventually(lambda: abandoned(metrics, "llm_small") == 0)


def test_forced_tier_that_never_answers_is_unavailable(bls: dict) -> None:
    Downstream(bls)
    hung = StoppableTier(hang_first=True)
    bls["llm_large"] = hung
    router = deadline_router(RouterMetrics())
    request = router_request(model="llm_large")
    try:
        serve(router, request)
    finally:
        router.close()
        hung.release()
    err = error_of(request)
    assert err.code() == TritonError.UNAVAILABLE
    assert "llm_large: timed out: no first response within 1s" in err.message()
    assert hung.stop_ids  # and it was told to stop


def test_tier_that_stalls_mid_stream_ends_the_stream_with_an_error_and_is_stopped(
    bls: dict,
) -> None:
    SENT_REQUESTS.clear()
    down = Downstream(bls, intent="summarization")
    stalls = StoppableTier(tokens=b"Hi")
    bls["llm_small"] = stalls
    metrics = RouterMetrics()
    router = deadline_router(metrics)
    request = router_request(stream=True, max_tokens=50)
    try:
        serve(router, request)
    finally:
        router.close()
        stalls.release()
    resp, flags = request.sender.sent[-1]
    assert flags & FINAL and resp.has_error()
    assert resp.error().code() == TritonError.UNAVAILABLE
    assert "no next response within 1s" in resp.error().message()
    text = [value(r, "text_output") for r in request.sender.responses() if not r.has_error()]
    assert "".join(text) == "Hi"
    assert "llm_medium" not in down.calls  # no fallback once text was sent
    (request_id, stop_id) = tier_request_ids("llm_small")
    assert stalls.stop_ids == [request_id] and stop_id == request_id
    assert metrics.bls.timeouts.labels(model="llm_small", phase="next_response").value == 1


def test_cancelled_stream_really_stops_a_tier_that_would_run_on(bls: dict) -> None:
    """The stop reaches the running request (same id), which ends with fewer tokens than
    asked, and the router does not wait for more."""
    SENT_REQUESTS.clear()
    Downstream(bls, intent="summarization")
    tier = StoppableTier(tokens=TOKENS)
    bls["llm_small"] = tier
    request = router_request(stream=True, max_tokens=64)
    request.sender = CancelAfter(checks=3)
    router = deadline_router(RouterMetrics())
    try:
        serve(router, request)
    finally:
        router.close()
        tier.release()
    assert request.sender.closed and not any(r.has_error() for r in request.sender.responses())
    (running_id, stop_id) = tier_request_ids("llm_small")
    assert tier.stop_ids == [running_id] and stop_id == running_id
    assert tier.stopped[running_id].is_set()
    assert sum(1 for _ in request.sender.responses()) < 64


def test_hung_classifier_costs_a_timeout_then_routes_as_low_confidence(bls: dict) -> None:
    """Routing degrades, availability does not: no worker is lost and the prompt is
    served by the low-confidence tier, reported as intent "unknown"."""
    down = Downstream(bls)
    release = threading.Event()

    def hung(inputs: dict[str, np.ndarray]) -> InferenceResponse:
        release.wait(30)
        return down.classify(inputs)

    bls["intent_classifier"] = hung
    metrics = RouterMetrics()
    router = deadline_router(metrics)
    request = router_request()
    try:
        serve(router, request)
    finally:
        release.set()
        router.close()
    resp = request.sender.responses()[0]
    assert not resp.has_error()
    assert (value(resp, "intent"), value(resp, "model")) == ("unknown", POLICY.low_confidence_tier)
    assert value(resp, "confidence") == 0.0
    assert down.tiers_called() == [POLICY.low_confidence_tier]
    labels = {"intent": "unknown", "tier": POLICY.low_confidence_tier}
    assert metrics.requests.labels(**labels, reason="classifier_unavailable").value == 1


@pytest.mark.parametrize(
    "answer",
    [error("intent_classifier crashed: CUDA error"), "raise"],
    ids=["error answer", "call raised"],
)
def test_failing_classifier_routes_as_low_confidence(bls: dict, answer: Any) -> None:
    down = Downstream(bls)

    def failing(inputs: dict[str, np.ndarray]) -> InferenceResponse:
        if answer == "raise":
            raise RuntimeError("stub is gone")
        return answer

    bls["intent_classifier"] = failing
    request = router_request(stream=True)
    serve(make_router(), request)
    responses = request.sender.responses()
    assert responses and not any(r.has_error() for r in responses)
    assert value(responses[0], "model") == POLICY.low_confidence_tier
    assert down.tiers_called() == [POLICY.low_confidence_tier]


@pytest.mark.parametrize(
    ("answer", "code", "text"),
    [
        (error("text is empty", TritonError.INVALID_ARG), TritonError.INVALID_ARG, "empty"),
        (error("overloaded: 64 requests wait"), TritonError.UNAVAILABLE, "overloaded: "),
    ],
    ids=["rejects the input", "full queue"],
)
def test_classifier_rejection_or_full_queue_is_the_clients_answer(
    bls: dict, answer: InferenceResponse, code: int, text: str
) -> None:
    """As in the gateway: only a classifier that is down or failed degrades routing."""
    down = Downstream(bls)
    bls["intent_classifier"] = lambda inputs: answer
    request = router_request()
    serve(make_router(), request)
    err = error_of(request)
    assert err.code() == code and text in err.message()
    assert down.tiers_called() == []


# -- TensorRT-LLM's own error texts (the h100 tiers) ---------------------------------

#: Real messages, as the tensorrtllm backend reports them (the wrapper texts are from
#: inflight_batcher_llm/src/model_instance_state.cc; the inner ones are quoted in
#: serving/errors.py with their source files).
TRTLLM_CLIENT_FAULTS = [
    "Executor failed process requestId 7 due to the following error: [TensorRT-LLM][ERROR] "
    "Assertion failed: Prompt length (9000) exceeds maximum input length (8192). Set log "
    "level to info and check TRTGptModel logs for how maximum input length is set "
    "(/app/tensorrt_llm/cpp/tensorrt_llm/batch_manager/llmRequest.cpp:123)",
    "[TensorRT-LLM][ERROR] Streaming is only supported if model is deployed using "
    "decoupled mode. (/app/inflight_batcher_llm/src/utils.cc:907)",
    "[TensorRT-LLM][ERROR] input_ids or encoder_input_features is not present in the request.",
    "request_output_len is not present in the request",
]
TRTLLM_CAPACITY = [
    "[TensorRT-LLM][ERROR] Maximum queue size of 64 has been reached, please try again later "
    "(/app/tensorrt_llm/cpp/tensorrt_llm/executor/executorImpl.cpp:650)",
    "[request id: router-1-0] Exceeds maximum queue size",
]


@pytest.mark.parametrize("message", TRTLLM_CLIENT_FAULTS)
def test_trtllm_client_fault_is_invalid_arg_without_fallback(bls: dict, message: str) -> None:
    down = Downstream(bls, intent="summarization")
    bls["llm_small"] = lambda inputs: [error(message)]
    request = router_request()
    serve(make_router(), request)
    err = error_of(request)
    assert err.code() == TritonError.INVALID_ARG and message in err.message()
    assert "llm_medium" not in down.calls


@pytest.mark.parametrize("message", TRTLLM_CAPACITY)
def test_trtllm_full_queue_falls_back_and_is_overloaded_when_every_tier_is_full(
    bls: dict, message: str
) -> None:
    down = Downstream(bls, intent="summarization")
    bls["llm_small"] = lambda inputs: [error(message)]
    request = router_request()
    serve(make_router(), request)
    assert "llm_medium" in down.calls  # the fallback served it
    assert not any(r.has_error() for r in request.sender.responses())

    bls["llm_medium"] = lambda inputs: [error(message)]
    request = router_request()
    serve(make_router(), request)
    err = error_of(request)
    assert err.code() == TritonError.UNAVAILABLE
    assert err.message().startswith("overloaded: no tier could serve this request")
