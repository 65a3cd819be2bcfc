"""The LLM model.py adapters under the fake pb_utils, with a scripted runner (no weights).

The scripted runner makes the engine "generate" a fixed text, so these tests check what
the adapters send (chunks, final flags, errors, cancellation, stop) quickly and exactly.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from serving.errors import ValidationError
from serving.llm import service
from serving.llm.engine import Engine, EngineLimits
from serving.llm.runner import LlamaShape
from serving.llm.service import Tier
from serving.llm.tier_model import TierModel
from serving.llm.tokenizer import TokenBytes
from tests.conftest import ROOT, FakeRequest, load_model_module, model_args, pb_utils

ANSWER = "Paris — très belle! 你好 🙂"


@pytest.fixture(scope="module")
def tokenizer():
    from serving.assets import smollm2_gguf
    from serving.llm.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_gguf())


class ScriptedRunner:
    """Stands in for LlamaRunner: every sequence generates ``script`` then ``end_id``."""

    def __init__(self, script: list[int], end_id: int, vocab: int) -> None:
        self.shape = LlamaShape(1, 8, 1, 1, 8, vocab, 10000.0, 1e-5)
        self.max_active, self.max_context = 4, 512
        self.script = [*script, end_id]
        self.prompt_len: dict[int, int] = {}

    def _logits(self, index: int) -> torch.Tensor:
        logits = torch.zeros(self.shape.vocab)
        logits[self.script[min(index, len(self.script) - 1)]] = 1.0
        return logits

    def prefill_batch(
        self, slots: list[int], prompts: list[list[int]], cached: list[int] | None = None
    ) -> torch.Tensor:
        for slot, token_ids in zip(slots, prompts, strict=True):
            self.prompt_len[slot] = len(token_ids)
        return torch.stack([self._logits(0) for _ in slots])

    def save_prefix(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.empty(0), torch.empty(0)

    def load_prefix(self, slot: int, keys: torch.Tensor, values: torch.Tensor, n: int) -> None:
        pass

    def decode(self, token_ids: list[int], positions: list[int]) -> torch.Tensor:
        return torch.stack(
            [self._logits(pos - self.prompt_len[slot] + 1) for slot, pos in enumerate(positions)]
        )

    def move_slot(self, src: int, dst: int, length: int) -> None:
        self.prompt_len[dst] = self.prompt_len[src]


@pytest.fixture
def tier_model(tokenizer, monkeypatch):
    script = tokenizer.encode(ANSWER, add_special_tokens=False)
    end_id = tokenizer.eos_token_id
    limits = EngineLimits(max_active=4, max_context=512, max_new_tokens=64, max_tokens=2048)

    def fake_build(config, observer=None, on_prefill=None):
        runner = ScriptedRunner(script, end_id, len(tokenizer))
        engine = Engine(runner, limits, end_id, observer=observer, on_prefill=on_prefill)
        return Tier(engine, TokenBytes(tokenizer), end_id)

    monkeypatch.setattr(service, "build_engine", fake_build)
    model = TierModel()
    model.initialize(model_args("llm_small"))
    yield model
    model.finalize()


def test_a_new_instance_resets_the_sequence_gauges_a_dead_stub_left(tokenizer, monkeypatch):
    """Triton keeps a custom metric's series when its stub dies and hands the same series
    to the stub that replaces it: the new instance must not report the old load."""
    left: list = []

    def dead_stubs_series(family, labels=None, **_):
        metric = pb_utils.Metric(labels or {})
        metric.value = 9.0  # what the killed stub had active
        left.append(metric)
        return metric

    monkeypatch.setattr(pb_utils.MetricFamily, "Metric", dead_stubs_series)
    monkeypatch.setattr(
        service, "build_engine", lambda config, observer=None, on_prefill=None: None
    )
    model = TierModel()
    model.initialize(model_args("llm_small"))
    gauges = [(m.labels["state"], m.value) for m in left if "state" in m.labels]
    assert gauges == [("active", 0.0), ("waiting", 0.0)]


@pytest.mark.parametrize("tier", ["llm_small", "llm_medium", "llm_large"])
def test_every_tier_serves_the_one_shared_adapter(tier) -> None:
    """The tiers' model.py files are the same import of :class:`TierModel`; none drifts."""
    path = ROOT / "model_repository" / tier / "1" / "model.py"
    small = ROOT / "model_repository" / "llm_small" / "1" / "model.py"
    assert path.read_text() == small.read_text()
    assert load_model_module(tier).TritonPythonModel is TierModel
    code = [line for line in path.read_text().splitlines() if line and not line.startswith('"')]
    assert code == [
        "from serving.llm.tier_model import TierModel as TritonPythonModel",
        '__all__ = ["TritonPythonModel"]',
    ]


def _wait_closed(request: FakeRequest, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not request.sender.closed:
        if time.monotonic() > deadline:
            raise AssertionError(f"no final flag after {timeout}s: {request.sender.sent}")
        time.sleep(0.01)


def _tier_inputs(**overrides: np.ndarray) -> dict[str, np.ndarray]:
    inputs = {
        "input_ids": np.array([[1, 2, 3]], dtype=np.int32),
        "input_lengths": np.array([3], dtype=np.int32),
        "request_output_len": np.array([[32]], dtype=np.int32),
    }
    inputs.update(overrides)
    return {k: v for k, v in inputs.items() if v is not None}


def _texts(request: FakeRequest, tokenizer) -> list[bytes]:
    token_bytes = TokenBytes(tokenizer)
    out = []
    for response in request.sender.responses():
        assert not response.has_error(), response.error().message()
        ids = pb_utils.get_output_tensor_by_name(response, "output_ids").as_numpy()
        length = pb_utils.get_output_tensor_by_name(response, "sequence_length").as_numpy()
        assert ids.shape[:2] == (1, 1) and length.tolist() == [[ids.shape[2]]]
        out.append(token_bytes.bytes_of(ids.reshape(-1).tolist()))
    return out


def test_streaming_sends_aligned_chunks_then_final(tier_model, tokenizer) -> None:
    request = FakeRequest(_tier_inputs(streaming=np.array([[True]])))
    assert tier_model.execute([request]) is None
    _wait_closed(request)
    chunks = _texts(request, tokenizer)
    assert len(chunks) > 3
    assert "".join(c.decode("utf-8") for c in chunks) == ANSWER
    flags = [f for _, f in request.sender.sent]
    assert flags[-1] == pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    assert all(f == 0 for f in flags[:-1])


def test_non_streaming_sends_one_response(tier_model, tokenizer) -> None:
    request = FakeRequest(_tier_inputs())
    tier_model.execute([request])
    _wait_closed(request)
    assert [c.decode("utf-8") for c in _texts(request, tokenizer)] == [ANSWER]


def test_prompt_tokens_reused_from_an_earlier_prompt_are_counted(tier_model) -> None:
    """``llm_engine_prompt_tokens{source=computed|reused}``: the same 20-token prompt twice
    computes 20 + 1 tokens and reuses 19 (its last token is always computed)."""
    ids = np.arange(100, 120, dtype=np.int32).reshape(1, -1)
    for _ in range(2):
        request = FakeRequest(_tier_inputs(input_ids=ids, input_lengths=np.array([20], np.int32)))
        tier_model.execute([request])
        _wait_closed(request)
    counter = tier_model.prompt_tokens
    assert counter.labels(model="llm_small", source="computed").value == 21
    assert counter.labels(model="llm_small", source="reused").value == 19


def test_request_output_len_cuts_the_answer(tier_model, tokenizer) -> None:
    request = FakeRequest(_tier_inputs(request_output_len=np.array([[2]], dtype=np.int32)))
    tier_model.execute([request])
    _wait_closed(request)
    ids = tokenizer.encode(ANSWER, add_special_tokens=False)[:2]
    assert _texts(request, tokenizer) == [TokenBytes(tokenizer).bytes_of(ids)]


BAD = [
    ({"input_ids": np.zeros((1, 0), dtype=np.int32), "input_lengths": None}, "is empty"),
    ({"input_ids": np.array([[1, 2, 3]], dtype=np.int64)}, "'input_ids' must be INT32"),
    ({"input_ids": np.ones((1, 600), dtype=np.int32), "input_lengths": None}, "shorten"),
    ({"request_output_len": np.array([[0]], dtype=np.int32)}, "between 1 and 64"),
    ({"request_output_len": np.array([[-1]], dtype=np.int32)}, "between 1 and 64"),
    ({"request_output_len": np.array([[10_000]], dtype=np.int32)}, "between 1 and 64"),
    ({"request_output_len": np.array([[4.0]], dtype=np.float32)}, "must be INT32"),
    ({"temperature": np.array([-0.1], dtype=np.float32)}, "'temperature' must be >= 0"),
    ({"temperature": np.array([0.5], dtype=np.float64)}, "must be FP32"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD)
def test_bad_input_is_invalid_arg_and_model_keeps_serving(
    tier_model, tokenizer, overrides, message
) -> None:
    bad = FakeRequest(_tier_inputs(**overrides))
    good = FakeRequest(_tier_inputs())
    tier_model.execute([bad, good])
    (response, flags), *_ = bad.sender.sent
    assert flags == pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    assert response.error().code() == pb_utils.TritonError.INVALID_ARG
    assert message in response.error().message()
    _wait_closed(good)
    assert [c.decode() for c in _texts(good, tokenizer)] == [ANSWER]


def test_cancelled_request_gets_only_the_final_flag(tier_model) -> None:
    request = FakeRequest(_tier_inputs(streaming=np.array([[True]])), cancelled=True)
    tier_model.execute([request])
    _wait_closed(request)
    assert request.sender.sent == [(None, pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)]


def test_stop_request_ends_the_running_one(tier_model) -> None:
    class Named(FakeRequest):
        def request_id(self) -> str:
            return "req-1"

    tier = tier_model.tier
    events = []
    tier.submit("req-1", tier_model_request(), events.append, lambda: False)
    stop = Named(_tier_inputs(stop=np.array([[True]])))
    tier_model.execute([stop])
    assert stop.sender.sent == [(None, pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)]
    deadline = time.monotonic() + 30
    while not (events and events[-1].finished) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert events[-1].finished
    with pytest.raises(ValidationError, match="request id"):
        tier.stop("")


def tier_model_request():
    from serving.llm.engine import GenerationRequest

    # end_id -1 never matches: without the stop, this would run all 64 tokens.
    return GenerationRequest([1, 2, 3], 64, end_id=-1)


def test_preprocessing_and_postprocessing_models(tokenizer) -> None:
    pre = load_model_module("preprocessing").TritonPythonModel()
    pre.initialize(model_args("preprocessing"))
    post = load_model_module("postprocessing").TritonPythonModel()
    post.initialize(model_args("postprocessing"))
    good = FakeRequest({"text_input": np.array([["Bonjour 🙂".encode()]], dtype=np.object_)})
    empty = FakeRequest({"text_input": np.array([[b" "]], dtype=np.object_)})
    not_utf8 = FakeRequest({"text_input": np.array([[b"\xff\xfe"]], dtype=np.object_)})
    zero = FakeRequest(
        {
            "text_input": np.array([[b"hi"]], dtype=np.object_),
            "max_tokens": np.array([[0]], dtype=np.int32),
        }
    )
    ok, err_empty, err_utf8, err_zero = pre.execute([good, empty, not_utf8, zero])
    for response, text in [(err_empty, "empty"), (err_utf8, "UTF-8"), (err_zero, "max_tokens")]:
        assert response.error().code() == pb_utils.TritonError.INVALID_ARG
        assert text in response.error().message()
    outputs = {t.name(): t.as_numpy() for t in ok.output_tensors()}
    assert outputs["request_output_len"].tolist() == [[128]]
    assert outputs["streaming"].tolist() == [[False]]
    assert outputs["sampling_temperature"].tolist() == [[0.0]]

    ids = tokenizer.encode(ANSWER, add_special_tokens=False)
    chunks = [ids[:3], ids[3:9], ids[9:]]
    texts = []
    for chunk in chunks:
        (response,) = post.execute(
            [
                FakeRequest(
                    {
                        "tokens_batch": np.array([[chunk]], dtype=np.int32),
                        "sequence_length": np.array([[len(chunk)]], dtype=np.int32),
                    }
                )
            ]
        )
        (text,) = pb_utils.get_output_tensor_by_name(response, "text_output").as_numpy().reshape(-1)
        texts.append(text)
    assert b"".join(texts).decode("utf-8") == ANSWER


@pytest.mark.parametrize(("interval", "at_least", "at_most"), [(3600.0, 1, 1), (0.0, 10, 10_000)])
def test_cancellation_probe_is_rate_limited(tokenizer, interval, at_least, at_most) -> None:
    """The stub's ``is_cancelled`` is an IPC round trip: ask it at most once per interval."""
    from serving.llm.engine import GenerationRequest

    script = tokenizer.encode(ANSWER, add_special_tokens=False)
    limits = EngineLimits(max_active=4, max_context=512, max_new_tokens=64, max_tokens=2048)
    runner = ScriptedRunner(script, tokenizer.eos_token_id, len(tokenizer))
    engine = Engine(runner, limits, tokenizer.eos_token_id, cancel_probe_interval=interval)
    calls = []

    def probe() -> bool:
        calls.append(time.monotonic())
        return False

    try:
        done = []
        engine.submit(GenerationRequest([1, 2, 3], 64), done.append, probe)
        deadline = time.monotonic() + 30
        while not (done and done[-1].finished) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert done[-1].finished and len(script) >= 10
        assert at_least <= len(calls) <= at_most
    finally:
        engine.close()


class _HeldRunner(ScriptedRunner):
    """A scripted runner whose decode steps wait until the test lets them go."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.go = threading.Event()

    def decode(self, token_ids: list[int], positions: list[int]) -> torch.Tensor:
        self.go.wait(30)
        return super().decode(token_ids, positions)


def test_full_queue_answers_unavailable_at_once(tokenizer, monkeypatch) -> None:
    """Over ``max_queue_size`` a request fails fast with UNAVAILABLE; the queued ones finish."""
    script = tokenizer.encode(ANSWER, add_special_tokens=False)
    end_id = tokenizer.eos_token_id
    limits = EngineLimits(
        max_active=1, max_context=512, max_new_tokens=64, max_tokens=2048, max_waiting=1
    )
    runner = _HeldRunner(script, end_id, len(tokenizer))

    def held_build(config, observer=None, on_prefill=None):
        return Tier(Engine(runner, limits, end_id), TokenBytes(tokenizer), end_id)

    monkeypatch.setattr(service, "build_engine", held_build)
    model = TierModel()
    model.initialize(model_args("llm_small"))
    try:
        running, queued, rejected = (FakeRequest(_tier_inputs()) for _ in range(3))
        model.execute([running])
        deadline = time.monotonic() + 30
        while model.tier.engine.active_count == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        model.execute([queued])
        started = time.monotonic()
        model.execute([rejected])
        assert time.monotonic() - started < 1.0
        ((response, flags),) = rejected.sender.sent
        assert flags == pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        assert response.error().code() == pb_utils.TritonError.UNAVAILABLE
        assert "max_queue_size 1" in response.error().message()
        runner.go.set()
        for request in (running, queued):
            _wait_closed(request)
            assert [c.decode() for c in _texts(request, tokenizer)] == [ANSWER]
    finally:
        runner.go.set()
        model.finalize()


class _PackRecorder(_HeldRunner):
    """A held runner that records the slots of every packed prefill."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.packs: list[list[int]] = []

    def prefill_batch(
        self, slots: list[int], prompts: list[list[int]], cached: list[int] | None = None
    ) -> torch.Tensor:
        self.packs.append(list(slots))
        return super().prefill_batch(slots, prompts, cached)


@pytest.mark.parametrize(
    ("max_prefill_tokens", "packs"), [(2048, [[0], [1, 2, 3]]), (8, [[0], [1, 2], [3]])]
)
def test_requests_waiting_together_are_prefilled_in_one_pack(
    tokenizer, max_prefill_tokens, packs
) -> None:
    """Requests that queued during a step join at the next one in one packed prefill, up to
    ``max_prefill_tokens`` prompt tokens per pack; every one of them gets its whole answer."""
    from serving.llm.engine import GenerationRequest

    script = tokenizer.encode(ANSWER, add_special_tokens=False)
    end_id = tokenizer.eos_token_id
    limits = EngineLimits(
        max_active=4,
        max_context=512,
        max_new_tokens=64,
        max_tokens=2048,
        max_prefill_tokens=max_prefill_tokens,
    )
    runner = _PackRecorder(script, end_id, len(tokenizer))
    engine = Engine(runner, limits, end_id)
    try:
        results = [[] for _ in range(4)]
        done = [threading.Event() for _ in range(4)]

        def sink(i: int):
            def on_event(event) -> None:
                results[i].extend(event.tokens)
                if event.finished:
                    done[i].set()

            return on_event

        engine.submit(GenerationRequest([1, 2, 3, 4], 64), sink(0))
        deadline = time.monotonic() + 30
        while engine.active_count == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        for i in range(1, 4):  # the first request's decode step is held: these queue
            engine.submit(GenerationRequest([5, 6, 7, 8], 64), sink(i))
        runner.go.set()
        assert all(event.wait(30) for event in done)
        assert runner.packs == packs
        assert results == [script] * 4
    finally:
        runner.go.set()
        engine.close()


def test_max_queue_size_is_read_and_checked() -> None:
    from serving.errors import ConfigError
    from serving.llm.service import TierConfig
    from serving.params import Params

    config = {"parameters": {"max_queue_size": {"string_value": "5"}}}
    assert TierConfig.from_params(Params(config, "llm_small")).limits.max_waiting == 5
    config = {"parameters": {"max_queue_size": {"string_value": "0"}}}
    with pytest.raises(ConfigError, match="max_waiting"):
        TierConfig.from_params(Params(config, "llm_small"))
    config = {"parameters": {"max_prefill_tokens": {"string_value": "512"}}}
    assert TierConfig.from_params(Params(config, "llm_small")).limits.max_prefill_tokens == 512
    config = {"parameters": {"max_prefill_tokens": {"string_value": "0"}}}
    with pytest.raises(ConfigError, match="max_prefill_tokens"):
        TierConfig.from_params(Params(config, "llm_small"))
    config = {"parameters": {"kv_cache_reuse_tokens": {"string_value": "0"}}}
    assert TierConfig.from_params(Params(config, "llm_small")).limits.kv_cache_reuse_tokens == 0
    config = {"parameters": {"kv_cache_reuse_tokens": {"string_value": "-1"}}}
    with pytest.raises(ConfigError, match="kv_cache_reuse_tokens"):
        TierConfig.from_params(Params(config, "llm_small"))


def test_float32_blocked_copy_is_read_and_checked() -> None:
    from serving.errors import ConfigError
    from serving.llm.service import TierConfig
    from serving.params import Params

    assert TierConfig.from_params(Params({}, "llm_small")).float32_blocked_copy is True
    config = {"parameters": {"float32_blocked_copy": {"string_value": "false"}}}
    assert TierConfig.from_params(Params(config, "llm_small")).float32_blocked_copy is False
    config = {"parameters": {"float32_blocked_copy": {"string_value": "maybe"}}}
    with pytest.raises(ConfigError, match="float32_blocked_copy"):
        TierConfig.from_params(Params(config, "llm_small"))


def test_native_kernels_is_read_and_checked() -> None:
    from serving.errors import ConfigError
    from serving.llm.service import TierConfig
    from serving.params import Params

    def parse(value: str | None) -> TierConfig:
        params = {} if value is None else {"native_kernels": {"string_value": value}}
        return TierConfig.from_params(Params({"parameters": params}, "llm_small"))

    assert parse(None).native_kernels is None  # auto: the kernel where it loads
    assert parse("true").native_kernels is True
    assert parse("false").native_kernels is False
    with pytest.raises(ConfigError, match="native_kernels must be one of"):
        parse("fast")
