"""The worker: claims queued jobs while the engine has a free batch slot, runs them, and
records what happens to them.

It talks only to the JobQueue, the engine and the JobRecorder (store + EventBus), so it
can run in any process that has the engine. Jobs go to the engine only while it has a
free slot, so the engine's own queue stays short and the queue decides the order. Tokens
are announced one event each as they come and stored once, with the result.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from datetime import UTC, datetime

from app.inference.engine import Engine, RequestHandle
from app.inference.types import Finished, FinishReason, Started, TokenStep

from app.logs import bind_job

from .domain import Job, JobError, JobStatus, TokenRecord
from .events import GenerationCompleted, GenerationStarted, GenerationCancelled, TokenGenerated, epoch_to_dt
from .queue import JobQueue, QueuedJob
from .recorder import JobRecorder

log = logging.getLogger(__name__)

STATUS_FOR = {
    FinishReason.STOP: JobStatus.SUCCEEDED,
    FinishReason.LENGTH: JobStatus.SUCCEEDED,
    FinishReason.STOP_SEQUENCE: JobStatus.SUCCEEDED,
    FinishReason.CANCELLED: JobStatus.CANCELLED,
    FinishReason.DEADLINE: JobStatus.EXPIRED,
    FinishReason.ERROR: JobStatus.FAILED,
}


class Worker:
    """Runs claimed jobs on the engine. It is also the in-process Canceller: it stops the
    jobs it runs."""

    def __init__(self, queue: JobQueue, engine: Engine, recorder: JobRecorder) -> None:
        self._queue = queue
        self._engine = engine
        self._recorder = recorder
        self._running: dict[str, RequestHandle] = {}
        self._slot_free = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None
        engine.on_slot_free = self._slot_free.set

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._claim_loop(), name="job-worker")

    async def stop(self) -> None:
        if self._loop_task:
            self._loop_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def cancel(self, job_id: str, reason: FinishReason = FinishReason.CANCELLED) -> bool:
        """Canceller: asks the engine to stop a job running here, within a decode step.
        False when no job of that id runs here."""
        handle = self._running.get(job_id)
        if handle is None:
            return False
        handle.cancel(reason)
        return True

    async def _claim_loop(self) -> None:
        while True:
            while self._engine.has_capacity():
                claimed = await self._queue.claim(1)
                if not claimed:
                    break
                await self._start(claimed[0])
            # Wait for new work or a free slot, whichever comes first.
            waits = [asyncio.ensure_future(self._queue.wait_for_work()), asyncio.ensure_future(self._slot_free.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            self._slot_free.clear()

    async def _start(self, queued: QueuedJob) -> None:
        job = queued.job
        if job.deadline_at is not None and datetime.now(UTC) >= job.deadline_at:
            await self._recorder.end_unstarted(job, JobStatus.EXPIRED, FinishReason.DEADLINE)
            return
        handle = self._engine.submit(queued.prompt_ids, job.spec.sampling, request_id=job.id)
        self._running[job.id] = handle
        task = asyncio.create_task(self._follow(job, handle, len(queued.prompt_ids)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _follow(self, job: Job, handle: RequestHandle, prompt_tokens: int) -> None:
        bind_job(job.id)  # this task's log lines name the job
        bus, store = self._recorder.bus, self._recorder.store
        tokens: list[TokenRecord] = []
        started: float | None = None
        marked: asyncio.Task | None = None
        deadline_timer = None
        if job.deadline_at is not None:
            delay = max(0.0, job.deadline_at.timestamp() - time.time())
            deadline_timer = asyncio.get_running_loop().call_later(delay, handle.cancel, FinishReason.DEADLINE)
        try:
            async for out in handle:
                if isinstance(out, TokenStep):
                    record = TokenRecord(out.index, out.token_id, out.text, out.logprob, out.alternatives, out.at)
                    event = await bus.append(TokenGenerated(job.id, epoch_to_dt(out.at), record))
                    tokens.append(replace(record, seq=event.seq))
                elif isinstance(out, Started):
                    started = out.at
                    # Stored in the background: the first token must not wait for a commit.
                    marked = asyncio.create_task(store.mark_running(job.id, epoch_to_dt(out.at)))
                    await bus.append(GenerationStarted(job.id, epoch_to_dt(out.at), self._recorder.model,
                                                       prompt_tokens))
                elif isinstance(out, Finished):
                    if marked is not None:
                        await marked  # RUNNING is stored before the end is
                    await self._finish(job, out, tokens, started, prompt_tokens)
        except asyncio.CancelledError:
            handle.cancel()
            raise
        except Exception:
            log.exception("job %s: recording failed", job.id)
            handle.cancel()
            await self._recorder.fail(job, JobError("INTERNAL", "the job could not be recorded"))
        finally:
            if deadline_timer is not None:
                deadline_timer.cancel()
            self._running.pop(job.id, None)

    async def _finish(self, job: Job, out: Finished, tokens: list[TokenRecord], started: float | None,
                      prompt_tokens: int) -> None:
        status = STATUS_FOR[out.reason]
        if status is JobStatus.FAILED:
            log.error("job %s failed in the engine: %s", job.id, out.error)
            await self._recorder.fail(job, JobError("ENGINE_ERROR", "the model failed while generating; try again"))
            return
        result = self._recorder.result(job, tokens=tokens, reason=out.reason, prompt_tokens=prompt_tokens,
                                       started=started, finished=out.at)
        at = epoch_to_dt(out.at)
        if not await self._recorder.end(job, status, at, result=result):
            return
        if status is JobStatus.SUCCEEDED:
            await self._recorder.bus.append(GenerationCompleted(job.id, at, result))
        else:
            await self._recorder.bus.append(GenerationCancelled(job.id, at, result, status))
