"""Job events and the per-job event log.

Every consumer of a job (the `generate` subscription, `jobEvents` re-attach, pollers,
webhooks) reads the same sequence: seq 1, 2, 3 ... An EventBus holds live jobs' streams
so a subscriber can replay what it missed and then follow; a finished job's stream is
rebuilt from its persisted row, so no bus must keep anything forever.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Protocol

from app.inference.types import ModelInfo

from .domain import GenerationResult, Job, JobError, JobStatus, TokenRecord


def numbered(item, seq: int):
    """A copy of a frozen event (or TokenRecord) with its seq: what dataclasses.replace gives
    for these plain dataclasses, without its generic path through __init__ (two per token)."""
    new = object.__new__(type(item))
    new.__dict__.update(item.__dict__)
    new.__dict__["seq"] = seq
    return new


@dataclass(frozen=True)
class JobQueued:
    job_id: str
    at: datetime
    seq: int = field(default=0, kw_only=True)  # numbered by EventBus.append
    position: int


@dataclass(frozen=True)
class GenerationStarted:
    job_id: str
    at: datetime
    seq: int = field(default=0, kw_only=True)  # numbered by EventBus.append
    model: ModelInfo
    prompt_tokens: int


@dataclass(frozen=True)
class TokenGenerated:
    job_id: str
    at: datetime
    seq: int = field(default=0, kw_only=True)  # numbered by EventBus.append
    token: TokenRecord


@dataclass(frozen=True)
class GenerationCompleted:
    job_id: str
    at: datetime
    seq: int = field(default=0, kw_only=True)  # numbered by EventBus.append
    result: GenerationResult


@dataclass(frozen=True)
class GenerationFailed:
    job_id: str
    at: datetime
    seq: int = field(default=0, kw_only=True)  # numbered by EventBus.append
    error: JobError


@dataclass(frozen=True)
class GenerationCancelled:
    job_id: str
    at: datetime
    seq: int = field(default=0, kw_only=True)  # numbered by EventBus.append
    result: GenerationResult
    status: JobStatus = JobStatus.CANCELLED  # CANCELLED, or EXPIRED for a deadline


JobEvent = JobQueued | GenerationStarted | TokenGenerated | GenerationCompleted | GenerationFailed | GenerationCancelled
TERMINAL = (GenerationCompleted, GenerationFailed, GenerationCancelled)


def epoch_to_dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


class EventBus(Protocol):
    """Where a job's events go and where its consumers read them.

    `append` is the only place that numbers events: it stores the event with the job's
    next seq (1, 2, 3 ...) whatever seq it came with. A job's stream ends with its
    terminal event. A bus keeps streams for a while after they end; for a job it does
    not know (ended long ago, or before this process), `follow` returns None and the
    caller replays the job from the database (`replay_finished`).
    """

    async def append(self, event: JobEvent) -> JobEvent: ...

    async def last_seq(self, job_id: str) -> int | None:
        """The seq of the job's last event so far; None when the bus has no stream for it."""

    async def ended(self, job_id: str) -> bool | None:
        """Whether the job's stream holds its terminal event; None when the bus has no stream."""

    async def follow_batches(self, job_id: str, after: int = 0) -> AsyncIterator[list[JobEvent]] | None:
        """Events with seq > after, then live ones up to the terminal event, in order, as
        lists: each holds what had arrived when the follower asked for more (one event when
        it keeps up). None when the bus has no stream for the job."""

    async def follow(self, job_id: str, after: int = 0) -> AsyncIterator[JobEvent] | None:
        """follow_batches, one event at a time (the buses inherit this)."""
        batches = await self.follow_batches(job_id, after)
        return None if batches is None else flatten(batches)


async def flatten(batches: AsyncGenerator[list[JobEvent], None]) -> AsyncIterator[JobEvent]:
    """Batches of events, one event at a time."""
    async with aclosing(batches):
        async for batch in batches:
            for event in batch:
                yield event


class _Stream:
    """One job's events in order, with live followers."""

    def __init__(self) -> None:
        self.events: list[JobEvent] = []
        # Followers waiting for the next event: one future each, set by append (an
        # asyncio.Condition costs a lock round trip per event on each side).
        self.waiters: list[asyncio.Future] = []

    @property
    def ended(self) -> bool:
        return bool(self.events) and isinstance(self.events[-1], TERMINAL)

    async def follow(self, after: int) -> AsyncIterator[list[JobEvent]]:
        sent = after
        while True:
            if sent < len(self.events):
                batch = self.events[sent:]
                sent += len(batch)
                yield batch
                if isinstance(batch[-1], TERMINAL):
                    return
                continue
            if self.ended:  # `after` was at or past the end: nothing more will come
                return
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            await waiter


class MemoryEventBus(EventBus):
    """The in-process EventBus: streams in a dict; the last `keep_ended` ended ones stay
    for cheap replay, older ones are rebuilt from the database.

    Few: every event kept is a few objects that each of Python's full collections walks,
    holding the GIL (the engine's thread waits for it between steps). With 512 ended streams
    of 128 tokens the server's collections took 110-143 ms each, every 10-15 s at 16 streams;
    with 64, 26-58 ms."""

    def __init__(self, keep_ended: int = 64) -> None:
        self._streams: dict[str, _Stream] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._keep_ended = keep_ended

    async def append(self, event: JobEvent) -> JobEvent:
        stream = self._streams.get(event.job_id)
        if stream is None:
            stream = self._streams[event.job_id] = _Stream()
        if stream.ended:
            raise RuntimeError(f"job {event.job_id}: event after the terminal one")
        event = numbered(event, len(stream.events) + 1)
        stream.events.append(event)
        if stream.waiters:
            waiters, stream.waiters = stream.waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        if isinstance(event, TERMINAL):
            self._retire(event.job_id)
        return event

    async def last_seq(self, job_id: str) -> int | None:
        stream = self._streams.get(job_id)
        return len(stream.events) if stream is not None else None

    async def ended(self, job_id: str) -> bool | None:
        stream = self._streams.get(job_id)
        return stream.ended if stream is not None else None

    async def follow_batches(self, job_id: str, after: int = 0) -> AsyncIterator[list[JobEvent]] | None:
        stream = self._streams.get(job_id)
        return stream.follow(after) if stream is not None else None

    def _retire(self, job_id: str) -> None:
        self._ended[job_id] = None
        while len(self._ended) > self._keep_ended:
            old, _ = self._ended.popitem(last=False)
            self._streams.pop(old, None)


def replay_finished(job: Job) -> list[JobEvent]:
    """Rebuild a finished job's full event sequence from what is persisted: the same
    events, numbered the same way (by position), as its live stream had."""
    events: list[JobEvent] = [JobQueued(job.id, job.created_at, 0)]
    result = job.result
    if result is not None and job.started_at is not None:
        events.append(GenerationStarted(job.id, job.started_at, result.model, result.usage.prompt_tokens))
        events.extend(TokenGenerated(job.id, epoch_to_dt(tok.at), tok) for tok in result.tokens)
    at = job.finished_at or job.created_at
    if job.status == JobStatus.SUCCEEDED and result is not None:
        events.append(GenerationCompleted(job.id, at, result))
    elif job.status in (JobStatus.CANCELLED, JobStatus.EXPIRED) and result is not None:
        events.append(GenerationCancelled(job.id, at, result, job.status))
    else:
        events.append(GenerationFailed(job.id, at, job.error or JobError("INTERNAL", "job ended without result")))
    return [replace(event, seq=seq) for seq, event in enumerate(events, 1)]
