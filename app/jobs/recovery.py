"""Crash recovery: jobs a previous process left QUEUED or RUNNING."""

from __future__ import annotations

import logging
from collections.abc import Callable

from .domain import GenerationSpec, JobError, JobStatus
from .queue import JobQueue
from .recorder import JobRecorder

log = logging.getLogger(__name__)


async def recover(recorder: JobRecorder, queue: JobQueue, encode: Callable[[GenerationSpec], list[int]],
                  max_attempts: int) -> None:
    """QUEUED jobs are queued again; RUNNING ones (their worker died) run again, unless they
    already used every attempt: then they fail with WORKER_LOST."""
    store = recorder.store
    for job in await store.by_status(JobStatus.QUEUED, JobStatus.RUNNING):
        if job.status is JobStatus.RUNNING:
            if job.attempts >= max_attempts:
                log.error("job %s: worker lost %d times; failing it", job.id, job.attempts)
                # Through the queue and out again, so the place its failure frees was taken.
                await queue.put(job, [], reserved=False)
                await queue.remove(job.id)
                await recorder.queued(job, 0)
                await recorder.fail(job, JobError("WORKER_LOST", f"the worker stopped during all {job.attempts} "
                                                  "attempts"))
                continue
            await store.requeue(job.id)
        log.info("re-queueing job %s left %s by a previous run", job.id, job.status.value)
        position = await queue.put(job, encode(job.spec), reserved=False)
        await recorder.queued(job, position)
