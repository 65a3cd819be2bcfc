"""The one Triton adapter behind every CPU tier (``llm_small``, ``llm_medium``, ``llm_large``).

SmolLM2-135M-Instruct behind TensorRT-LLM's ``tensorrt_llm`` tensor interface. Each tier's
``model.py`` is the same two lines that import :class:`TierModel` as
``TritonPythonModel`` (a unit test fails if one drifts), so the three tiers cannot
disagree and the adapter is tested once.

Decoupled. ``execute`` only parses and queues each request; the engine's background
thread (in-flight batching, :mod:`serving.llm.engine`) sends the responses and checks
``request.is_cancelled()`` every step, so a cancelled client frees its slot. A request
with ``stop=true`` ends the running request that has the same request id.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from serving.llm import service
from serving.llm.engine import FinishReason, StepOutput
from serving.llm.service import TierConfig, TierStream, output_arrays, tier_request
from serving.triton import (
    LabelledMetric,
    ModelSetup,
    error_response,
    final_flag,
    get_input,
    get_optional_scalar,
    get_scalar,
    model_exception,
    response_of,
)


def response_sink(sender: Any, stream: TierStream, model: str) -> Callable[[StepOutput], None]:
    """What one request's engine events become: chunks, an error, or a bare final flag.

    Every path ends with exactly one response carrying the final flag: an engine error
    becomes an error response, a cancelled request gets only the flag (its client is gone
    or asked to stop), and tokens go out as :class:`TierStream` groups them.
    """

    def sink(event: StepOutput) -> None:
        if event.error:
            sender.send(error_response(RuntimeError(event.error), model), flags=final_flag())
        elif event.reason is FinishReason.CANCELLED:
            sender.send(flags=final_flag())
        else:
            for tokens, final in stream.on_event(event):
                sender.send(response_of(output_arrays(tokens)), flags=final_flag() if final else 0)

    return sink


class TierModel:
    """``TritonPythonModel`` of every CPU tier."""

    def initialize(self, args: dict[str, str]) -> None:
        try:
            setup = ModelSetup(args)
            if not setup.decoupled:
                raise ValueError(f"{setup.name} must be decoupled (model_transaction_policy)")
            setup.set_torch_threads()
            self.name = setup.name
            # Kept on self: a MetricFamily that is garbage collected invalidates its metrics.
            self.sequences = sequences = LabelledMetric(
                "llm_engine_sequences",
                "Sequences in the CPU engine by state: active (holding a slot) or waiting",
                "gauge",
            )
            active = sequences.labels(model=self.name, state="active")
            waiting = sequences.labels(model=self.name, state="waiting")

            def observe(n_active: int, n_waiting: int) -> None:
                active.set(n_active)
                waiting.set(n_waiting)

            # Triton hands a new stub the same series a dead one left at its last value
            # (seen: "active 9" for hours after a stub was killed mid-load): start at 0.
            observe(0, 0)

            # How much prefill KV cache reuse saves: reused / (computed + reused).
            self.prompt_tokens = prompt_tokens = LabelledMetric(
                "llm_engine_prompt_tokens",
                "Prompt tokens prefilled by the CPU engine: computed, or reused from the KV "
                "cache of an earlier prompt",
                "counter",
            )
            computed = prompt_tokens.labels(model=self.name, source="computed")
            reused = prompt_tokens.labels(model=self.name, source="reused")

            def on_prefill(n_computed: int, n_reused: int) -> None:
                computed.increment(n_computed)
                if n_reused:
                    reused.increment(n_reused)

            # Looked up on the module at call time so tests can put a scripted engine in.
            self.tier = service.build_engine(
                TierConfig.from_params(setup.params), observe, on_prefill=on_prefill
            )
        except Exception as exc:
            raise model_exception(exc) from exc

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._submit(request, sender)
            except Exception as exc:
                sender.send(error_response(exc, self.name), flags=final_flag())

    def _submit(self, request: Any, sender: Any) -> None:
        if get_optional_scalar(request, "stop", np.bool_):
            self.tier.stop(request.request_id())
            sender.send(flags=final_flag())
            return
        generation = tier_request(
            input_ids=get_input(request, "input_ids", np.int32),
            input_length=get_optional_scalar(request, "input_lengths", np.int32),
            request_output_len=get_scalar(request, "request_output_len", np.int32),
            end_id=get_optional_scalar(request, "end_id", np.int32),
            temperature=get_optional_scalar(request, "temperature", np.float32),
            top_k=get_optional_scalar(request, "runtime_top_k", np.int32),
            top_p=get_optional_scalar(request, "runtime_top_p", np.float32),
            seed=get_optional_scalar(request, "seed", np.uint64),
        )
        streaming = bool(get_scalar(request, "streaming", np.bool_, default=False))
        sink = response_sink(sender, TierStream(self.tier.token_bytes, streaming), self.name)
        self.tier.submit(request.request_id(), generation, sink, request.is_cancelled)

    def finalize(self) -> None:
        tier = getattr(self, "tier", None)
        if tier is not None:
            tier.close()
