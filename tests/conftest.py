"""The one fake ``triton_python_backend_utils`` for unit tests.

It is installed into ``sys.modules`` before any test imports ``serving.triton`` or a
``model.py``, and mimics the parts of the real module (Triton 2.51) the project uses:
tensors, requests with response senders and cancellation, responses with errors, BLS
requests whose results a test scripts, loggers and metrics.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import sys
import time
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

_TRITON_TO_NUMPY = {
    "TYPE_BOOL": np.bool_,
    "TYPE_UINT8": np.uint8,
    "TYPE_UINT64": np.uint64,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
}


class TritonError(Exception):
    (
        UNKNOWN,
        INTERNAL,
        NOT_FOUND,
        INVALID_ARG,
        UNAVAILABLE,
        UNSUPPORTED,
        ALREADY_EXISTS,
        CANCELLED,
    ) = range(8)

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


class TritonModelException(Exception):
    pass


class Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class InferenceResponse:
    def __init__(
        self, output_tensors: list[Tensor] | None = None, error: TritonError | None = None
    ) -> None:
        self._outputs = list(output_tensors or [])
        self._error = error

    def output_tensors(self) -> list[Tensor]:
        return self._outputs

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


class ResponseSender:
    def __init__(self) -> None:
        self.sent: list[tuple[InferenceResponse | None, int]] = []
        self.cancelled = False

    def is_cancelled(self) -> bool:
        return self.cancelled

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        if self.sent and self.sent[-1][1] & TRITONSERVER_RESPONSE_COMPLETE_FINAL:
            raise RuntimeError("response sent after the final flag")
        self.sent.append((response, flags))

    @property
    def closed(self) -> bool:
        return bool(self.sent) and bool(self.sent[-1][1] & TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def responses(self) -> list[InferenceResponse]:
        return [r for r, _ in self.sent if r is not None]


class FakeRequest:
    """A request as a model's ``execute`` sees it."""

    def __init__(self, inputs: dict[str, Any], cancelled: bool = False) -> None:
        self._inputs = {k: Tensor(k, np.asarray(v)) for k, v in inputs.items()}
        self.sender = ResponseSender()
        self.cancelled = cancelled

    def inputs(self) -> list[Tensor]:
        return list(self._inputs.values())

    def get_response_sender(self) -> ResponseSender:
        return self.sender

    def is_cancelled(self) -> bool:
        return self.cancelled

    def request_id(self) -> str:
        return ""


#: BLS handlers tests install: model name -> callable(inputs dict[, request]) -> a response,
#: a list of them, or a generator of them (a stream whose responses come as it yields).
BLS_HANDLERS: dict[str, Callable[[dict[str, np.ndarray]], Any]] = {}


#: Every BLS request the code under test built, in order (tests read model names and ids).
SENT_REQUESTS: list[Any] = []


class InferenceRequest:
    def __init__(
        self,
        model_name: str,
        inputs: list[Tensor],
        requested_output_names: list[str],
        **kwargs: Any,
    ) -> None:
        self.model_name = model_name
        self.inputs = {t.name(): t.as_numpy() for t in inputs}
        self.requested_output_names = requested_output_names
        self.request_id = kwargs.get("request_id", "")
        #: Triton's per-request timeout, microseconds (0: none), as the real one takes it.
        self.timeout = kwargs.get("timeout", 0)
        SENT_REQUESTS.append(self)

    def exec(self, decoupled: bool = False) -> Any:
        handler = BLS_HANDLERS.get(self.model_name)
        if handler is None:
            err = TritonError(
                f"Request for unknown model: '{self.model_name}' is not found",
                TritonError.NOT_FOUND,
            )
            result: Any = InferenceResponse(error=err)
        elif len(inspect.signature(handler).parameters) == 2:
            result = handler(self.inputs, self)  # a handler that reads the request id
        else:
            result = handler(self.inputs)
        if decoupled:
            lazy = isinstance(result, list | types.GeneratorType)
            return ResponseIterator(result if lazy else [result])
        return result[0] if isinstance(result, list) else result


class ResponseIterator:
    """Triton 2.51's BLS ``ResponseIterator``, faithfully: ``iter()`` on one that has
    finished starts it over (so ``for r in stream`` after a ``next`` replays a stream whose
    first response was also its last). ``serving.triton.Bls.stream`` must use ``next`` only.

    A handler may return a generator instead of a list: its responses then arrive as
    it yields them, so a test can script a tier that stalls in the middle of a stream.
    """

    def __init__(self, responses: Iterable[Any]) -> None:
        self._source = iter(responses)
        self._seen: list[Any] = []
        self._finished = False
        self._index = 0

    def __iter__(self) -> ResponseIterator:
        if self._finished and self._index >= len(self._seen):
            self._index = 0
        return self

    def __next__(self) -> Any:
        if self._index < len(self._seen):
            self._index += 1
            return self._seen[self._index - 1]
        if self._finished:
            raise StopIteration
        try:
            response = next(self._source)
        except StopIteration:
            self._finished = True
            raise
        self._seen.append(response)
        self._index += 1
        return response


class Logger:
    @staticmethod
    def log_info(msg: str) -> None:
        pass

    log_warn = log_error = log_verbose = log_info


class Metric:
    def __init__(self, labels: dict[str, str]) -> None:
        self.labels, self.value = labels, 0.0

    def increment(self, value: float) -> None:
        self.value += value

    def set(self, value: float) -> None:
        self.value = value

    def observe(self, value: float) -> None:
        self.value += value


class MetricFamily:
    COUNTER, GAUGE, HISTOGRAM = 0, 1, 2

    def __init__(self, name: str, description: str, kind: int) -> None:
        self.name, self.kind, self.metrics = name, kind, []

    def Metric(self, labels: dict[str, str] | None = None, **_: Any) -> Metric:
        m = Metric(labels or {})
        self.metrics.append(m)
        return m


def get_input_tensor_by_name(request: FakeRequest, name: str) -> Tensor | None:
    return request._inputs.get(name)


def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor | None:
    return next((t for t in response.output_tensors() if t.name() == name), None)


def _config_entry(model_config: dict, kind: str, name: str) -> dict | None:
    return next((e for e in model_config.get(kind, []) if e["name"] == name), None)


def get_input_config_by_name(model_config: dict, name: str) -> dict | None:
    return _config_entry(model_config, "input", name)


def get_output_config_by_name(model_config: dict, name: str) -> dict | None:
    return _config_entry(model_config, "output", name)


def using_decoupled_model_transaction_policy(model_config: dict) -> bool:
    return bool(model_config.get("model_transaction_policy", {}).get("decoupled", False))


def triton_string_to_numpy(name: str) -> type:
    return _TRITON_TO_NUMPY[name]


TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1


def _install() -> types.ModuleType:
    module = types.ModuleType("triton_python_backend_utils")
    for name, value in dict(globals()).items():
        if not name.startswith("_") and name not in {
            "annotations",
            "pytest",
            "np",
            "json",
            "sys",
            "time",
            "types",
            "importlib",
            "inspect",
            "Path",
            "ROOT",
        }:
            setattr(module, name, value)
    sys.modules["triton_python_backend_utils"] = module
    return module


pb_utils = _install()


def _has_gpu() -> bool:
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are opt-in hardware tests: they skip cleanly without a GPU."""
    gpu_items = [i for i in items if i.get_closest_marker("gpu")]
    if gpu_items and not _has_gpu():
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU (nvidia-smi -L found none)")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture
def bls() -> dict[str, Callable[[dict[str, np.ndarray]], Any]]:
    """Script BLS downstream models for one test; cleared afterwards."""
    BLS_HANDLERS.clear()
    yield BLS_HANDLERS
    BLS_HANDLERS.clear()


def eventually(predicate: Callable[[], bool], seconds: float = 10.0) -> bool:
    """Poll an outcome (never a duration): True as soon as it holds, else its last value.

    For effects that land on another thread (a helper thread ending, a metric changing);
    the bound only keeps a broken build from hanging.
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def load_model_module(model: str) -> types.ModuleType:
    """Import ``model_repository/<model>/1/model.py`` under the fake pb_utils."""
    path = ROOT / "model_repository" / model / "1" / "model.py"
    spec = importlib.util.spec_from_file_location(f"model_{model}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_args(model: str, profile_config: dict | None = None) -> dict[str, str]:
    """The ``args`` Triton passes to ``initialize``, built from the model's config.pbtxt."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    if profile_config is None:
        text = (ROOT / "model_repository" / model / "config.pbtxt").read_text()
        msg = text_format.Parse(text, model_config_pb2.ModelConfig())
        profile_config = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    profile_config.setdefault("name", model)
    return {
        "model_config": json.dumps(profile_config),
        "model_name": model,
        "model_instance_name": f"{model}_0_0",
        "model_repository": str(ROOT / "model_repository" / model),
        "model_version": "1",
    }
