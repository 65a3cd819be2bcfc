"""router: classify a prompt, pick an LLM tier, stream its answer (decoupled BLS).

A thin adapter: the policy is ``serving.routing`` (read from this model's config
parameters), the request handling is ``serving.router``; see docs/routing.md.
"""

from __future__ import annotations

from typing import Any

from serving.errors import ConfigError
from serving.llm.service import PreprocessConfig, Preprocessor
from serving.llm.tokenizer import TokenBytes, tokenizer_for
from serving.router import Router, RouterMetrics, RouterModels
from serving.routing import RoutingPolicy
from serving.text import TokenText
from serving.triton import BlsDeadlines, ModelSetup, model_exception


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        try:
            setup = ModelSetup(args)
            setup.set_torch_threads()
            if not setup.decoupled:
                raise ConfigError(f"{setup.name}: the router streams, so it must be decoupled")
            params = setup.params
            workers = params.get("max_concurrent_requests", int, default=32)
            if workers < 1:
                raise ConfigError(f"{setup.name}: max_concurrent_requests must be >= 1")
            # The tiers' tokenizer and preprocessing, from the same parameters as the
            # preprocessing model's (a unit test keeps them equal).
            tokenizer = tokenizer_for(params.get("tokenizer_dir", str, None))
            token_bytes = TokenBytes(tokenizer)
            self.router = Router(
                name=setup.name,
                policy=RoutingPolicy.from_params(params),
                models=RouterModels(classifier=params.get("intent_classifier_model", str)),
                detokenizer=lambda: TokenText(token_bytes),
                preprocessor=Preprocessor(tokenizer, PreprocessConfig.from_params(params)),
                workers=workers,
                max_queue=params.get("max_queue_size", int, default=64),
                batched=setup.config.get("max_batch_size", 0) > 0,
                metrics=RouterMetrics(),
                deadlines=BlsDeadlines.from_params(params),
            )
        except Exception as exc:
            raise model_exception(exc) from exc

    def execute(self, requests: list[Any]) -> None:
        # Decoupled: each request is answered from a worker thread through its sender.
        self.router.submit(requests)

    def finalize(self) -> None:
        self.router.close()
