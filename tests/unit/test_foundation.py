"""The shared serving helpers: parameters, text checks, batch join/split, BLS wrapper."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from serving import triton as st
from serving.errors import ConfigError, ValidationError
from serving.params import Params
from serving.text import decode_utf8, require_text
from tests.conftest import (
    SENT_REQUESTS,
    FakeRequest,
    InferenceRequest,
    InferenceResponse,
    Tensor,
    TritonError,
    eventually,
)


def _params(**values: str) -> Params:
    return Params({"parameters": {k: {"string_value": v} for k, v in values.items()}}, "m")


class TestParams:
    def test_typed_values(self) -> None:
        p = _params(n="4", x="0.5", flag="true", name="llm", table='{"a": "b"}')
        assert p.get("n", int) == 4
        assert p.get("x", float) == 0.5
        assert p.get("flag", bool) is True
        assert p.get("name", str) == "llm"
        assert p.get("table", dict) == {"a": "b"}

    def test_empty_and_template_placeholders_mean_unset(self) -> None:
        p = _params(a="", b="${max_batch}")
        assert p.get("a", int, default=7) == 7
        assert p.get("b", int, default=3) == 3
        assert "a" not in p

    def test_required_missing_names_the_parameter(self) -> None:
        with pytest.raises(ConfigError, match="'threads' is required"):
            _params().get("threads", int)

    def test_bad_value_names_parameter_and_type(self) -> None:
        with pytest.raises(ConfigError, match=r"'n'='four' is not a valid int"):
            _params(n="four").get("n", int)
        with pytest.raises(ConfigError, match="must be a JSON dict"):
            _params(t="[1]").get("t", dict)
        with pytest.raises(ConfigError, match="not a valid bool"):
            _params(f="maybe").get("f", bool)


class TestText:
    def test_decodes_bytes_and_str(self) -> None:
        assert decode_utf8("é".encode(), "text") == "é"
        assert decode_utf8(np.bytes_(b"ok"), "text") == "ok"
        assert decode_utf8("x", "text") == "x"

    def test_invalid_utf8_names_field_and_offset(self) -> None:
        with pytest.raises(
            ValidationError, match=r"'text_input' is not valid UTF-8 \(bad byte at offset 2\)"
        ):
            decode_utf8(b"ab\xff", "text_input")

    @pytest.mark.parametrize("value", [b"", b"   ", "\n\t"])
    def test_blank_text_rejected(self, value: object) -> None:
        with pytest.raises(ValidationError, match="empty or whitespace only"):
            require_text(value, "text")

    def test_non_string_rejected(self) -> None:
        with pytest.raises(ValidationError, match="must be a string"):
            decode_utf8(3, "text")


class TestInputs:
    def test_dtype_checked(self) -> None:
        req = FakeRequest({"n": np.array([1], dtype=np.int64)})
        with pytest.raises(ValidationError, match="input 'n' must be INT32, got INT64"):
            st.get_input(req, "n", np.int32)

    def test_missing_required_and_optional(self) -> None:
        req = FakeRequest({})
        with pytest.raises(ValidationError, match="input 'x' is required"):
            st.get_input(req, "x")
        assert st.get_scalar(req, "max_tokens", np.int32, default=16) == 16

    def test_scalar_must_be_single(self) -> None:
        req = FakeRequest({"t": np.array([1.0, 2.0], dtype=np.float32)})
        with pytest.raises(ValidationError, match=r"must hold one value, got shape \[2\]"):
            st.get_scalar(req, "t", np.float32, default=1.0)


class TestExecuteBatch:
    def test_bad_request_isolated_and_order_kept(self) -> None:
        requests = [FakeRequest({"x": np.array([v])}) for v in (1, -1, 3)]

        def parse(req: FakeRequest) -> int:
            value = int(st.get_input(req, "x")[0])
            if value < 0:
                raise ValidationError("x must be >= 0")
            return value

        seen: list[list[int]] = []

        def run(items: list[int]) -> list[int]:
            seen.append(items)
            return [v * 10 for v in items]

        out = st.execute_batch(requests, parse, run, lambda r: [Tensor("y", np.array([r]))], "m")
        assert seen == [[1, 3]]  # the good requests ran together, once
        assert len(out) == 3
        assert out[0].output_tensors()[0].as_numpy().tolist() == [10]
        assert out[1].error().code() == TritonError.INVALID_ARG
        assert out[1].error().message() == "invalid input: x must be >= 0"
        assert out[2].output_tensors()[0].as_numpy().tolist() == [30]

    def test_unexpected_error_hides_traceback(self, caplog: pytest.LogCaptureFixture) -> None:
        requests = [FakeRequest({}), FakeRequest({})]

        def run(items: list[int]) -> list[int]:
            raise KeyError("secret internals")

        out = st.execute_batch(requests, lambda r: 1, run, lambda r: [], "emb")
        for resp in out:
            assert resp.error().code() == TritonError.INTERNAL
            assert "secret" not in resp.error().message()
            assert "KeyError" in resp.error().message()
        assert "secret internals" in caplog.text  # logged on the server


class TestBls:
    def test_infer_returns_outputs(self, bls: dict) -> None:
        bls["cls"] = lambda inputs: InferenceResponse([Tensor("y", inputs["x"] + 1)])
        out = st.Bls().infer("cls", {"x": np.array([1])}, ["y"])
        assert out["y"].tolist() == [2]

    def test_downstream_error_raised_with_code(self, bls: dict) -> None:
        bls["cls"] = lambda inputs: InferenceResponse(
            error=TritonError("bad x", TritonError.INVALID_ARG)
        )
        with pytest.raises(st.DownstreamError, match="cls: bad x") as info:
            st.Bls().infer("cls", {"x": np.array([1])}, ["y"])
        assert info.value.invalid_arg

    def test_unknown_model_is_an_error(self, bls: dict) -> None:
        with pytest.raises(st.DownstreamError, match="not found"):
            st.Bls().infer("nope", {}, ["y"])

    def test_stream_yields_non_empty_responses(self, bls: dict) -> None:
        bls["llm"] = lambda inputs: [
            InferenceResponse([Tensor("t", np.array([1]))]),
            InferenceResponse([]),
            InferenceResponse([Tensor("t", np.array([2]))]),
        ]
        chunks = [c["t"].tolist() for c in st.Bls().stream("llm", {}, ["t"])]
        assert chunks == [[1], [2]]

    def test_one_response_stream_is_read_once(self, bls: dict) -> None:
        """Regression: 2.51's iterator restarts on iter() once finished; bls_stream must
        read with next() only, or a one-response stream comes out twice."""
        bls["llm"] = lambda inputs: [InferenceResponse([Tensor("t", np.array([7]))])]
        stream = InferenceRequest("llm", [], ["t"]).exec(decoupled=True)
        assert [r for r in stream] and [r for r in stream]  # the hazard, as 2.51 has it
        chunks = [c["t"].tolist() for c in st.Bls().stream("llm", {}, ["t"])]
        assert chunks == [[7]]


def _gauge(metrics: st.BlsMetrics, model: str) -> float:
    return metrics.abandoned.labels(model=model).value


class TestBlsDeadlines:
    """A callee that accepts a request and never answers costs the caller a timeout."""

    def _hung(self, release: threading.Event, responses: list[Any] | None = None) -> Any:
        def handler(inputs: dict) -> Any:
            release.wait(30)
            return responses if responses is not None else InferenceResponse([])

        return handler

    def test_stream_without_a_first_response_times_out_and_frees_the_lock(self, bls: dict) -> None:
        release = threading.Event()
        bls["llm"] = self._hung(release, [])
        bls["cls"] = lambda inputs: InferenceResponse([Tensor("y", np.array([1]))])
        metrics = st.BlsMetrics()
        caller = st.Bls(st.BlsDeadlines(first_response=1.0, next_response=1.0), metrics)
        try:
            with pytest.raises(st.DownstreamTimeout, match="llm: timed out: no first response"):
                list(caller.stream("llm", {}, ["t"], request_id="r-1"))
            assert metrics.timeouts.labels(model="llm", phase="first_response").value == 1
            # the hung call still holds its helper thread, but not the start lock:
            assert _gauge(metrics, "llm") == 1
            assert caller.infer("cls", {}, ["y"])["y"].tolist() == [1]
        finally:
            release.set()
        assert eventually(lambda: _gauge(metrics, "llm") == 0)  # it ended: thread gone

    def test_stream_that_stalls_after_its_first_response_times_out(self, bls: dict) -> None:
        release = threading.Event()

        def stalls(inputs: dict) -> Any:
            yield InferenceResponse([Tensor("t", np.array([1]))])
            release.wait(30)
            yield InferenceResponse([Tensor("t", np.array([2]))])

        bls["llm"] = stalls
        metrics = st.BlsMetrics()
        caller = st.Bls(st.BlsDeadlines(first_response=5, next_response=0.3), metrics)
        chunks = []
        try:
            with pytest.raises(st.DownstreamTimeout, match=r"no next response within 0\.3s"):
                for chunk in caller.stream("llm", {}, ["t"]):
                    chunks.append(chunk["t"].tolist())
        finally:
            release.set()
        assert chunks == [[1]]
        assert metrics.timeouts.labels(model="llm", phase="next_response").value == 1
        assert eventually(lambda: _gauge(metrics, "llm") == 0)

    def test_infer_times_out_and_passes_the_deadline_to_triton(self, bls: dict) -> None:
        release = threading.Event()
        bls["cls"] = self._hung(release)
        SENT_REQUESTS.clear()
        caller = st.Bls(st.BlsDeadlines(first_response=0.25), st.BlsMetrics())
        try:
            with pytest.raises(st.DownstreamTimeout, match="cls: timed out: no answer"):
                caller.infer("cls", {}, ["y"])
        finally:
            release.set()
        # Triton's own per-request timeout, microseconds (it bounds the callee's queue only)
        assert SENT_REQUESTS[-1].timeout == 250_000

    def test_start_lock_wait_is_measured_and_bounded(self, bls: dict) -> None:
        bls["cls"] = lambda inputs: InferenceResponse([Tensor("y", np.array([3]))])
        metrics = st.BlsMetrics()
        caller = st.Bls(st.BlsDeadlines(first_response=0.2), metrics)
        assert st._BLS_START.acquire(timeout=5)  # another call's start, still pending
        try:
            with pytest.raises(st.DownstreamTimeout, match="BLS start lock"):
                caller.infer("cls", {}, ["y"])
        finally:
            st._BLS_START.release()
        assert metrics.timeouts.labels(model="cls", phase="start_lock").value == 1
        assert metrics.lock_wait.labels(model="cls").value > 0  # the wait was observed
        assert st.Bls().infer("cls", {}, ["y"])["y"].tolist() == [3]  # the lock is free

    def test_closing_a_stream_early_does_not_wait_for_the_callee(self, bls: dict) -> None:
        """Dropping 2.51's iterator blocks until the callee's final response; the helper
        thread takes that wait, never the caller."""
        release = threading.Event()

        def endless(inputs: dict) -> Any:
            yield InferenceResponse([Tensor("t", np.array([1]))])
            release.wait(30)

        bls["llm"] = endless
        metrics = st.BlsMetrics()
        stream = st.Bls(st.BlsDeadlines(first_response=5, next_response=5), metrics).stream(
            "llm", {}, ["t"]
        )
        try:
            assert next(stream)["t"].tolist() == [1]
            stream.close()  # returns at once although the callee has not finished
            assert _gauge(metrics, "llm") == 1
        finally:
            release.set()
        assert eventually(lambda: _gauge(metrics, "llm") == 0)

    def test_deadlines_from_params(self) -> None:
        deadlines = st.BlsDeadlines.from_params(
            _params(bls_first_response_timeout_s="60", bls_next_response_timeout_s="0")
        )
        assert deadlines == st.BlsDeadlines(first_response=60.0, next_response=None)
        assert st.BlsDeadlines.from_params(_params()) == st.BlsDeadlines()
        with pytest.raises(ConfigError, match="bls_next_response_timeout_s must be >= 0"):
            st.BlsDeadlines.from_params(_params(bls_next_response_timeout_s="-1"))
