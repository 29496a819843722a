"""The worker: claims queued jobs while the engine has a free batch slot, runs them, and
records what happens to them.

On a shared queue (PostgresJobQueue) each claim is a lease: a heartbeat renews the leases
of the jobs running here, and this worker stores a job's start and end only while it still
holds the lease (a job re-queued after its lease lapsed is another worker's now).

It talks only to the JobQueue, the engine and the JobRecorder (store + EventBus), so it
can run in any process that has the engine. Jobs go to the engine only while it has a
free slot, so the engine's own queue stays short and the queue decides the order. Tokens
are announced one event each as they come and stored once, with the result.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from datetime import UTC, datetime

from app.inference.engine import Engine, RequestHandle
from app.inference.types import Finished, FinishReason, Started, TokenStep

from app.logs import bind_job

from .domain import Job, JobError, JobStatus, TokenRecord
from .events import GenerationCompleted, GenerationStarted, GenerationCancelled, TokenGenerated, epoch_to_dt, numbered
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
        # The lease holder's name on a shared queue; None in process (no leases).
        self.worker_id: str | None = getattr(queue, "worker_id", None)
        self.jobs_started = 0
        self._running: dict[str, RequestHandle] = {}
        # Cancels for jobs not running here yet: on a shared queue a job can be claimed (and
        # so no longer removable from the queue) a moment before it reaches the engine.
        self._early_cancels: OrderedDict[str, float] = OrderedDict()
        self._slot_free = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._loops: list[asyncio.Task] = []
        engine.on_slot_free = self._slot_free.set

    def start(self) -> None:
        self._loops.append(asyncio.create_task(self._claim_loop(), name="job-worker"))
        if hasattr(self._queue, "renew"):
            self._loops.append(asyncio.create_task(self._heartbeat(), name="job-leases"))

    async def stop(self) -> None:
        for task in self._loops:
            task.cancel()
        running = list(self._running)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._loops, *self._tasks, return_exceptions=True)
        if running and hasattr(self._queue, "release"):
            # A shared queue: the jobs cut short here run again elsewhere, from the next reaper
            # pass rather than after a whole lease.
            try:
                await self._queue.release(running)
            except Exception:
                log.warning("could not release the leases of %d jobs; they lapse by themselves", len(running))

    async def cancel(self, job_id: str, reason: FinishReason = FinishReason.CANCELLED) -> bool:
        """Canceller: asks the engine to stop a job running here, within a decode step.
        False when no job of that id runs here (it is remembered a while, in case it is
        about to start here)."""
        handle = self._running.get(job_id)
        if handle is None:
            now = time.monotonic()
            self._early_cancels[job_id] = now
            while self._early_cancels and (len(self._early_cancels) > 1024
                                           or next(iter(self._early_cancels.values())) < now - 60):
                self._early_cancels.popitem(last=False)
            return False
        handle.cancel(reason)
        return True

    async def _claim_loop(self) -> None:
        while True:
            while (free := self._engine.free_slots()) > 0:
                claimed = await self._queue.claim(free)  # one statement for all free slots
                if not claimed:
                    break
                for queued in claimed:
                    await self._start(queued)
            # Wait for new work or a free slot, whichever comes first.
            waits = [asyncio.ensure_future(self._queue.wait_for_work()), asyncio.ensure_future(self._slot_free.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            self._slot_free.clear()

    async def _heartbeat(self) -> None:
        """Renews the leases of the jobs running here, every third of a lease. A job whose
        lease was taken back (this process stalled past it) is stopped here: it runs again
        elsewhere, and nothing more of this attempt is stored."""
        interval = self._queue.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            ids = list(self._running)
            try:
                held = await self._queue.renew(ids)
            except Exception:
                log.warning("could not renew the leases of %d jobs; retrying", len(ids), exc_info=True)
                continue
            for job_id in ids:
                handle = self._running.get(job_id)
                if job_id not in held and handle is not None:
                    log.warning("job %s: lease lost (re-queued for another worker); stopping it here", job_id)
                    handle.cancel()

    async def _start(self, queued: QueuedJob) -> None:
        job = queued.job
        self.jobs_started += 1
        if self._early_cancels.pop(job.id, None) is not None:
            await self._recorder.end_unstarted(job, JobStatus.CANCELLED, FinishReason.CANCELLED)
            return
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
                    tokens.append(numbered(record, event.seq))
                elif isinstance(out, Started):
                    started = out.at
                    # Stored in the background: the first token must not wait for a commit.
                    marked = asyncio.create_task(store.mark_running(job.id, epoch_to_dt(out.at),
                                                                    claimed_by=self.worker_id))
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
            await self._recorder.fail(job, JobError("INTERNAL", "the job could not be recorded"),
                                      claimed_by=self.worker_id)
        finally:
            if deadline_timer is not None:
                deadline_timer.cancel()
            self._running.pop(job.id, None)

    async def _finish(self, job: Job, out: Finished, tokens: list[TokenRecord], started: float | None,
                      prompt_tokens: int) -> None:
        status = STATUS_FOR[out.reason]
        if status is JobStatus.FAILED:
            log.error("job %s failed in the engine: %s", job.id, out.error)
            await self._recorder.fail(job, JobError("ENGINE_ERROR", "the model failed while generating; try again"),
                                      claimed_by=self.worker_id)
            return
        result = self._recorder.result(job, tokens=tokens, reason=out.reason, prompt_tokens=prompt_tokens,
                                       started=started, finished=out.at)
        at = epoch_to_dt(out.at)
        if not await self._recorder.end(job, status, at, result=result, claimed_by=self.worker_id):
            return
        if status is JobStatus.SUCCEEDED:
            await self._recorder.bus.append(GenerationCompleted(job.id, at, result))
        else:
            await self._recorder.bus.append(GenerationCancelled(job.id, at, result, status))
