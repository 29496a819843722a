"""JobRecorder: the one place a job's milestones are stored and announced.

A job's end is written once (the store refuses a second end), and only the process
whose write changed the row frees the owner's place in the queue, settles its token
reservation and announces the terminal event. The worker calls this as a job runs; the
service calls it for jobs that end without running (cancelled while queued, failed by
recovery).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from app.inference.types import FinishReason, ModelInfo

from . import metrics
from .domain import GenerationResult, Job, JobError, JobStatus
from .ending import Ending
from .events import EventBus, GenerationCancelled, GenerationFailed, JobQueued, epoch_to_dt
from .queue import JobQueue
from .quotas import QuotaStore
from .results import build_result
from .persistence.store import JobStore

log = logging.getLogger(__name__)


class JobRecorder:
    def __init__(self, *, store: JobStore, queue: JobQueue, bus: EventBus, quotas: QuotaStore, model: ModelInfo,
                 review_threshold: float, on_webhook_queued: Callable[[], None] = lambda: None) -> None:
        self.store = store
        self.bus = bus
        self.model = model
        self.review_threshold = review_threshold
        self._queue = queue
        self._quotas = quotas
        self._on_webhook_queued = on_webhook_queued

    async def queued(self, job: Job, position: int) -> None:
        metrics.JOBS_SUBMITTED.inc()
        await self.bus.append(JobQueued(job.id, job.created_at, position))

    def result(self, job: Job, *, tokens, reason: FinishReason, prompt_tokens: int, started: float | None,
               finished: float) -> GenerationResult:
        return build_result(tokens=tokens, reason=reason, model=self.model, prompt_tokens=prompt_tokens,
                            created=job.created_at.timestamp(), started=started, finished=finished,
                            review_threshold=self.review_threshold)

    async def end(self, job: Job, status: JobStatus, at: datetime, *, result: GenerationResult | None = None,
                  error: JobError | None = None, claimed_by: str | None = None) -> bool:
        """Stores the job's end (once); True when this call ended it. Frees its owner's
        place and settles its tokens; announcing the terminal event is the caller's.
        claimed_by: a worker ends a job only while it holds its lease (JobStore.finish)."""
        ended = await self.store.finish(job.id, Ending(status, at, result=result, error=error),
                                        claimed_by=claimed_by)
        if ended.webhooks_queued:
            self._on_webhook_queued()
        if not ended.changed:
            return False
        metrics.job_ended(status, result)
        await self._queue.done(job)
        await self._quotas.settle(job.id, result.usage.total_tokens if result else 0)
        return True

    async def end_unstarted(self, job: Job, status: JobStatus, reason: FinishReason) -> None:
        """Ends a job that never ran (cancelled while queued, or expired before it started)."""
        now = time.time()
        result = self.result(job, tokens=[], reason=reason, prompt_tokens=0, started=None, finished=now)
        at = epoch_to_dt(now)
        if await self.end(job, status, at, result=result):
            await self.bus.append(GenerationCancelled(job.id, at, result, status))

    async def fail(self, job: Job, error: JobError, *, claimed_by: str | None = None) -> None:
        at = datetime.now(UTC)
        if await self.end(job, JobStatus.FAILED, at, error=error, claimed_by=claimed_by):
            await self.bus.append(GenerationFailed(job.id, at, error))
