"""The ``router`` model's work: classify a prompt, pick a tier, stream the tier's answer.

Why the router tokenizes and streams ``llm_<tier>`` itself instead of calling the tier's
``llm_<tier>_text`` ensemble:

- text: the router keeps one incremental detokenizer per request, so spaces and
  multi-byte characters split across tokens come out right by construction (a stateless
  postprocessing step sees one token at a time and has to guess);
- cancellation: Triton 2.51's BLS response iterator cannot cancel, so the router stops a
  tier the tensorrt_llm way, with a ``stop`` request carrying the same request id, which
  needs the tier's own request, not an ensemble's;
- counts and fallbacks: the router sees the token ids (``num_input_tokens``,
  ``num_output_tokens``) and knows exactly whether a tier failed before its first token;
- one hop fewer per token than the ensemble (no postprocessing model per response).

Preprocessing (chat template, token ids, default and limit checks) runs once per request,
whatever tier serves it: every tier shares the tokenizer (SmolLM2 on CPU; the Llama 3.1
tokenizer for 8B, 70B and 405B on H100). It is :class:`serving.llm.service.Preprocessor`,
the code of the ``preprocessing`` model, run in the router's own process after the
classifier call. A BLS call to ``preprocessing`` cost a hop and, because BLS starts are
serialized per stub (``serving.triton``), waited for the classifier's answer anyway.
Tokenizing on a side thread during the classifier call was measured slower than doing
it after: the Python work of one thread delays the other's BLS call through the GIL.

Each request is served on a worker thread so a decoupled ``execute`` returns at once and
many streams proceed together; every request ends with the final flag, whatever happens.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from serving.errors import (
    ConfigError,
    ErrorKind,
    OverloadedError,
    UnavailableError,
    ValidationError,
    kind_of,
)
from serving.routing import Decision, RoutingPolicy
from serving.text import decode_utf8, new_token_ids
from serving.triton import (
    Bls,
    BlsDeadlines,
    BlsMetrics,
    DownstreamError,
    DownstreamTimeout,
    LabelledMetric,
    error_response,
    final_flag,
    get_optional_scalar,
    get_scalar,
    response_of,
    string_array,
)

if TYPE_CHECKING:  # the router model builds it; importing it here would load torch
    from serving.llm.service import Preprocessor

log = logging.getLogger("serving.router")

#: Tensor names of the contracts in DESIGN.md (checked against the configs by unit tests).
CLASSIFIER_INPUT, CLASSIFIER_OUTPUTS = "text", ("intent", "confidence")
#: Preprocessor output -> tier input, exactly as the llm_<tier>_text ensembles map them.
PRE_TO_TIER = {
    "input_ids": "input_ids",
    "input_lengths": "input_lengths",
    "request_output_len": "request_output_len",
    "end_id": "end_id",
    "pad_id": "pad_id",
    "sampling_temperature": "temperature",
    "streaming": "streaming",
}
TIER_OUTPUTS = ("output_ids", "sequence_length")
OUTPUTS = ("text_output", "intent", "model", "confidence", "num_input_tokens", "num_output_tokens")

#: Classifier latency buckets, microseconds (Triton's own latency metrics are in us).
CLASSIFIER_BUCKETS_US = (1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2.5e5, 1e6)


class Detokenizer(Protocol):
    """Turns a growing stream of token ids into text, never splitting a character."""

    def push(self, ids: Sequence[int]) -> str:
        """Text made final by these new ids (may be empty while a character is incomplete)."""
        ...

    def flush(self) -> str:
        """Whatever text is still held back, at the end of the stream."""
        ...


@dataclass
class RouterRequest:
    """One client request to ``router``, decoded from its tensors."""

    text: str
    max_tokens: int | None = None
    temperature: float | None = None
    stream: bool = False
    intent: str | None = None
    model: str | None = None

    def validate(self, policy: RoutingPolicy) -> None:
        """Reject what no tier could serve, with a message that says what to fix."""
        if not self.text.strip():
            raise ValidationError("'text_input' is empty or whitespace only; send a prompt")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValidationError(f"'max_tokens' must be at least 1, got {self.max_tokens}")
        if self.temperature is not None and not (
            math.isfinite(self.temperature) and self.temperature >= 0
        ):
            raise ValidationError(f"'temperature' must be >= 0, got {self.temperature}")
        if self.intent is not None:
            policy.check_intent(self.intent)
        if self.model is not None:
            policy.check_tier(self.model)


def _override(request: Any, name: str) -> str | None:
    """A string override; empty means unset (the convention of the config parameters)."""
    value = get_optional_scalar(request, name, np.object_)
    if value is None:
        return None
    text = decode_utf8(value, name).strip()
    return text or None


def parse_request(request: Any) -> RouterRequest:
    """Decode a Triton request into a :class:`RouterRequest` (dtype and UTF-8 checked)."""
    max_tokens = get_optional_scalar(request, "max_tokens", np.int32)
    temperature = get_optional_scalar(request, "temperature", np.float32)
    stream = get_optional_scalar(request, "stream", np.bool_)
    return RouterRequest(
        text=decode_utf8(get_scalar(request, "text_input", np.object_), "text_input"),
        max_tokens=None if max_tokens is None else int(max_tokens),
        temperature=None if temperature is None else float(temperature),
        stream=bool(stream) if stream is not None else False,
        intent=_override(request, "intent"),
        model=_override(request, "model"),
    )


class RouterMetrics:
    """The router's custom metrics, exported on Triton's metrics port."""

    def __init__(self) -> None:
        self.requests = LabelledMetric(
            "router_requests_total",
            "Requests the router served, by intent, the tier that served them and why "
            "that tier (table, low_confidence, intent_override, model_override)",
            "counter",
        )
        self.fallbacks = LabelledMetric(
            "router_fallbacks_total",
            "Times a tier was unavailable or failed before its first token and the router "
            "moved on, by the failed tier and the next one tried",
            "counter",
        )
        self.cancellations = LabelledMetric(
            "router_cancellations_total",
            "Streams the client cancelled, by the tier the router then asked to stop",
            "counter",
        )
        self.classifier_latency = LabelledMetric(
            "router_classifier_latency_us",
            "Latency of the intent_classifier call made by the router, in microseconds",
            "histogram",
            buckets=CLASSIFIER_BUCKETS_US,
        )
        self.bls = BlsMetrics()


@dataclass(frozen=True)
class RouterModels:
    """Downstream model names, from the router's config parameters."""

    classifier: str


class _Served:
    """What the client sees from one request: the decision and the counts so far."""

    def __init__(
        self, decision: Decision, tier: str, num_input_tokens: int, shape: tuple[int, ...]
    ) -> None:
        self.decision = decision
        self.tier = tier
        self.num_input_tokens = num_input_tokens
        self.num_output_tokens = 0
        self.shape = shape

    def outputs(self, text: str) -> dict[str, np.ndarray]:
        shape = self.shape
        return {
            "text_output": string_array([text], shape),
            "intent": string_array([self.decision.intent], shape),
            "model": string_array([self.tier], shape),
            "confidence": np.full(shape, self.decision.confidence, dtype=np.float32),
            "num_input_tokens": np.full(shape, self.num_input_tokens, dtype=np.int32),
            "num_output_tokens": np.full(shape, self.num_output_tokens, dtype=np.int32),
        }


class Router:
    """Serves ``router`` requests; the model.py adapter only constructs it and submits."""

    def __init__(
        self,
        name: str,
        policy: RoutingPolicy,
        models: RouterModels,
        detokenizer: Callable[[], Detokenizer],
        preprocessor: Preprocessor,
        workers: int,
        batched: bool,
        metrics: RouterMetrics | None = None,
        max_queue: int = 64,
        deadlines: BlsDeadlines | None = None,
    ) -> None:
        """``workers`` streams run at once; at most ``max_queue`` more wait for a worker.

        The bound matters because a decoupled ``execute`` returns at once: Triton's own
        queue limits never see the router's backlog, so without it overload would turn
        into latency without bound instead of a fast UNAVAILABLE ("overloaded: …").
        ``deadlines`` bound every downstream call (:class:`serving.triton.Bls`).
        """
        if max_queue < 0:
            raise ConfigError(f"{name}: max_queue_size must be >= 0, got {max_queue}")
        self.name = name
        self._capacity = workers + max_queue
        self._admitted = 0
        self._admit_lock = threading.Lock()
        self.policy = policy
        self.models = models
        self._detokenizer = detokenizer
        self._preprocessor = preprocessor
        self.metrics = metrics
        # Inputs and outputs carry a batch dimension when the models are batched.
        self._shape = (1, 1) if batched else (1,)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._bls = Bls(deadlines, metrics.bls if metrics is not None else None)
        self._stoppers: set[threading.Thread] = set()
        self._stoppers_lock = threading.Lock()

    def submit(self, requests: Sequence[Any]) -> None:
        """Parse each request now, then stream it on a worker; ``execute`` returns at once.

        The pattern of the python backend's decoupled examples: everything is read from
        the request inside ``execute``, and the worker holds only plain values and the
        response sender (valid until the final flag, and the way to see a cancellation),
        never the request object itself.
        """
        for request in requests:
            accepted = self.accept(request)
            if accepted is None:
                continue
            with self._admit_lock:
                full = self._admitted >= self._capacity
                if not full:
                    self._admitted += 1
            if full:
                busy = OverloadedError(
                    f"{self._capacity} router requests are already running or queued "
                    "(max_concurrent_requests + max_queue_size); retry later or elsewhere"
                )
                accepted[1].send(error_response(busy, self.name), flags=final_flag())
                continue
            self._pool.submit(self._serve_admitted, *accepted)

    def _serve_admitted(self, parsed: RouterRequest, sender: Any) -> None:
        try:
            self.serve(parsed, sender)
        finally:
            with self._admit_lock:
                self._admitted -= 1

    def accept(self, request: Any) -> tuple[RouterRequest, Any] | None:
        """The parsed request and its sender, or ``None`` once a bad one got its error."""
        sender = request.get_response_sender()
        try:
            parsed = parse_request(request)
            parsed.validate(self.policy)
        except Exception as exc:  # isolated per request, reported to its client
            sender.send(error_response(exc, self.name), flags=final_flag())
            return None
        return parsed, sender

    def close(self) -> None:
        """Let in-flight streams finish (each still gets its final flag), then stop.

        Stops still being sent to timed-out tiers get one first-response deadline more.
        """
        self._pool.shutdown(wait=True)
        with self._stoppers_lock:
            stoppers = list(self._stoppers)
        for thread in stoppers:
            thread.join(self._bls.deadlines.first_response)

    # -- one request ---------------------------------------------------------------

    def serve(self, parsed: RouterRequest, sender: Any) -> None:
        """Serve one parsed request to completion; never raises, always sends the final flag."""
        try:
            if sender.is_cancelled():  # cancelled while it waited for a worker
                sender.send(flags=final_flag())
                return
            self._route_and_stream(sender, parsed)
        except Exception as exc:  # isolated per request, reported to its client
            try:
                sender.send(error_response(exc, self.name), flags=final_flag())
            except Exception:  # the final flag already went out: only the log can tell
                log.exception("%s: error after the response was complete", self.name)

    def classify(self, text: str) -> tuple[str, float]:
        """Ask the intent classifier; its latency goes to the metrics."""
        start = time.perf_counter()
        out = self._bls.infer(
            self.models.classifier,
            {CLASSIFIER_INPUT: string_array([text], self._shape)},
            CLASSIFIER_OUTPUTS,
        )
        if self.metrics is not None:
            elapsed_us = (time.perf_counter() - start) * 1e6
            self.metrics.classifier_latency.labels(model=self.models.classifier).observe(elapsed_us)
        intent = decode_utf8(out["intent"].reshape(-1)[0], "intent")
        return intent, float(out["confidence"].reshape(-1)[0])

    def decide(self, parsed: RouterRequest) -> Decision:
        if parsed.intent is not None:
            return self.policy.decide(
                parsed.intent, 1.0, intent_forced=True, forced_tier=parsed.model
            )
        try:
            intent, confidence = self.classify(parsed.text)
        except DownstreamError as exc:
            blame = _blame(exc)
            if isinstance(blame, ValidationError | OverloadedError):
                raise blame from exc  # the client's input, or a full queue: theirs to see
            return self._unclassified(parsed, exc)
        except Exception as exc:  # timed out, or the call could not be made
            return self._unclassified(parsed, exc)
        return self.policy.decide(intent, confidence, forced_tier=parsed.model)

    def _unclassified(self, parsed: RouterRequest, exc: Exception) -> Decision:
        """The classifier failed: route as for low confidence instead of failing."""
        log.warning("%s: classifier failed, routing as low confidence: %s", self.name, exc)
        return self.policy.unclassified(forced_tier=parsed.model)

    def preprocess(self, parsed: RouterRequest) -> dict[str, np.ndarray]:
        """The tier's inputs: token ids (chat template applied) and resolved options.

        The same :class:`Preprocessor` and parameters as the ``preprocessing`` model, so
        routed and direct requests get the same default ``max_tokens`` and context check;
        a rejection is the client's ValidationError.
        """
        pre = self._preprocessor
        out = pre(pre.request(parsed.text, parsed.max_tokens, parsed.temperature, stream=True))
        return {tier_name: out[name] for name, tier_name in PRE_TO_TIER.items()}

    def _open(
        self, decision: Decision, inputs: dict[str, np.ndarray], request_id: str
    ) -> tuple[str, str, list[dict[str, np.ndarray]], Iterator[dict[str, np.ndarray]]]:
        """Open the first candidate tier that produces a first response.

        Returns the tier, the request id it was given, its first response(s) and the
        rest of its stream.

        A tier that is not loaded, fails or is full before its first token, or sends no
        first response within the deadline (it is then asked to stop), is skipped for the
        next candidate (counted in the fallback metric). A rejection of the input itself
        (INVALID_ARG, e.g. a prompt over the context limit) is not the tier's fault and
        goes straight back to the client. When every candidate was full, the client gets
        "overloaded" (the gateway's 429), else UNAVAILABLE.
        """
        errors = []
        kinds = set()
        for i, tier in enumerate(decision.candidates):
            tier_request_id = f"{request_id}-{i}"
            stream = self._bls.stream(tier, inputs, TIER_OUTPUTS, request_id=tier_request_id)
            try:
                first = [next(stream)]
            except StopIteration:
                first = []
            except DownstreamTimeout as exc:
                self._stop_later(tier, tier_request_id, inputs)
                errors.append(str(exc))
                kinds.add(ErrorKind.UNAVAILABLE)
                self._count_fallback(decision, i)
                continue
            except DownstreamError as exc:
                blame = _blame(exc)
                if isinstance(blame, ValidationError):
                    raise blame from exc
                errors.append(str(exc))
                kinds.add(kind_of(str(blame)))
                self._count_fallback(decision, i)
                continue
            except Exception as exc:  # exec itself raised: the tier could not run
                errors.append(f"{tier}: {exc}")
                kinds.add(ErrorKind.UNAVAILABLE)
                self._count_fallback(decision, i)
                continue
            return tier, tier_request_id, first, stream
        error = OverloadedError if kinds == {ErrorKind.OVERLOADED} else UnavailableError
        raise error(
            f"no tier could serve this request (tried {', '.join(decision.candidates)}): "
            + "; ".join(errors)
        )

    def _count_fallback(self, decision: Decision, i: int) -> None:
        failed = decision.candidates[i]
        nxt = decision.candidates[i + 1] if i + 1 < len(decision.candidates) else "none"
        log.warning("%s: tier %s failed before its first token; next: %s", self.name, failed, nxt)
        if self.metrics is not None:
            self.metrics.fallbacks.labels(from_tier=failed, to_tier=nxt).increment(1)

    def _stop(self, tier: str, request_id: str, like: dict[str, np.ndarray]) -> None:
        """Ask ``tier`` to stop generating for ``request_id`` (tensorrt_llm's ``stop``)."""
        inputs = {
            "input_ids": np.zeros_like(like["input_ids"][..., :1]),
            "input_lengths": np.ones_like(like["input_lengths"]),
            "request_output_len": np.ones_like(like["request_output_len"]),
            "stop": np.full(self._shape, True, dtype=np.bool_),
            "streaming": like["streaming"],
        }
        try:
            for _ in self._bls.stream(tier, inputs, TIER_OUTPUTS, request_id=request_id):
                pass
        except Exception as exc:  # best effort: the stream still ends at max_tokens
            log.warning("%s: could not stop %s request %s: %s", self.name, tier, request_id, exc)

    def _stop_later(self, tier: str, request_id: str, like: dict[str, np.ndarray]) -> None:
        """:meth:`_stop` on its own thread: a tier that timed out may not answer that either,
        and the request moves on (fallback or error) without waiting for it."""

        def run() -> None:
            try:
                self._stop(tier, request_id, like)
            finally:
                with self._stoppers_lock:
                    self._stoppers.discard(thread)

        thread = threading.Thread(target=run, name=f"{self.name}-stop", daemon=True)
        with self._stoppers_lock:
            self._stoppers.add(thread)
        thread.start()

    def _route_and_stream(self, sender: Any, parsed: RouterRequest) -> None:
        decision = self.decide(parsed)
        inputs = self.preprocess(parsed)
        num_input_tokens = int(inputs["input_lengths"].reshape(-1)[0])
        request_id = f"{self.name}-{uuid.uuid4().hex}"
        tier, tier_request_id, first, stream = self._open(decision, inputs, request_id)
        served = _Served(decision, tier, num_input_tokens, self._shape)
        if self.metrics is not None:
            self.metrics.requests.labels(
                intent=decision.intent, tier=tier, reason=decision.reason.value
            ).increment(1)

        detok = self._detokenizer()
        pieces: list[str] = []
        try:
            for out in itertools.chain(first, stream):
                if sender.is_cancelled():
                    self._stop(tier, tier_request_id, inputs)
                    if self.metrics is not None:
                        self.metrics.cancellations.labels(tier=tier).increment(1)
                    sender.send(flags=final_flag())
                    return
                new_ids = new_token_ids(out)
                served.num_output_tokens += len(new_ids)
                text = detok.push(new_ids)
                if parsed.stream:
                    if text:
                        sender.send(response_of(served.outputs(text)))
                else:
                    pieces.append(text)
        except DownstreamTimeout:
            self._stop_later(tier, tier_request_id, inputs)  # it stalled mid-stream
            raise
        finally:
            stream.close()  # stops reading; the tier's leftovers are dropped off this thread
        tail = detok.flush()
        if parsed.stream:
            sender.send(response_of(served.outputs(tail)), flags=final_flag())
        else:
            pieces.append(tail)
            sender.send(response_of(served.outputs("".join(pieces))), flags=final_flag())


def _blame(exc: DownstreamError) -> Exception:
    """The error to give the client for a downstream failure.

    Triton 2.51 drops the code of a BLS response's error (everything arrives as
    INTERNAL), so the project's models mark their client faults in the message
    (:data:`serving.errors.INVALID_INPUT`), and TensorRT-LLM's own texts are in
    :data:`serving.errors.FOREIGN_MESSAGES`. Only client faults are the client's; a full
    queue is "overloaded"; every other downstream error, anticipated or not, is the
    model's, so the fallback runs.
    """
    message = str(exc)
    kind = ErrorKind.INVALID_INPUT if exc.invalid_arg else kind_of(message)
    if kind is ErrorKind.INVALID_INPUT:
        return ValidationError(message)
    if kind is ErrorKind.OVERLOADED:
        return OverloadedError(message)
    return UnavailableError(message)
