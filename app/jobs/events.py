"""Job events and the per-job event log.

Every consumer of a job (the `generate` subscription, `jobEvents` re-attach, pollers,
webhooks) reads the same sequence: seq 1, 2, 3 ... Live jobs keep their log in memory so
a subscriber can replay what it missed and then follow; a finished job's log is rebuilt
from its persisted row, so nothing here must outlive the process.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

from app.inference.types import ModelInfo

from .domain import GenerationResult, Job, JobError, JobStatus, TokenRecord


@dataclass(frozen=True)
class JobQueued:
    job_id: str
    seq: int
    at: datetime
    position: int


@dataclass(frozen=True)
class GenerationStarted:
    job_id: str
    seq: int
    at: datetime
    model: ModelInfo
    prompt_tokens: int


@dataclass(frozen=True)
class TokenGenerated:
    job_id: str
    seq: int
    at: datetime
    token: TokenRecord


@dataclass(frozen=True)
class GenerationCompleted:
    job_id: str
    seq: int
    at: datetime
    result: GenerationResult


@dataclass(frozen=True)
class GenerationFailed:
    job_id: str
    seq: int
    at: datetime
    error: JobError


@dataclass(frozen=True)
class GenerationCancelled:
    job_id: str
    seq: int
    at: datetime
    result: GenerationResult
    status: JobStatus = JobStatus.CANCELLED  # CANCELLED, or EXPIRED for a deadline


JobEvent = JobQueued | GenerationStarted | TokenGenerated | GenerationCompleted | GenerationFailed | GenerationCancelled
TERMINAL = (GenerationCompleted, GenerationFailed, GenerationCancelled)


def epoch_to_dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


class EventLog:
    """One job's events in order, with live followers."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.events: list[JobEvent] = []
        self._changed = asyncio.Condition()

    @property
    def next_seq(self) -> int:
        return len(self.events) + 1

    @property
    def closed(self) -> bool:
        return bool(self.events) and isinstance(self.events[-1], TERMINAL)

    async def append(self, event: JobEvent) -> None:
        assert event.seq == self.next_seq, (event.seq, self.next_seq)
        self.events.append(event)
        async with self._changed:
            self._changed.notify_all()

    async def follow(self, after: int = 0) -> AsyncIterator[JobEvent]:
        """Events with seq > after, then live ones, ending after the terminal event."""
        sent = after
        while True:
            while sent < len(self.events):
                event = self.events[sent]
                sent += 1
                yield event
                if isinstance(event, TERMINAL):
                    return
            if self.closed:  # `after` was at or past the end: nothing more will come
                return
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.events) > sent)


def replay_finished(job: Job) -> list[JobEvent]:
    """Rebuild a finished job's full event sequence from what is persisted."""
    events: list[JobEvent] = [JobQueued(job.id, 1, job.created_at, 0)]
    result = job.result
    if result is not None and job.started_at is not None:
        events.append(GenerationStarted(job.id, 2, job.started_at, result.model, result.usage.prompt_tokens))
        for tok in result.tokens:
            events.append(TokenGenerated(job.id, len(events) + 1, epoch_to_dt(tok.at), tok))
    seq, at = len(events) + 1, job.finished_at or job.created_at
    if job.status == JobStatus.SUCCEEDED and result is not None:
        events.append(GenerationCompleted(job.id, seq, at, result))
    elif job.status in (JobStatus.CANCELLED, JobStatus.EXPIRED) and result is not None:
        events.append(GenerationCancelled(job.id, seq, at, result, job.status))
    else:
        events.append(GenerationFailed(job.id, seq, at, job.error or JobError("INTERNAL", "job ended without result")))
    return events
