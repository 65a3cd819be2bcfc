"""One table tells downstream errors apart: the project's marks, then backends' own texts."""

from __future__ import annotations

import pytest

from client.errors import InvalidInput, Overloaded, ServerError, error_from_status
from serving.errors import INVALID_INPUT, OVERLOADED, ErrorKind, kind_of

#: TensorRT-LLM backend messages as a client receives them. The quoted texts are the
#: backend's (files named per line); the "[TensorRT-LLM][ERROR] ... (file:line)" and
#: "Executor failed process requestId N ..." wrappers are how they reach Triton
#: (tensorrtllm_backend inflight_batcher_llm/src/model_instance_state.cc).
CLIENT_FAULTS = [
    # inflight_batcher_llm/src/utils.cc
    "[TensorRT-LLM][ERROR] Assertion failed: Expected inputTokens tensors to have 2 "
    "dimensions (/app/inflight_batcher_llm/src/utils.cc:167)",
    "[TensorRT-LLM][ERROR] Assertion failed: input lengths tensor not provided",
    "[TensorRT-LLM][ERROR] input_ids or encoder_input_features is not present in the request.",
    "request_output_len is not present in the request",
    "[TensorRT-LLM][ERROR] Streaming is only supported if model is deployed using decoupled mode.",
    "[TensorRT-LLM][ERROR] Batch size > 1 requires the tensorrt_llm backend to be using "
    "decoupled transaction policy",
    # inflight_batcher_llm/src/model_instance_state.cc
    "Trying to stop a request but request ID is not provided",
    # TensorRT-LLM cpp/tensorrt_llm/batch_manager/llmRequest.cpp
    "Executor failed process requestId 3 due to the following error: [TensorRT-LLM][ERROR] "
    "Assertion failed: Prompt length (9000) exceeds maximum input length (8192). Set log "
    "level to info and check TRTGptModel logs for how maximum input length is set",
    "Executor failed process requestId 4 due to the following error: [TensorRT-LLM][ERROR] "
    "Assertion failed: EndId (200000) is not within acceptable range [-1, 128256).",
    "Executor failed process requestId 5 due to the following error: [TensorRT-LLM][ERROR] "
    "Assertion failed: Incorrect sampling config",
    # TensorRT-LLM cpp/tensorrt_llm/executor/executorImpl.cpp
    "[TensorRT-LLM][ERROR] Assertion failed: Request sequence length is potentially greater "
    "than max input length. This cannot be run unless streaming is disabled, context "
    "chunking is enabled or the GUARANTEED_NO_EVICT scheduling policy is used",
]
CAPACITY = [
    # TensorRT-LLM cpp/tensorrt_llm/executor/executorImpl.cpp
    "[TensorRT-LLM][ERROR] Maximum queue size of 64 has been reached, please try again later",
    # Triton core src/scheduler_utils.cc, src/dynamic_batch_scheduler.cc (a queue policy)
    "[request id: router-ab12-0] Exceeds maximum queue size",
    "Request timeout expired",
]
UNKNOWN = [
    "Encountered an error in forwardAsync function: CUDA error: out of memory",
    # python_backend src/stub_launcher.cc: the model's stub died (listed as UNAVAILABLE)
    "Stub process 'llm_small_0_0' is not healthy.",
    "llm_small: internal error (RuntimeError); see the server log",
    "some failure nobody anticipated",
]


@pytest.mark.parametrize("message", CLIENT_FAULTS)
def test_trtllm_client_faults_are_invalid_input(message: str) -> None:
    assert kind_of(message) is ErrorKind.INVALID_INPUT
    assert isinstance(error_from_status(None, message), InvalidInput)  # in a stream too


@pytest.mark.parametrize("message", CAPACITY)
def test_full_queues_are_overloaded(message: str) -> None:
    assert kind_of(message) is ErrorKind.OVERLOADED
    assert isinstance(error_from_status(None, message), Overloaded)


@pytest.mark.parametrize("message", UNKNOWN)
def test_anything_else_is_unavailable(message: str) -> None:
    assert kind_of(message) is ErrorKind.UNAVAILABLE


def test_the_projects_own_errors_are_told_by_their_prefix_alone() -> None:
    assert kind_of(INVALID_INPUT + "anything at all") is ErrorKind.INVALID_INPUT
    assert kind_of(OVERLOADED + "32 requests wait") is ErrorKind.OVERLOADED
    # A project message that merely sounds like a client fault is not one without its mark.
    assert kind_of("llm_small: 'max_tokens' must be at least 1") is ErrorKind.UNAVAILABLE
    assert isinstance(error_from_status(None, "Exceeds maximum queue size"), Overloaded)
    assert not isinstance(error_from_status(None, UNKNOWN[0]), InvalidInput | Overloaded)
    assert isinstance(error_from_status(None, UNKNOWN[3]), ServerError)
