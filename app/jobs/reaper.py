"""The reaper: on a shared queue, takes back what dead processes left, from any process.

Every process (API replica or worker) runs one, each a few times per lease; the queue's
`reap` locks what it takes (SKIP LOCKED), so two reapers never take the same job. Jobs
whose lease lapsed wait again (announced with a new JobQueued event), or fail WORKER_LOST
once they used every attempt; waiting jobs past their deadline end EXPIRED; jobs stored
but never queued (their process died in between) are queued. A starting
process runs it once instead of the in-process crash recovery: it never touches a job
whose lease is live.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from app.inference.types import FinishReason

from .domain import GenerationSpec, JobError, JobStatus
from .events import JobQueued
from .pg_leases import Reaped
from .pg_queue import PostgresJobQueue
from .recorder import JobRecorder

log = logging.getLogger(__name__)


class Reaper:
    def __init__(self, queue: PostgresJobQueue, recorder: JobRecorder, encode: Callable[[GenerationSpec], list[int]],
                 *, max_attempts: int, interval: float) -> None:
        self._queue = queue
        self._encode = encode
        self._recorder = recorder
        self._max_attempts = max_attempts
        self._interval = interval
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="job-reaper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.run_once()
            except Exception:
                log.warning("reaping failed; retrying", exc_info=True)

    async def run_once(self) -> Reaped:
        reaped = await self._queue.reap(max_attempts=self._max_attempts)
        for job_id in reaped.requeued:
            log.warning("job %s: its worker stopped renewing its lease; queued again", job_id)
            position = await self._queue.position(job_id)
            await self._recorder.bus.append(JobQueued(job_id, datetime.now(UTC), position or 0))
        for lost in reaped.lost:
            job = lost.job
            log.error("job %s: worker lost %d times; failing it", job.id, job.attempts)
            await self._recorder.fail(job, JobError("WORKER_LOST", f"the worker stopped during all {job.attempts} "
                                                    "attempts"))
        for expired in reaped.expired:
            await self._recorder.end_unstarted(expired.job, JobStatus.EXPIRED, FinishReason.DEADLINE)
        for orphan in reaped.orphans:
            log.warning("job %s was stored but never queued (its process stopped); queueing it", orphan.job.id)
            position = await self._queue.put(orphan.job, self._encode(orphan.job.spec), reserved=False)
            await self._recorder.queued(orphan.job, position)
        return reaped
