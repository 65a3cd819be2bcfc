"""router: classify a prompt, pick an LLM tier, stream its answer (decoupled BLS).

A thin adapter: the policy is ``serving.routing`` (read from this model's config
parameters), the request handling is ``serving.router``; see docs/routing.md.
"""

from __future__ import annotations

from typing import Any

from serving.assets import smollm2_gguf
from serving.errors import ConfigError
from serving.llm.tokenizer import TokenBytes, load_tokenizer
from serving.router import Router, RouterMetrics, RouterModels, TokenText
from serving.routing import RoutingPolicy
from serving.triton import ModelSetup, model_exception


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        try:
            setup = ModelSetup(args)
            setup.set_torch_threads()
            if not setup.decoupled:
                raise ConfigError(f"{setup.name}: the router streams, so it must be decoupled")
            params = setup.params
            workers = params.get("max_concurrent_requests", int, default=32)
            default_max_tokens = params.get("default_max_tokens", int, default=128)
            if workers < 1 or default_max_tokens < 1:
                raise ConfigError(
                    f"{setup.name}: max_concurrent_requests and default_max_tokens must be >= 1"
                )
            token_bytes = TokenBytes(load_tokenizer(smollm2_gguf()))
            self.router = Router(
                name=setup.name,
                policy=RoutingPolicy.from_params(params),
                models=RouterModels(
                    classifier=params.get("intent_classifier_model", str),
                    preprocessing=params.get("preprocessing_model", str),
                ),
                detokenizer=lambda: TokenText(token_bytes),
                default_max_tokens=default_max_tokens,
                workers=workers,
                batched=setup.config.get("max_batch_size", 0) > 0,
                metrics=RouterMetrics(),
            )
        except Exception as exc:
            raise model_exception(exc) from exc

    def execute(self, requests: list[Any]) -> None:
        # Decoupled: each request is answered from a worker thread through its sender.
        self.router.submit(requests)

    def finalize(self) -> None:
        self.router.close()
