"""The HTTP layer: OpenAI's endpoints over :class:`gateway.service.Gateway`.

Bodies are read here (with the size limit), parsed by ``gateway.schemas``, and every
failure becomes OpenAI's error body with its status. A streamed response goes out only
once the upstream's first response is in, so a failure before the first token is a
proper HTTP error (and was retried or fallen back on), never half a stream.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from gateway.auth import ApiKey, KeyStore
from gateway.errors import APIError, bad_request
from gateway.http import DEFAULT_CLIENT_TIMEOUT
from gateway.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, parse
from gateway.service import AUTO, NO_ARM, Gateway, Generation, GenRequest
from gateway.sse import DONE, event

log = logging.getLogger("gateway.access")

PRIORITY_HEADER = "x-priority"
REQUEST_ID_HEADER = "x-request-id"


@dataclass
class Call:
    """One HTTP request's context: ids, key, and what the access log and metrics record."""

    route: str
    request_id: str
    key: ApiKey | None = None
    sticky: str | None = None
    model: str = "-"
    status: int = 200
    arm: str = NO_ARM
    started: float = field(default_factory=time.perf_counter)
    extra: dict[str, Any] = field(default_factory=dict)
    finished: bool = False


def create_app(
    gateway: Gateway,
    keys: KeyStore | None = None,
    *,
    max_body_bytes: int = 1 << 20,
    client_timeout: float = DEFAULT_CLIENT_TIMEOUT,
) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.close()

    app = FastAPI(
        title="triton-llm-stack gateway",
        description="OpenAI-compatible frontend scheduler in front of Triton (docs/gateway.md)",
        lifespan=lifespan,
    )
    metrics = gateway.metrics
    known_models = {public for public, _ in gateway.model_ids()}

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "invalid_request")
        error = APIError(exc.status_code, str(exc.detail), code=code)
        return JSONResponse(error.body(), status_code=exc.status_code)

    def finish(call: Call) -> None:
        if call.finished:
            return
        call.finished = True
        model = call.model if call.model in known_models else "other"
        metrics.requests.labels(
            route=call.route, model=model, status=str(call.status), arm=call.arm
        ).inc()
        record = {
            "request_id": call.request_id,
            "route": call.route,
            "model": call.model,
            "status": call.status,
            "duration_ms": round((time.perf_counter() - call.started) * 1000, 1),
            **call.extra,
        }
        if call.key is not None:
            record["key"] = call.key.name
        log.info("request", extra={"fields": record})

    def error_response(call: Call, exc: APIError) -> JSONResponse:
        call.status = exc.status
        call.extra["error"] = exc.message
        headers = {REQUEST_ID_HEADER: call.request_id, **exc.headers()}
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    async def handle(
        request: Request, route: str, work: Callable[[Call], Awaitable[Response]]
    ) -> Response:
        given = request.headers.get(REQUEST_ID_HEADER, "")
        # A client's id is kept (it ties their logs to ours and Triton's) if it is sane.
        usable = 0 < len(given) <= 128 and given.isprintable()
        call = Call(route, given if usable else gateway.request_id())
        streaming = False
        try:
            if keys is not None:
                call.key = keys.authenticate(request.headers.get("authorization"))
                keys.admit(call.key)
            call.sticky = call.key.name if call.key else None
            response = await work(call)
            response.headers[REQUEST_ID_HEADER] = call.request_id
            streaming = isinstance(response, StreamingResponse)
            return response
        except APIError as exc:
            return error_response(call, exc)
        except Exception as exc:  # a bug: log it whole, tell the client little
            log.exception("request %s failed", call.request_id)
            return error_response(
                call, APIError(500, f"internal error ({type(exc).__name__})", code="internal")
            )
        finally:
            if not streaming:  # a stream records itself when it ends
                finish(call)

    async def body_of(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            raise _too_large(max_body_bytes)
        body = bytearray()

        async def read() -> None:
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > max_body_bytes:
                    raise _too_large(max_body_bytes)

        # A client that sends its headers and then nothing (or a byte now and then)
        # must not hold its connection forever: the whole body has a deadline.
        try:
            await asyncio.wait_for(read(), client_timeout)
        except TimeoutError:
            raise APIError(
                408,
                f"the request body did not arrive within {client_timeout:g}s",
                code="request_timeout",
                close=True,
            ) from None
        except ClientDisconnect:
            raise APIError(499, "the client closed the connection", code="cancelled") from None
        return bytes(body)

    def priority_of(request: Request, field_value: str | None) -> str:
        header = request.headers.get(PRIORITY_HEADER)
        if header is not None and header not in ("interactive", "batch"):
            raise bad_request(
                f"header {PRIORITY_HEADER} must be 'interactive' or 'batch', got {header!r}",
                PRIORITY_HEADER,
            )
        return field_value or header or "interactive"

    def sticky_of(request: Request, call: Call, model: str) -> str | None:
        split = gateway.topology.splits.get(model)
        if split is not None and split.sticky_header:
            return request.headers.get(split.sticky_header) or call.sticky
        return call.sticky

    def on_done(call: Call) -> Callable[[Generation], None]:
        def done(gen: Generation) -> None:
            routed = gen.routed
            call.arm = routed.arm
            labels = {"model": routed.tier, "arm": routed.arm}
            metrics.prompt_tokens.labels(**labels).inc(gen.prompt_tokens)
            metrics.completion_tokens.labels(**labels).inc(gen.completion_tokens)
            if gen.first_token_at is not None:
                metrics.ttft.labels(**labels).observe(gen.first_token_at - call.started)
            pool = gateway.pools.get(routed.pool)
            if pool is not None:
                pool.tokens_served += gen.prompt_tokens + gen.completion_tokens
            if keys is not None and call.key is not None:
                keys.charge_tokens(call.key, gen.prompt_tokens + gen.completion_tokens)
            call.extra.update(
                tier=routed.tier,
                intent=routed.intent,
                pool=routed.pool,
                replica=routed.replica,
                arm=routed.arm,
                prompt_tokens=gen.prompt_tokens,
                completion_tokens=gen.completion_tokens,
                finish_reason=gen.finish_reason,
                ttft_ms=None
                if gen.first_token_at is None
                else round((gen.first_token_at - call.started) * 1000, 1),
            )

        return done

    async def generate(
        request: Request, call: Call, body: ChatCompletionRequest | CompletionRequest
    ) -> Response:
        call.model = body.model
        is_chat = isinstance(body, ChatCompletionRequest)
        resolved = gateway.resolve(body.model)
        req = gateway.prepare(
            body.model,
            request_id=call.request_id,
            messages=body.conversation() if is_chat else None,
            prompt=None if is_chat else body.prompt,
            max_tokens=body.wanted_tokens(),
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stops=body.stops(),
            intent=body.intent,
            priority=priority_of(request, body.priority),
            sticky=sticky_of(request, call, resolved),
        )
        gen = await gateway.open(req, on_done(call))
        shape = _Shape(is_chat, f"{'chatcmpl' if is_chat else 'cmpl'}-{call.request_id}")
        headers = gen.routed.headers()
        if body.stream:
            return _GenerationStream(
                gen,
                lambda: finish(call),
                _stream(gen, req, shape, body.include_usage(), call, finish, metrics),
                media_type="text/event-stream",
                headers={**headers, "Cache-Control": "no-cache"},
            )
        try:
            text = await gen.text()
        finally:
            await gen.close()
        return JSONResponse(shape.whole(gen, text), headers=headers)

    def completion_route(
        path: str, schema: type[ChatCompletionRequest | CompletionRequest]
    ) -> None:
        async def endpoint(request: Request) -> Response:
            async def work(call: Call) -> Response:
                return await generate(request, call, parse(schema, await body_of(request)))

            return await handle(request, path, work)

        app.add_api_route(path, endpoint, methods=["POST"], name=path)

    completion_route("/v1/chat/completions", ChatCompletionRequest)
    completion_route("/v1/completions", CompletionRequest)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        async def work(call: Call) -> Response:
            body = parse(EmbeddingRequest, await body_of(request))
            call.model = body.model
            model = gateway.resolve(body.model, embedding=True)
            texts = body.texts()
            priority = priority_of(request, None)
            vectors, pool = await gateway.embed(texts, call.request_id, priority)
            tokens = gateway.embedding_tokens(texts)
            pool.tokens_served += tokens
            if keys is not None and call.key is not None:
                keys.charge_tokens(call.key, tokens)
            data = [
                {
                    "object": "embedding",
                    "index": i,
                    "embedding": base64.b64encode(row.astype("<f4").tobytes()).decode()
                    if body.encoding_format == "base64"
                    else row.tolist(),
                }
                for i, row in enumerate(vectors)
            ]
            usage = {"prompt_tokens": tokens, "total_tokens": tokens}
            return JSONResponse({"object": "list", "data": data, "model": model, "usage": usage})

        return await handle(request, "/v1/embeddings", work)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        async def work(call: Call) -> Response:
            return JSONResponse(
                {"object": "list", "data": [_model(m, r) for m, r in gateway.model_ids()]}
            )

        return await handle(request, "/v1/models", work)

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> Response:
        async def work(call: Call) -> Response:
            for public, root in gateway.model_ids():
                if public == model_id:
                    return JSONResponse(_model(public, root))
            raise APIError(
                404, f"the model '{model_id}' does not exist", param="model", code="model_not_found"
            )

        return await handle(request, "/v1/models/{id}", work)

    @app.get("/health/ready")
    async def ready() -> Response:
        pools = {
            name: {
                "healthy": [r.url for r in pool.replicas.healthy()],
                "ejected": {r.url: r.last_error for r in pool.replicas.replicas if not r.healthy},
                "required": pool.spec.required,
            }
            for name, pool in gateway.pools.items()
        }
        ok = all(p["healthy"] or not p["required"] for p in pools.values())
        return JSONResponse({"ready": ok, "pools": pools}, status_code=200 if ok else 503)

    @app.get("/health/live")
    async def live() -> Response:
        return JSONResponse({"live": True})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class _GenerationStream(StreamingResponse):
    """A streamed generation that is closed (upstream cancelled, pool slot returned,
    request recorded) even when the client leaves before the body iterator ever ran."""

    def __init__(
        self, gen: Generation, finish: Callable[[], None], *args: Any, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._gen = gen
        self._finish = finish

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._gen.close()
            self._finish()


#: OpenAI ``code`` for the errors Starlette raises itself (unknown path, wrong method).
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")


def _model(public: str, root: str) -> dict[str, Any]:
    return {
        "id": public,
        "object": "model",
        "created": 0,
        "owned_by": "triton-llm-stack",
        "root": root,
    }


class _Shape:
    """The JSON of chat vs text completions, whole and streamed."""

    def __init__(self, chat: bool, response_id: str) -> None:
        self.chat = chat
        self.id = response_id
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _choice(self, text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}

    def chunk(
        self, model: str, text: str | None, finish: str | None = None, first: bool = False
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object + (".chunk" if self.chat else ""),
            "created": self.created,
            "model": model,
            "choices": [self._choice(text, finish, first)],
        }

    def text_chunk_framing(self, model: str) -> tuple[bytes, bytes]:
        """The bytes around a streamed piece's JSON string: every text chunk of a stream
        differs only in its text, so the rest is serialised once (the relay's hot path)."""
        marker = "\u0000MARK\u0000"
        frame = event(self.chunk(model, marker))
        prefix, _, suffix = frame.partition(json.dumps(marker).encode())
        return prefix, suffix

    def usage_chunk(self, model: str, gen: Generation) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object + (".chunk" if self.chat else ""),
            "created": self.created,
            "model": model,
            "choices": [],
            "usage": _usage(gen),
        }

    def whole(self, gen: Generation, text: str) -> dict[str, Any]:
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": gen.finish_reason,
                "logprobs": None,
            }
        else:
            choice = {
                "index": 0,
                "text": text,
                "finish_reason": gen.finish_reason,
                "logprobs": None,
            }
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": gen.routed.tier,
            "choices": [choice],
            "usage": _usage(gen),
        }


def _usage(gen: Generation) -> dict[str, int]:
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "total_tokens": gen.prompt_tokens + gen.completion_tokens,
    }


async def _stream(
    gen: Generation,
    req: GenRequest,
    shape: _Shape,
    include_usage: bool,
    call: Call,
    finish: Callable[[Call], None],
    metrics: Any,
) -> AsyncIterator[bytes]:
    model = gen.routed.tier
    icl = metrics.icl.labels(model=model, arm=gen.routed.arm)
    prefix, suffix = shape.text_chunk_framing(model)
    dumps = json.dumps
    try:
        try:
            if shape.chat:
                yield event(shape.chunk(model, "", first=True))
            first = last = None
            async for piece in gen.pieces():
                now = time.perf_counter()
                if last is None:
                    first = now
                else:
                    icl.observe(now - last)
                last = now
                yield prefix + dumps(piece).encode() + suffix
            if first is not None and last is not None and gen.completion_tokens > 1:
                metrics.itl.labels(model=model, arm=gen.routed.arm).observe(
                    (last - first) / (gen.completion_tokens - 1)
                )
            yield event(shape.chunk(model, None if shape.chat else "", gen.finish_reason))
            if include_usage:
                yield event(shape.usage_chunk(model, gen))
        except APIError as exc:
            call.status, call.extra["error"] = exc.status, exc.message
            yield event(exc.body())
        except Exception as exc:
            log.exception("stream %s failed", req.request_id)
            call.status = 500
            yield event(APIError(500, f"internal error ({type(exc).__name__})").body())
        yield DONE
    finally:
        await gen.close()
        finish(call)


# -------------------------------------------------------------------------- logging
class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


__all__ = ["AUTO", "JsonFormatter", "create_app"]
