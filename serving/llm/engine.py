"""The CPU generation engine: iteration-level (in-flight) batching over :class:`LlamaRunner`.

One background thread owns the model and loops: admit waiting requests into free slots
(one packed prefill for all of them, their first tokens; a prompt that starts like a
recent one reuses that part's KV cache), drop cancelled ones, run one
decode step for every active sequence, hand each sequence its new token, retire finished
ones. A request therefore joins the running batch at the next step and leaves it as soon
as it is done; nobody waits for a whole batch to drain. The engine has no Triton import:
callers pass a ``sink`` that receives :class:`StepOutput` events and an optional
``is_cancelled`` probe.
"""

from __future__ import annotations

import enum
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from serving.errors import ConfigError, OverloadedError, ValidationError
from serving.llm.prefix_cache import PrefixCache
from serving.llm.runner import LlamaRunner
from serving.llm.sampling import Sampler, SamplingParams, pick_tokens

log = logging.getLogger(__name__)


class FinishReason(str, enum.Enum):
    END_ID = "end_id"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class EngineLimits:
    """Capacity of one engine: concurrent sequences, context, output and KV-token budget.

    ``max_waiting`` bounds the requests queued for a slot. A decoupled ``execute`` returns
    at once, so Triton's own queue limits never see this backlog: without a bound here,
    overload turns into latency that grows without limit instead of a fast UNAVAILABLE.

    ``max_prefill_tokens`` bounds the prompt tokens prefilled together in one packed
    forward (its activations, and how long it pauses the running streams); a single
    prompt longer than that is still prefilled, alone.

    ``kv_cache_reuse_tokens`` bounds the prompt tokens whose KV cache is kept for reuse by
    later prompts that start the same way (:mod:`serving.llm.prefix_cache`); 0 turns
    reuse off. Each token costs ``2 * layers * kv_heads * head_dim`` float32 values
    (46 KB for SmolLM2-135M).
    """

    max_active: int = 16
    max_context: int = 2048
    max_new_tokens: int = 1024
    max_tokens: int = 16384
    max_waiting: int = 64
    max_prefill_tokens: int = 2048
    kv_cache_reuse_tokens: int = 1024

    def validate(self) -> None:
        names = (
            "max_active",
            "max_context",
            "max_new_tokens",
            "max_tokens",
            "max_waiting",
            "max_prefill_tokens",
        )
        for name in names:
            if getattr(self, name) < 1:
                raise ConfigError(f"engine limit {name} must be >= 1, got {getattr(self, name)}")
        if self.kv_cache_reuse_tokens < 0:
            raise ConfigError(
                "engine limit kv_cache_reuse_tokens must be >= 0 (0 turns reuse off), "
                f"got {self.kv_cache_reuse_tokens}"
            )
        if self.max_tokens < self.max_context:
            raise ConfigError(
                f"max_tokens ({self.max_tokens}) must be >= max_context ({self.max_context}) "
                "or a full-context request could never be admitted"
            )


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate, in the ``tensorrt_llm`` model's terms."""

    input_ids: list[int]
    max_new_tokens: int
    end_id: int | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)

    def validate(self, limits: EngineLimits, vocab: int) -> None:
        """Raise :class:`ValidationError` with what to change when the request cannot run."""
        if not self.input_ids:
            raise ValidationError("'input_ids' is empty: send at least one prompt token")
        bad = next((t for t in self.input_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValidationError(f"'input_ids' holds {bad}, outside the vocabulary [0, {vocab})")
        if len(self.input_ids) >= limits.max_context:
            raise ValidationError(
                f"prompt has {len(self.input_ids)} tokens; the context holds "
                f"{limits.max_context}: shorten the prompt"
            )
        if not 1 <= self.max_new_tokens <= limits.max_new_tokens:
            raise ValidationError(
                f"'request_output_len' must be between 1 and {limits.max_new_tokens}, "
                f"got {self.max_new_tokens}"
            )
        total = len(self.input_ids) + self.max_new_tokens
        if total > limits.max_context:
            raise ValidationError(
                f"prompt ({len(self.input_ids)} tokens) + 'request_output_len' "
                f"({self.max_new_tokens}) = {total} exceeds the context of "
                f"{limits.max_context}: ask for at most "
                f"{limits.max_context - len(self.input_ids)} new tokens"
            )
        self.sampling.validate()

    @property
    def reserved_tokens(self) -> int:
        return len(self.input_ids) + self.max_new_tokens


@dataclass(frozen=True)
class StepOutput:
    """What one sequence got from one engine step: new tokens, and whether it is done."""

    tokens: list[int]
    finished: bool = False
    reason: FinishReason | None = None
    error: str | None = None


Sink = Callable[[StepOutput], None]


@dataclass
class _Sequence:
    id: int
    request: GenerationRequest
    sink: Sink
    is_cancelled: Callable[[], bool] | None
    sampler: Sampler
    slot: int = -1
    length: int = 0  # tokens in the KV cache
    last_token: int = -1
    generated: int = 0
    cancel: bool = False
    probed_at: float = float("-inf")  # when is_cancelled was last asked


class Engine:
    """In-flight batching engine; thread-safe ``submit`` / ``cancel``, one decode thread."""

    def __init__(
        self,
        runner: LlamaRunner,
        limits: EngineLimits,
        default_end_id: int | None,
        observer: Callable[[int, int], None] | None = None,
        cancel_probe_interval: float = 0.05,
        on_prefill: Callable[[int, int], None] | None = None,
    ) -> None:
        """``observer(active, waiting)`` is called from the engine thread when they change.

        ``on_prefill(computed, reused)`` is called from the engine thread after each
        packed prefill with its prompt tokens: computed, and copied from the KV cache of
        earlier prompts (see ``kv_cache_reuse_tokens``).

        ``cancel_probe_interval``: each sequence's ``is_cancelled`` probe is asked at most
        this often (seconds). In a Triton stub the probe is an IPC round trip, once per
        sequence per step otherwise (16 per step at 16 streams); a client that goes away
        is still dropped within one interval plus one step.
        """
        limits.validate()
        self._probe_interval = cancel_probe_interval
        self._observer = observer
        self._on_prefill = on_prefill
        self._observed = (-1, -1)
        if limits.max_active > runner.max_active or limits.max_context > runner.max_context:
            raise ConfigError("engine limits exceed the runner's cache")
        self.runner = runner
        self.limits = limits
        self.default_end_id = default_end_id
        # Engine thread only, like the runner.
        self.prefixes = (
            PrefixCache(limits.kv_cache_reuse_tokens) if limits.kv_cache_reuse_tokens else None
        )
        self._ids = itertools.count()
        self._waiting: deque[_Sequence] = deque()
        self._active: list[_Sequence] = []
        self._by_id: dict[int, _Sequence] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()

    # -- public API -------------------------------------------------------------------
    def submit(
        self,
        request: GenerationRequest,
        sink: Sink,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> int:
        """Queue ``request``; events go to ``sink`` from the engine thread. Returns its id."""
        request.validate(self.limits, self.runner.shape.vocab)
        seq = _Sequence(next(self._ids), request, sink, is_cancelled, Sampler(request.sampling))
        with self._cond:
            if self._stop:
                raise RuntimeError("engine is closed")
            if len(self._waiting) >= self.limits.max_waiting:
                raise OverloadedError(
                    f"{len(self._waiting)} requests already wait for one of "
                    f"{self.limits.max_active} generation slots (max_queue_size "
                    f"{self.limits.max_waiting}); retry later or on another replica"
                )
            self._waiting.append(seq)
            self._by_id[seq.id] = seq
            self._cond.notify()
        return seq.id

    def cancel(self, seq_id: int) -> None:
        """Ask the engine to drop a sequence; its slot is freed at the next step."""
        with self._cond:
            seq = self._by_id.get(seq_id)
            if seq is not None:
                seq.cancel = True
                self._cond.notify()

    def stream(self, request: GenerationRequest) -> Iterator[StepOutput]:
        """Blocking iterator over a request's events; closing it early cancels the request."""
        events: queue.Queue[StepOutput] = queue.Queue()
        seq_id = self.submit(request, events.put)
        try:
            while True:
                event = events.get()
                yield event
                if event.finished:
                    return
        finally:
            self.cancel(seq_id)

    def generate(self, request: GenerationRequest) -> list[int]:
        """All new tokens of one request (raises if the engine reports an error)."""
        tokens: list[int] = []
        for event in self.stream(request):
            if event.error:
                raise RuntimeError(event.error)
            tokens.extend(event.tokens)
        return tokens

    @property
    def active_count(self) -> int:
        return len(self._active)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # -- engine thread ----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self._active:
                    self._cond.wait()
                if self._stop:
                    pending = list(self._waiting) + self._active
                    self._waiting.clear()
                    break
            try:
                self._step()
            except Exception as exc:  # keep serving: fail the sequences in flight only
                log.exception("engine step failed")
                for seq in list(self._active):
                    self._finish(seq, StepOutput([], True, FinishReason.ERROR, str(exc)))
            self._observe()
        for seq in pending:
            self._emit(seq, StepOutput([], True, FinishReason.CANCELLED, "engine shut down"))

    def _observe(self) -> None:
        counts = (len(self._active), len(self._waiting))
        if self._observer is not None and counts != self._observed:
            self._observed = counts
            try:
                self._observer(*counts)
            except Exception:  # metrics must never stop generation
                log.exception("engine observer failed")

    def _cancelled(self, seq: _Sequence) -> bool:
        if seq.cancel:
            return True
        if seq.is_cancelled is None:
            return False
        now = time.monotonic()
        if now - seq.probed_at < self._probe_interval:
            return False
        seq.probed_at = now
        try:
            return bool(seq.is_cancelled())
        except Exception:  # the probe itself failing means the client is gone
            log.exception("cancellation probe failed; dropping the sequence")
            return True

    def _step(self) -> None:
        for seq in [s for s in self._active if self._cancelled(s)]:
            self._finish(seq, StepOutput([], True, FinishReason.CANCELLED))
        self._admit()
        if not self._active:
            return
        logits = self.runner.decode(
            [s.last_token for s in self._active], [s.length for s in self._active]
        )
        tokens = pick_tokens(logits, [s.sampler for s in self._active])
        stepped = list(self._active)
        for seq in stepped:  # every cache grew by one before any slot moves
            seq.length += 1
        for seq, token in zip(stepped, tokens, strict=True):
            self._accept(seq, token)

    def _admit(self) -> None:
        """Move waiting requests into free slots and prefill them together, packed.

        Requests are taken in arrival order while a slot is free, the KV-token budget
        (``max_tokens``) allows and the packed prompts stay within ``max_prefill_tokens``
        (a longer prompt still goes, alone). One packed prefill reads every weight once for
        all of them; 16 chat prompts of 35-60 tokens took half the time of one at a time.
        """
        batch: list[_Sequence] = []
        with self._cond:
            reserved = sum(s.request.reserved_tokens for s in self._active)
            prompt_tokens = 0
            while self._waiting and len(self._active) + len(batch) < self.limits.max_active:
                seq = self._waiting[0]
                if self._cancelled(seq):
                    self._waiting.popleft()
                    self._drop_id(seq)
                    self._emit(seq, StepOutput([], True, FinishReason.CANCELLED))
                    continue
                length = len(seq.request.input_ids)
                if self._active or batch:
                    if reserved + seq.request.reserved_tokens > self.limits.max_tokens:
                        break
                    if batch and prompt_tokens + length > self.limits.max_prefill_tokens:
                        break
                self._waiting.popleft()
                batch.append(seq)
                reserved += seq.request.reserved_tokens
                prompt_tokens += length
        if not batch:
            return
        for seq in batch:
            seq.slot = len(self._active)
            self._active.append(seq)
        try:
            logits = self._prefill(batch)
        except Exception as exc:
            log.exception("prefill failed")
            for seq in batch:
                self._finish(seq, StepOutput([], True, FinishReason.ERROR, str(exc)))
            return
        for seq in batch:  # every cache is filled before any slot moves
            seq.length = len(seq.request.input_ids)
        tokens = pick_tokens(logits, [s.sampler for s in batch])
        for seq, token in zip(batch, tokens, strict=True):
            self._accept(seq, token)

    def _prefill(self, batch: list[_Sequence]) -> torch.Tensor:
        """One packed prefill of ``batch``, reusing cached prompt prefixes where there are."""
        prompts = [s.request.input_ids for s in batch]
        slots = [s.slot for s in batch]
        cached = [0] * len(batch)
        if self.prefixes is not None:
            for b, (slot, ids) in enumerate(zip(slots, prompts, strict=True)):
                stored, cached[b] = self.prefixes.lookup(ids)
                if stored is not None:
                    self.runner.load_prefix(slot, stored.keys, stored.values, cached[b])
        logits = self.runner.prefill_batch(slots, prompts, cached)
        if self.prefixes is not None:
            for slot, ids in zip(slots, prompts, strict=True):
                self.prefixes.insert(ids, lambda n, slot=slot: self.runner.save_prefix(slot, n))
        if self._on_prefill is not None:
            reused = sum(cached)
            try:
                self._on_prefill(sum(len(ids) for ids in prompts) - reused, reused)
            except Exception:  # metrics must never stop generation
                log.exception("engine prefill callback failed")
        return logits

    def _accept(self, seq: _Sequence, token: int) -> None:
        """Record a sampled token: emit it, or finish at end_id / the length limit."""
        end_id = seq.request.end_id if seq.request.end_id is not None else self.default_end_id
        if token == end_id:
            self._finish(seq, StepOutput([], True, FinishReason.END_ID))
            return
        seq.generated += 1
        seq.last_token = token
        if seq.generated >= seq.request.max_new_tokens:
            self._finish(seq, StepOutput([token], True, FinishReason.LENGTH))
        elif not self._emit(seq, StepOutput([token])):
            self._finish(seq, StepOutput([], True, FinishReason.CANCELLED))

    def _emit(self, seq: _Sequence, event: StepOutput) -> bool:
        try:
            seq.sink(event)
            return True
        except Exception:  # the sink failing (client gone) must not stop the engine
            log.exception("sending generated tokens failed; dropping the sequence")
            return False

    def _drop_id(self, seq: _Sequence) -> None:
        with self._cond:
            self._by_id.pop(seq.id, None)

    def _finish(self, seq: _Sequence, event: StepOutput) -> None:
        """Retire ``seq``: free its slot (moving the last sequence into it) and notify."""
        index = self._active.index(seq)
        last = self._active.pop()
        if last is not seq:
            self.runner.move_slot(last.slot, index, last.length)
            last.slot = index
            self._active[index] = last
        self._drop_id(seq)
        self._emit(seq, event)
