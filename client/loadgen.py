"""The load generator's runner: closed and open loops over any SDK client or replica pool.

The runner only schedules. Timing happens in :func:`client.metrics.measure`; what to send
comes from :mod:`client.workload`. Every request goes through the SDK's streaming
iterator, so gRPC, HTTP and a replica pool are driven by the same code.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from client.errors import ServerUnavailable, error_of_kind
from client.metrics import RequestRecord, measure
from client.sdk import BaseAsyncClient, Chunk
from client.workload import Job, WorkloadError, arrival_gaps

UNAVAILABLE_PAUSE_S = 0.1


class Target(str, enum.Enum):
    """What to load: the router, one tier's text ensemble, or the embedding model."""

    ROUTER = "router"
    LLM_SMALL = "llm_small_text"
    LLM_MEDIUM = "llm_medium_text"
    LLM_LARGE = "llm_large_text"
    EMBEDDING = "embedding"


@dataclass(frozen=True)
class LoadShape:
    """How requests arrive and when the run ends.

    Closed loop: ``users`` each send the next request when the last one finishes.
    Open loop: ``rate`` requests/s with gamma inter-arrivals of shape ``burstiness``,
    optionally capped at ``max_concurrency`` in flight. The run ends after ``duration``
    seconds or ``requests`` requests, whichever comes first; requests in flight then
    finish and count.
    """

    users: int | None = None
    rate: float | None = None
    burstiness: float = 1.0
    max_concurrency: int | None = None
    duration: float | None = None
    requests: int | None = None
    warmup: int = 0
    seed: int = 0

    def validate(self) -> None:
        if (self.users is None) == (self.rate is None):
            raise WorkloadError("give either a number of users (closed loop) or a rate (open loop)")
        if self.users is not None and self.users < 1:
            raise WorkloadError(f"users must be at least 1, got {self.users}")
        if self.rate is not None and self.rate <= 0:
            raise WorkloadError(f"rate must be positive, got {self.rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise WorkloadError(f"max concurrency must be at least 1, got {self.max_concurrency}")
        if self.duration is None and self.requests is None:
            raise WorkloadError("give a duration or a request count, or the run never ends")
        if self.duration is not None and self.duration <= 0:
            raise WorkloadError(f"duration must be positive, got {self.duration}")
        if self.requests is not None and self.requests < 1:
            raise WorkloadError(f"requests must be at least 1, got {self.requests}")
        if self.warmup < 0:
            raise WorkloadError(f"warmup must be >= 0, got {self.warmup}")


@dataclass
class RunResult:
    records: list[RequestRecord] = field(default_factory=list)
    wall_time: float = 0.0


class _Budget:
    """Hands out permission to start requests until the count or the deadline runs out."""

    def __init__(self, requests: int | None, deadline: float | None) -> None:
        self._left = requests
        self._deadline = deadline

    def take(self) -> bool:
        if self._deadline is not None and time.perf_counter() >= self._deadline:
            return False
        if self._left is not None:
            if self._left <= 0:
                return False
            self._left -= 1
        return True


async def _single(call: Awaitable[object]) -> AsyncIterator[Chunk]:
    """A one-shot call seen as a one-chunk stream (TTFT = end-to-end for embeddings)."""
    await call
    yield Chunk(text="\u2022")


def request_stream(
    client: BaseAsyncClient,
    target: Target,
    job: Job,
    *,
    model: str | None = None,
    temperature: float | None = None,
) -> AsyncIterator[Chunk]:
    """The chunk stream for one job against a target (``model`` renames the target)."""
    name = model or target.value
    if target is Target.EMBEDDING:
        return _single(client.embed([job.prompt], model=name))
    if target is Target.ROUTER:
        return client.chat(
            job.prompt, stream=True, max_tokens=job.max_tokens, temperature=temperature, model=name
        )
    return client.generate(
        job.prompt, stream=True, max_tokens=job.max_tokens, temperature=temperature, model=name
    )


SendFn = Callable[[Job], AsyncIterator[Chunk]]


async def _closed_loop(
    send: SendFn,
    jobs: Iterator[Job],
    users: int,
    budget: _Budget,
    origin: float,
    done: Callable[[RequestRecord], None],
) -> None:
    async def user() -> None:
        while budget.take():
            job = next(jobs)
            started = time.perf_counter()
            record = await measure(send(job), started, origin)
            done(record)
            if record.error == ServerUnavailable.kind:
                # Nothing answered: pause like a real client would, instead of a hot loop
                # that records thousands of instant failures against a dead server.
                await asyncio.sleep(UNAVAILABLE_PAUSE_S)

    await asyncio.gather(*(user() for _ in range(users)))


async def _open_loop(
    send: SendFn,
    jobs: Iterator[Job],
    shape: LoadShape,
    budget: _Budget,
    origin: float,
    done: Callable[[RequestRecord], None],
) -> None:
    limit = asyncio.Semaphore(shape.max_concurrency) if shape.max_concurrency else None
    tasks: set[asyncio.Task[None]] = set()

    async def one(job: Job) -> None:
        if limit is None:
            started = time.perf_counter()
            done(await measure(send(job), started, origin))
            return
        async with limit:
            started = time.perf_counter()
            done(await measure(send(job), started, origin))

    if shape.rate is None:
        raise WorkloadError("an open loop needs a rate")
    due = time.perf_counter()
    for gap in arrival_gaps(shape.rate, shape.burstiness, shape.seed):
        due += gap
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        if not budget.take():
            break
        task = asyncio.get_running_loop().create_task(one(next(jobs)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)


async def run(
    send: SendFn,
    jobs: Iterator[Job],
    shape: LoadShape,
    on_record: Callable[[RequestRecord], None] | None = None,
    on_start: Callable[[], None] | None = None,
) -> RunResult:
    """Warm up (uncounted), then drive the load and return every request's record."""
    shape.validate()
    if shape.warmup:
        warm: list[RequestRecord] = []
        concurrency = min(shape.warmup, shape.users or 4)
        await _closed_loop(send, jobs, concurrency, _Budget(shape.warmup, None), 0.0, warm.append)
        if all(not r.ok for r in warm):
            # Nothing works (server down, model missing, bad options): say so now rather
            # than time thousands of instant failures.
            first = warm[0]
            raise error_of_kind(
                first.error or "", f"every warm-up request failed: {first.error_message}"
            )
    result = RunResult()

    def done(record: RequestRecord) -> None:
        result.records.append(record)
        if on_record is not None:
            on_record(record)

    if on_start is not None:
        on_start()
    origin = time.perf_counter()
    deadline = origin + shape.duration if shape.duration is not None else None
    budget = _Budget(shape.requests, deadline)
    if shape.users is not None:
        await _closed_loop(send, jobs, shape.users, budget, origin, done)
    else:
        await _open_loop(send, jobs, shape, budget, origin, done)
    result.wall_time = time.perf_counter() - origin
    return result
