"""Closed- or open-loop load over an OpenAI-compatible endpoint (the gateway), streamed.

The official ``openai`` SDK does the HTTP and the SSE parsing; :func:`openai_stream` turns
one streamed completion into the SDK's :class:`client.sdk.Chunk` stream, so the project's
one runner (:func:`client.loadgen.run`) and one measurement (:func:`client.metrics.measure`,
:func:`client.metrics.summarize`) time it exactly as they time gRPC and HTTP streams to
Triton. Each :class:`client.metrics.RequestRecord` then holds the request's start, TTFT,
token arrival times (inter-token gaps), token count (the server's ``usage``) and outcome.

Outcomes, in ``record.error`` / ``record.error_message``:

- an HTTP error before the stream (429, 503, ...): the status's kind (``overloaded``,
  ``unavailable``, ``invalid_input``, ...) and ``"HTTP <status>: <message>"``;
- an error event inside the stream (``data: {"error": ...}`` after tokens were sent):
  the kind its message implies and ``"stream error event: <message>"``;
- no connection: ``unavailable``; the client timeout: ``timeout``.

``openai`` is a dev/bench dependency, imported here only: the rest of ``client/`` does not
need it.

Used by ``benchmarks/replicas.py`` and the soak; prompts come from
:mod:`client.workload` (the Dolly sample: Databricks Dolly 15k, CC BY-SA 3.0).
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import AsyncIterator, Callable, Iterator

import openai

from client.errors import ClientError, ServerUnavailable, Timeout, error_from_status
from client.loadgen import LoadShape, RunResult, run
from client.metrics import RequestRecord
from client.sdk import Chunk
from client.workload import Job


class Api(str, enum.Enum):
    """Which OpenAI endpoint to stream: raw text completion or chat (with the template)."""

    COMPLETIONS = "completions"
    CHAT = "chat"


def _error(exc: openai.OpenAIError, streamed: bool) -> ClientError:
    if isinstance(exc, openai.APITimeoutError):
        return Timeout(f"the request did not finish before the client timeout: {exc}")
    if isinstance(exc, openai.APIConnectionError):
        return ServerUnavailable(f"cannot connect: {exc}")
    if isinstance(exc, openai.APIStatusError):
        message = _message(exc)
        return error_from_status(str(exc.status_code), f"HTTP {exc.status_code}: {message}")
    if isinstance(exc, openai.APIError):
        where = "stream error event" if streamed else "error event before any token"
        message = _message(exc)
        return error_from_status(None, f"{where}: {message}")
    return error_from_status(None, f"{type(exc).__name__}: {exc}")


def _message(exc: openai.APIError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"]
    return exc.message


async def openai_stream(
    api: openai.AsyncOpenAI,
    job: Job,
    *,
    model: str,
    endpoint: Api = Api.COMPLETIONS,
    temperature: float | None = 0.0,
) -> AsyncIterator[Chunk]:
    """One streamed request as :class:`Chunk` s: one per text delta, then one with the
    usage's completion token count. Errors are raised as :mod:`client.errors` classes."""
    options: dict = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if job.max_tokens is not None:
        options["max_tokens"] = job.max_tokens
    if temperature is not None:
        options["temperature"] = temperature
    streamed = False
    try:
        # The raw response carries the gateway's headers: x-route-replica says which
        # Triton answered, which a soak needs to tie a failure to the replica it hit.
        if endpoint is Api.CHAT:
            raw = await api.chat.completions.with_raw_response.create(
                messages=[{"role": "user", "content": job.prompt}], **options
            )
        else:
            raw = await api.completions.with_raw_response.create(prompt=job.prompt, **options)
        replica = raw.headers.get("x-route-replica")
        stream = raw.parse()
        async with contextlib.aclosing(stream):  # leaving early closes the HTTP stream
            async for event in stream:
                text = ""
                if event.choices:
                    choice = event.choices[0]
                    piece = choice.delta.content if endpoint is Api.CHAT else choice.text
                    text = piece or ""
                usage = event.usage.completion_tokens if event.usage else None
                if text or usage is not None:
                    streamed = streamed or bool(text)
                    yield Chunk(
                        text=text, model=event.model, num_output_tokens=usage, replica=replica
                    )
    except openai.OpenAIError as exc:
        raise _error(exc, streamed) from exc


async def openai_load(
    base_url: str,
    jobs: Iterator[Job],
    shape: LoadShape,
    *,
    model: str = "llm_small",
    endpoint: Api = Api.COMPLETIONS,
    temperature: float | None = 0.0,
    api_key: str = "unused",
    timeout: float = 600.0,
    on_record: Callable[[RequestRecord], None] | None = None,
) -> RunResult:
    """Drive ``shape`` (e.g. ``LoadShape(users=30, duration=600)``) against ``base_url``.

    One ``AsyncOpenAI`` client with no SDK retries (a retry would hide the failure being
    measured) and a connection pool as large as the load. ``on_record`` sees each request
    as it finishes (a soak can watch errors while it injects faults).
    """
    import httpx

    concurrency = (shape.users or shape.max_concurrency or 64) + 8
    http = httpx.AsyncClient(
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        timeout=httpx.Timeout(timeout, connect=10.0),
    )
    api = openai.AsyncOpenAI(
        base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout, http_client=http
    )
    try:
        return await run(
            lambda job: openai_stream(
                api, job, model=model, endpoint=endpoint, temperature=temperature
            ),
            jobs,
            shape,
            on_record=on_record,
        )
    finally:
        await api.close()
