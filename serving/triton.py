"""Adapters between Triton's Python backend and :mod:`serving`.

The only module in the package that imports ``triton_python_backend_utils``; it exists
inside the stub process, and ``tests/conftest.py`` installs a fake for unit tests. Every
``model.py`` uses these helpers so error handling, batching and BLS calls are written once.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
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
#: until its (first) response is in; reading the rest of a stream stays concurrent.
_BLS_START = threading.Lock()


def bls_request(
    model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str], request_id: str = ""
) -> Any:
    return pb_utils.InferenceRequest(
        model_name=model,
        inputs=tensors(inputs),
        requested_output_names=list(outputs),
        request_id=request_id,
    )


def bls_infer(
    model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str]
) -> dict[str, np.ndarray]:
    """Call ``model`` once through BLS and return its outputs; raise on a downstream error."""
    with _BLS_START:
        response = _check(bls_request(model, inputs, outputs).exec(), model)
    return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs}


def bls_stream(
    model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str], request_id: str = ""
) -> Iterator[dict[str, np.ndarray]]:
    """Stream from a decoupled ``model``; yields each non-empty response's outputs.

    Triton 2.51's BLS response iterator has no ``cancel()``: closing this generator early
    does not stop the downstream model, and dropping the iterator blocks until the
    downstream sends its final response. To stop a tensorrt_llm-style model, send it a
    ``stop`` request with the same ``request_id`` (what the router does).
    """
    # next() only: iter() on 2.51's ResponseIterator rewinds it once it is finished, which
    # would replay a stream whose first response was also its last.
    with _BLS_START:
        stream = bls_request(model, inputs, outputs, request_id).exec(decoupled=True)
        response = next(stream, None)
    while response is not None:
        _check(response, model)
        out = {}
        for name in outputs:
            t = pb_utils.get_output_tensor_by_name(response, name)
            if t is not None:
                out[name] = t.as_numpy()
        if out:
            yield out
        response = next(stream, None)


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
