"""Adapters between Triton's Python backend and :mod:`serving`.

The only module in the package that imports ``triton_python_backend_utils``; it exists
inside the stub process, and ``tests/conftest.py`` installs a fake for unit tests. Every
``model.py`` uses these helpers so error handling, batching and BLS calls are written once.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import triton_python_backend_utils as pb_utils

from serving.errors import ConfigError, UnavailableError, ValidationError, tag_message
from serving.params import Params

log = logging.getLogger("serving")

Item = TypeVar("Item")
Result = TypeVar("Result")

#: Triton's wire name for each numpy dtype a request may carry.
_DTYPE_NAMES = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.uint64): "UINT64",
    np.dtype(np.float32): "FP32",
    np.dtype(np.float16): "FP16",
    np.dtype(np.float64): "FP64",
    np.dtype(np.object_): "BYTES",
}


def dtype_name(dtype: np.dtype) -> str:
    return _DTYPE_NAMES.get(np.dtype(dtype), str(dtype))


class ModelSetup:
    """What every model reads once in ``initialize``: its config, parameters and name."""

    def __init__(self, args: dict[str, str]) -> None:
        self.config: dict[str, Any] = json.loads(args["model_config"])
        self.name: str = args.get("model_name", self.config.get("name", "model"))
        self.instance: str = args.get("model_instance_name", self.name)
        self.params = Params(self.config, self.name)
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(self.config)

    def set_torch_threads(self, default: int = 1) -> int:
        """Bound torch's intra-op threads: every stub shares the same cores."""
        threads = self.params.get("torch_threads", int, default=default)
        if threads < 1:
            raise ConfigError(f"{self.name}: torch_threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        return threads

    def output_dtype(self, name: str) -> np.dtype:
        cfg = pb_utils.get_output_config_by_name(self.config, name)
        if cfg is None:
            raise ConfigError(f"{self.name}: config has no output '{name}'")
        return pb_utils.triton_string_to_numpy(cfg["data_type"])


def model_exception(exc: Exception) -> Exception:
    """Turn a load-time error into the exception Triton reports for a failed load."""
    return pb_utils.TritonModelException(str(exc))


def get_input(
    request: Any,
    name: str,
    dtype: np.dtype | type | None = None,
    required: bool = True,
) -> np.ndarray | None:
    """Read one input, checking its dtype; ``None`` for a missing optional input."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        if required:
            raise ValidationError(f"input '{name}' is required")
        return None
    array = tensor.as_numpy()
    if dtype is not None and array.dtype != np.dtype(dtype):
        raise ValidationError(
            f"input '{name}' must be {dtype_name(np.dtype(dtype))}, got {dtype_name(array.dtype)}"
        )
    return array


def get_scalar(request: Any, name: str, dtype: np.dtype | type, default: Any = None) -> Any:
    """Read an optional one-element input as a Python scalar (``default`` when absent)."""
    array = get_input(request, name, dtype, required=default is None)
    if array is None:
        return default
    if array.size != 1:
        raise ValidationError(f"input '{name}' must hold one value, got shape {list(array.shape)}")
    value = array.reshape(-1)[0]
    return value.item() if hasattr(value, "item") else value


def get_optional_scalar(request: Any, name: str, dtype: np.dtype | type) -> Any:
    """Read an optional one-element input that has no default: ``None`` when absent."""
    if pb_utils.get_input_tensor_by_name(request, name) is None:
        return None
    return get_scalar(request, name, dtype)


def error_of(exc: BaseException, model: str) -> Any:
    """The TritonError a client sees: the message for bad input, a short note otherwise.

    Unexpected errors are logged with their traceback here, on the server; the client
    gets only the exception's class and a pointer to the log.
    """
    if isinstance(exc, ValidationError):
        return pb_utils.TritonError(tag_message(exc), pb_utils.TritonError.INVALID_ARG)
    if isinstance(exc, UnavailableError):
        return pb_utils.TritonError(tag_message(exc), pb_utils.TritonError.UNAVAILABLE)
    log.exception("%s: unexpected error while serving a request", model, exc_info=exc)
    return pb_utils.TritonError(
        f"{model}: internal error ({type(exc).__name__}); see the server log",
        pb_utils.TritonError.INTERNAL,
    )


def tensor(name: str, array: np.ndarray) -> Any:
    return pb_utils.Tensor(name, array)


def tensors(arrays: dict[str, np.ndarray]) -> list[Any]:
    """Named arrays as pb_utils tensors (a response's outputs, a BLS request's inputs)."""
    return [pb_utils.Tensor(name, array) for name, array in arrays.items()]


def response_of(outputs: dict[str, np.ndarray]) -> Any:
    """An InferenceResponse carrying ``outputs`` (for decoupled models' senders)."""
    return pb_utils.InferenceResponse(output_tensors=tensors(outputs))


def error_response(exc: BaseException, model: str) -> Any:
    """An InferenceResponse carrying :func:`error_of` ``exc``."""
    return pb_utils.InferenceResponse(error=error_of(exc, model))


def execute_batch(
    requests: Sequence[Any],
    parse: Callable[[Any], Item],
    run: Callable[[list[Item]], Sequence[Result]],
    to_outputs: Callable[[Result], list[Any]],
    model: str,
) -> list[Any]:
    """Parse each request, run the valid ones as one batch, split the results back.

    The single place where a batch is joined and split: a request that fails to parse
    gets its own INVALID_ARG response and the rest of the batch still runs, and the
    returned list always has one response per request, in order.
    """
    responses: list[Any] = [None] * len(requests)
    items: list[Item] = []
    slots: list[int] = []
    for i, request in enumerate(requests):
        try:
            items.append(parse(request))
            slots.append(i)
        except Exception as exc:  # isolated per request, reported to its client
            responses[i] = pb_utils.InferenceResponse(error=error_of(exc, model))
    if items:
        try:
            results = run(items)
            if len(results) != len(items):
                raise RuntimeError(f"batch returned {len(results)} results for {len(items)}")
            for slot, result in zip(slots, results, strict=True):
                responses[slot] = pb_utils.InferenceResponse(output_tensors=to_outputs(result))
        except Exception as exc:
            err = error_of(exc, model)
            for slot in slots:
                responses[slot] = pb_utils.InferenceResponse(error=err)
    return responses


def run_rows(
    fn: Callable[[list[Any]], dict[str, np.ndarray]], items: Sequence[Sequence[Any]]
) -> list[dict[str, np.ndarray]]:
    """Run ``fn`` once over the rows of every request and split its outputs back.

    For :func:`execute_batch`'s ``run`` when a request may hold several rows (shape
    [n, ...]): ``fn`` maps all rows to output arrays with one row each, in order.
    """
    counts = [len(item) for item in items]
    outputs = fn([row for item in items for row in item])
    bounds = np.cumsum(counts)[:-1]
    parts = {name: np.split(array, bounds) for name, array in outputs.items()}
    return [{name: split[i] for name, split in parts.items()} for i in range(len(items))]


class DownstreamError(RuntimeError):
    """A model called through BLS answered with an error."""

    def __init__(self, model: str, message: str, invalid_arg: bool) -> None:
        super().__init__(f"{model}: {message}")
        self.model = model
        self.invalid_arg = invalid_arg


def _check(response: Any, model: str) -> Any:
    if response.has_error():
        err = response.error()
        code = err.code() if hasattr(err, "code") else None
        invalid = code == pb_utils.TritonError.INVALID_ARG
        raise DownstreamError(model, err.message(), invalid)
    return response


#: Triton 2.51's python backend crashes the whole server (SIGSEGV, std::bad_alloc or
#: boost::interprocess::lock_exception in libtriton_python.so) when threads of one stub
#: make BLS calls at the same time: reproduced within a second by 8 concurrent router
#: streams (upstream: triton-inference-server/server#8882). Each call holds this lock
#: until its (first) response is in, or until its caller stops waiting for it
#: (:class:`Bls`); reading the rest of a stream stays concurrent.
_BLS_START = threading.Lock()

#: Lock-wait buckets, microseconds (Triton's own latency metrics are in us).
LOCK_WAIT_BUCKETS_US = (10.0, 100.0, 1e3, 5e3, 2e4, 1e5, 5e5, 2e6, 1e7)


class DownstreamTimeout(UnavailableError):
    """A BLS call got no (next) response within its deadline: UNAVAILABLE to the client."""

    def __init__(self, model: str, what: str, seconds: float) -> None:
        super().__init__(f"{model}: timed out: {what} within {seconds:g}s")
        self.model = model


@dataclass(frozen=True)
class BlsDeadlines:
    """How long one BLS call may wait, in seconds; ``None`` waits forever (2.51's way).

    ``first_response`` runs from asking for the start lock to the first response (the
    whole answer of a non-decoupled call); ``next_response`` between two responses of a
    stream.
    """

    first_response: float | None = None
    next_response: float | None = None

    @classmethod
    def from_params(cls, params: Params) -> BlsDeadlines:
        """``bls_first_response_timeout_s`` / ``bls_next_response_timeout_s``; 0 or empty: none."""

        def seconds(name: str) -> float | None:
            value = params.get(name, float, default=0.0)
            if value < 0:
                raise ConfigError(f"{name} must be >= 0 seconds (0: no deadline), got {value}")
            return value or None

        return cls(seconds("bls_first_response_timeout_s"), seconds("bls_next_response_timeout_s"))


class BlsMetrics:
    """What BLS calls wait for, on Triton's metrics port (label ``model``: the callee)."""

    def __init__(self) -> None:
        self.lock_wait = LabelledMetric(
            "bls_start_lock_wait_us",
            "Time a BLS call waited for its stub's BLS start lock, in microseconds",
            "histogram",
            buckets=LOCK_WAIT_BUCKETS_US,
        )
        self.timeouts = LabelledMetric(
            "bls_timeouts_total",
            "BLS calls that hit a deadline, by callee and phase (start_lock, first_response, "
            "next_response)",
            "counter",
        )
        self.abandoned = LabelledMetric(
            "bls_abandoned_calls",
            "BLS calls whose caller gave up (deadline, early close) that still wait for the "
            "callee: each holds one thread of this stub until the callee answers or ends",
            "gauge",
        )


_END = object()


class _Call:
    """One BLS call run on its own thread, so its caller can stop waiting for it.

    A blocking ``exec()`` or ``next()`` on 2.51's response iterator cannot be
    interrupted, and dropping the iterator blocks until the callee's final response; so
    the thread that blocks is this helper, never the caller. Responses go through a
    queue; once the caller gives up, they are dropped as they arrive.
    """

    def __init__(
        self,
        model: str,
        request: Any,
        decoupled: bool,
        metrics: BlsMetrics | None,
        first_timeout: float | None,
    ) -> None:
        self.model = model
        #: What is left of the first-response deadline once the start lock was taken.
        self.first_timeout = first_timeout
        self._request = request
        self._decoupled = decoupled
        self._metrics = metrics
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._state = threading.Lock()
        self._start_held = True  # the caller acquired _BLS_START for this call
        self._done = False
        self._abandoned = False

    def start(self) -> None:
        threading.Thread(target=self._run, name=f"bls-{self.model}", daemon=True).start()

    def release_start(self) -> None:
        """Give the start lock back, once, whoever comes first (this thread or the caller)."""
        with self._state:
            held, self._start_held = self._start_held, False
        if held:
            _BLS_START.release()

    def _run(self) -> None:
        try:
            if self._decoupled:
                stream = self._request.exec(decoupled=True)
                # next() only: iter() on 2.51's ResponseIterator rewinds it once it is
                # finished, which would replay a stream whose first response was its last.
                response = next(stream, None)
            else:
                stream, response = None, self._request.exec()
            self.release_start()
            while response is not None:
                self._put(response)
                response = next(stream, None) if stream is not None else None
            self._put(_END)
        except BaseException as exc:  # handed to the caller, who decides
            self.release_start()
            self._put(exc)
        finally:
            self._finish()

    def _put(self, item: Any) -> None:
        with self._state:
            if not self._abandoned:
                self._queue.put(item)

    def _finish(self) -> None:
        with self._state:
            self._done = True
            counted = self._abandoned
        if counted and self._metrics is not None:
            self._metrics.abandoned.labels(model=self.model).increment(-1)

    def abandon(self) -> None:
        """The caller stops reading; the thread (if still waiting) drops what comes."""
        self.release_start()
        with self._state:
            if self._abandoned:
                return
            self._abandoned = True
            waiting = not self._done
        if waiting and self._metrics is not None:
            self._metrics.abandoned.labels(model=self.model).increment(1)

    def get(self, timeout: float | None, what: str, phase: str, limit: float | None) -> Any:
        """The next response, :data:`_END`, or raise (the call's error, or a timeout).

        ``timeout`` is what is left to wait; ``limit`` the deadline the error names.
        """
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            self.abandon()
            if self._metrics is not None:
                self._metrics.timeouts.labels(model=self.model, phase=phase).increment(1)
            raise DownstreamTimeout(self.model, what, limit or 0.0) from None
        if isinstance(item, BaseException):
            raise item
        return item


class Bls:
    """Calls other models through BLS with deadlines; one per calling model.

    Every call carries ``deadlines``: a callee that accepts a request and never answers
    costs the caller a :class:`DownstreamTimeout`, not a worker forever. What it still
    costs is the helper thread of that call (:class:`_Call`), blocked until the callee
    answers or ends (``bls_abandoned_calls`` counts them), and, when it never sent its
    first response, one thread of the Python backend's BLS pool in the server (32 per
    instance by default). Stopping the callee (tensorrt_llm's ``stop`` with the same
    request id) is the caller's part, and ends both. After a start times out, its start
    lock is given back while the hung call is still pending: a late first response can
    then overlap another call's start, the pattern the lock exists to avoid (rare, and a
    lost stub is what the launcher's supervisor reloads).

    The deadline is also passed as the request's Triton ``timeout``. In 2.51 that bounds
    only the time the request waits in the callee's scheduler queue, and only when the
    callee's ``default_queue_policy`` has ``allow_timeout_override`` and a larger
    ``default_timeout_microseconds`` (Triton core's PolicyQueue); it never bounds
    execution, hence the helper thread.
    """

    def __init__(
        self, deadlines: BlsDeadlines | None = None, metrics: BlsMetrics | None = None
    ) -> None:
        self.deadlines = deadlines or BlsDeadlines()
        self.metrics = metrics

    def request(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        outputs: Sequence[str],
        request_id: str = "",
    ) -> Any:
        first = self.deadlines.first_response
        return pb_utils.InferenceRequest(
            model_name=model,
            inputs=tensors(inputs),
            requested_output_names=list(outputs),
            request_id=request_id,
            timeout=int(first * 1e6) if first else 0,
        )

    def _start(self, model: str, request: Any, decoupled: bool) -> _Call:
        """Take the start lock (the wait is measured) and start the call's thread."""
        limit = self.deadlines.first_response
        started = time.perf_counter()
        acquired = _BLS_START.acquire(timeout=-1 if limit is None else limit)
        waited = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.lock_wait.labels(model=model).observe(waited * 1e6)
        if not acquired:
            if self.metrics is not None:
                self.metrics.timeouts.labels(model=model, phase="start_lock").increment(1)
            raise DownstreamTimeout(model, "no turn at this stub's BLS start lock", limit or 0.0)
        left = None if limit is None else max(0.0, limit - waited)
        call = _Call(model, request, decoupled, self.metrics, left)
        try:
            call.start()
        except BaseException:
            call.release_start()
            raise
        return call

    def infer(
        self, model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """Call ``model`` once and return its outputs; raise on an error or a timeout."""
        call = self._start(model, self.request(model, inputs, outputs), decoupled=False)
        first = call.get(
            call.first_timeout, "no answer", "first_response", self.deadlines.first_response
        )
        response = _check(first, model)
        return {
            name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs
        }

    def stream(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        outputs: Sequence[str],
        request_id: str = "",
    ) -> Iterator[dict[str, np.ndarray]]:
        """Stream from a decoupled ``model``; yields each non-empty response's outputs.

        Triton 2.51's BLS response iterator has no ``cancel()``: closing this generator
        early stops reading (the helper thread drops the rest) but not the callee. To stop
        a tensorrt_llm-style model, send it a ``stop`` request with the same
        ``request_id`` (what the router does).
        """
        request = self.request(model, inputs, outputs, request_id)
        call = self._start(model, request, decoupled=True)
        item = None
        try:
            item = call.get(
                call.first_timeout,
                "no first response",
                "first_response",
                self.deadlines.first_response,
            )
            while item is not _END:
                _check(item, model)
                out = {}
                for name in outputs:
                    t = pb_utils.get_output_tensor_by_name(item, name)
                    if t is not None:
                        out[name] = t.as_numpy()
                if out:
                    yield out
                limit = self.deadlines.next_response
                item = call.get(limit, "no next response", "next_response", limit)
        finally:
            if item is not _END:  # closed early, failed or timed out: stop reading
                call.abandon()


def final_flag() -> int:
    return pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def string_array(values: Sequence[str], shape: tuple[int, ...] | None = None) -> np.ndarray:
    arr = np.array([v.encode("utf-8") for v in values], dtype=np.object_)
    return arr.reshape(shape) if shape is not None else arr


#: pb_utils.MetricFamily kinds by name, so callers need not touch pb_utils.
_METRIC_KINDS = {"counter": "COUNTER", "gauge": "GAUGE", "histogram": "HISTOGRAM"}


class LabelledMetric:
    """One custom metric family with a metric per label set, created on first use.

    Creating a metric is an IPC round trip to the server, so each label set is created
    once and cached; the lock makes that safe from a decoupled model's worker threads.
    The metrics appear on Triton's metrics port next to ``nv_inference_*``.
    """

    def __init__(
        self, name: str, description: str, kind: str, buckets: Sequence[float] | None = None
    ) -> None:
        if kind not in _METRIC_KINDS:
            raise ConfigError(f"metric {name}: kind must be one of {sorted(_METRIC_KINDS)}")
        if (kind == "histogram") != (buckets is not None):
            raise ConfigError(f"metric {name}: buckets go with (and only with) a histogram")
        family_kind = getattr(pb_utils.MetricFamily, _METRIC_KINDS[kind])
        self._family = pb_utils.MetricFamily(name=name, description=description, kind=family_kind)
        self._buckets = list(buckets) if buckets is not None else None
        self._metrics: dict[tuple[tuple[str, str], ...], Any] = {}
        self._lock = threading.Lock()

    def labels(self, **labels: str) -> Any:
        """The metric for these label values (``increment``, ``set`` or ``observe`` it)."""
        key = tuple(sorted(labels.items()))
        with self._lock:
            metric = self._metrics.get(key)
            if metric is None:
                extra = {"buckets": self._buckets} if self._buckets is not None else {}
                metric = self._family.Metric(labels=dict(key), **extra)
                self._metrics[key] = metric
            return metric
