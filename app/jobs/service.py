"""JobService: submit, get, list, cancel and follow generation jobs.

Every read and write is scoped to the caller: another key's job looks exactly like a
missing one. The service stores jobs and puts them on the JobQueue; a Worker runs them;
their events come from the EventBus (or, long after they ended, from the database).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Protocol

from app.inference.types import FinishReason
from app.logs import bind_job

from .admission import Admission
from .domain import Caller, GenerationSpec, Job, JobOptions, JobProgress, JobStatus, Page
from .errors import InvalidInput, NotFound
from .events import EventBus, JobEvent, JobQueued, TokenGenerated, flatten, replay_finished
from .persistence.store import IdempotentReplay, JobStore
from .queue import JobQueue
from .quotas import QuotaStore
from .recorder import JobRecorder
from .validation import check_page, valid_cursor

log = logging.getLogger(__name__)

CANCEL_WAIT_SECONDS = 5.0  # how long cancelJob waits for a running job's end to be stored
POSITION_INTERVAL_SECONDS = 1.0  # how often a follower of a queued job looks whether its place changed


class Canceller(Protocol):
    """Asks whoever runs a job to stop it within one decode step (a Worker, in process)."""

    async def cancel(self, job_id: str, reason: FinishReason = FinishReason.CANCELLED) -> bool: ...


def visible(item_owner: str | None, caller: Caller) -> bool:
    return caller.admin or item_owner == caller.owner


class JobService:
    def __init__(self, *, store: JobStore, queue: JobQueue, bus: EventBus, quotas: QuotaStore,
                 recorder: JobRecorder, canceller: Canceller, admission: Admission,
                 position_interval: float = POSITION_INTERVAL_SECONDS) -> None:
        self._store = store
        self._queue = queue
        self._bus = bus
        self._quotas = quotas
        self._recorder = recorder
        self._canceller = canceller
        self._admission = admission
        self._position_interval = position_interval

    # ---- submitting -----------------------------------------------------------------------

    async def submit(self, spec: GenerationSpec, options: JobOptions | None, caller: Caller) -> Job:
        """Validate, persist a QUEUED job and queue it. Nothing is stored when input is bad.

        The same idempotency key (for the same caller) returns the job it created first.
        """
        options = options or JobOptions()
        self._admission.check_options(options, caller)
        prompt_ids = self._admission.check(spec)
        job = self._admission.new_job(spec, options, caller, datetime.now(UTC))
        bind_job(job.id)
        await self._admission.reserve(caller, [job], [prompt_ids])
        try:
            # Shielded: a caller that goes away (a dropped websocket) must not leave a stored
            # job that is not queued. _persist gives back the reservations itself when it
            # fails, so they cannot leak even if nobody awaits it any more.
            position = await asyncio.shield(self._persist(job, prompt_ids))
        except IdempotentReplay as exc:
            if exc.job.spec != spec:
                raise InvalidInput(
                    "this idempotencyKey was already used with a different input", field="idempotencyKey"
                ) from None
            return await self._with_position(exc.job)
        return replace(job, queue_position=position)

    async def _persist(self, job: Job, prompt_ids: list[int]) -> int:
        try:
            await self._store.insert(job)
        except BaseException:
            await self._admission.release(job.owner, [job])
            raise
        position = await self._queue.put(job, prompt_ids)
        await self._recorder.queued(job, position)
        return position

    # ---- reading --------------------------------------------------------------------------

    async def _with_position(self, job: Job) -> Job:
        return replace(job, queue_position=await self._queue.position(job.id))

    async def get(self, job_id: str, caller: Caller) -> Job | None:
        job = await self._store.get(job_id)
        if job is None or not visible(job.owner, caller):
            return None
        return await self._with_position(job)

    async def _get_or_404(self, job_id: str, caller: Caller) -> Job:
        job = await self.get(job_id, caller)
        if job is None:
            raise NotFound(f"no job with id {job_id!r}")
        return job

    async def list_jobs(self, caller: Caller, *, status: JobStatus | None = None, batch_id: str | None = None,
                        first: int = 20, after: str | None = None, with_results: bool = True,
                        input_order: bool = False) -> Page:
        """with_results=False: every job's `result` is None (not read), for lists that do not show it.
        input_order (with batch_id): the batch's jobs in the order of its inputs, not newest first."""
        check_page(first)
        with valid_cursor():
            page = await self._store.list_jobs(owner=caller.owner, all_owners=caller.admin, status=status,
                                               batch_id=batch_id, first=first, after=after, with_results=with_results,
                                               input_order=input_order)
        return replace(page, items=[await self._with_position(j) for j in page.items])

    async def progress(self, job: Job) -> JobProgress:
        """What `job` (as the caller read it) has produced so far. A running job's tokens
        come from its event log (the same stream `jobEvents` replays), so this works with
        any EventBus; an ended job's from its result."""
        max_tokens = job.spec.sampling.max_tokens
        if job.result is not None:
            return JobProgress(job.result.text, job.result.usage.completion_tokens, max_tokens)
        if job.status is not JobStatus.RUNNING:
            return JobProgress("", 0, max_tokens)
        last = await self._bus.last_seq(job.id)
        stream = await self._bus.follow(job.id, 0) if last else None
        texts: list[str] = []
        if stream is not None:
            async with contextlib.aclosing(stream):
                async for event in stream:
                    if isinstance(event, TokenGenerated):
                        texts.append(event.token.text)
                    if event.seq >= last:  # what was there when asked; do not wait for more
                        break
        return JobProgress("".join(texts), len(texts), max_tokens)

    # ---- cancelling -----------------------------------------------------------------------

    async def cancel(self, job_id: str, caller: Caller) -> Job:
        """A queued job ends at once; a running one stops within a decode step, and this
        waits (a few seconds at most) until its end is stored."""
        job = await self._get_or_404(job_id, caller)
        bind_job(job.id)
        if not job.status.terminal:
            await self.cancel_active(job)
        return await self.get(job_id, caller)

    async def cancel_active(self, job: Job) -> None:
        """Stops an active job (one that may have ended meanwhile: then nothing happens)."""
        if await self._queue.remove(job.id) is not None:
            await self._recorder.end_unstarted(job, JobStatus.CANCELLED, FinishReason.CANCELLED)
            # It was stored, queued and announced (maybe with a webhook) for nothing.
            await self._quotas.charge_request(job.owner)
            return
        after = await self._bus.last_seq(job.id)
        if await self._canceller.cancel(job.id) and after is not None:
            try:
                async with asyncio.timeout(CANCEL_WAIT_SECONDS):
                    await self._until_ended(job.id, after)
            except TimeoutError:
                log.warning("job %s: cancel not settled within %.1fs", job.id, CANCEL_WAIT_SECONDS)

    async def _until_ended(self, job_id: str, after: int) -> None:
        stream = await self._bus.follow_batches(job_id, after)
        if stream is not None:
            async for _ in stream:
                pass

    # ---- following ------------------------------------------------------------------------

    async def events(self, job_id: str, after: int, caller: Caller) -> AsyncIterator[JobEvent]:
        """Replay events with seq > after, then follow live ones to the end."""
        return flatten(await self.event_batches(job_id, after, caller))

    async def event_batches(self, job_id: str, after: int, caller: Caller) -> AsyncIterator[list[JobEvent]]:
        """events(), as lists: each holds what had arrived when the consumer asked for more
        (EventBus.follow_batches)."""
        if after < 0:
            raise InvalidInput("`after` must be 0 or more", field="after")
        job = await self._get_or_404(job_id, caller)
        bind_job(job.id)
        # An ended job's last seq is known, and an `after` past it can never be reached.
        ended = await self._bus.ended(job.id)
        last = None
        if ended:
            last = await self._bus.last_seq(job.id)
        elif ended is None and job.status.terminal:
            last = len(replay_finished(job))
        if last is not None and after > last:
            raise InvalidInput(f"`after` is past this job's last event (seq {last})", field="after", lastSeq=last)
        return self._follow(job, after)

    def own_events(self, job: Job) -> AsyncIterator[list[JobEvent]]:
        """event_batches from the start, for the job that submit() just returned to its caller:
        without reading it back from the store (the caller may see it; it has no events to skip)."""
        return self._follow(job, 0)

    async def _follow(self, job: Job, after: int) -> AsyncIterator[list[JobEvent]]:
        stream = await self._bus.follow_batches(job.id, after)
        if stream is not None:
            async for batch in self._with_positions(job.id, stream):
                yield batch
            return
        if not job.status.terminal:  # it ended (and left the bus) after it was read: read its end
            job = await self._store.get(job.id)
        events = [event for event in replay_finished(job) if event.seq > after]
        if events:
            yield events

    async def _with_positions(self, job_id: str, stream: AsyncIterator[list[JobEvent]],
                              ) -> AsyncIterator[list[JobEvent]]:
        """The stream's batches, and while the job waits in the queue (its last event is
        JobQueued), that JobQueued again (a batch of its own) with the new `position` each
        time its place changes. These updates are not stored in the log (they would shift every later
        seq): they repeat the seq of the JobQueued they update, and a replay shows only the
        stored one. The queue is asked, so this works with any JobQueue and EventBus."""
        queued: JobQueued | None = None
        pending: asyncio.Future | None = None
        try:
            while True:
                if queued is None:  # the common path: no task per batch
                    try:
                        batch = await anext(stream)
                    except StopAsyncIteration:
                        return
                else:
                    if pending is None:
                        pending = asyncio.ensure_future(anext(stream))
                    done, _ = await asyncio.wait({pending}, timeout=self._position_interval)
                    if not done:
                        position = await self._queue.position(job_id)
                        if position is not None and position != queued.position:
                            queued = replace(queued, position=position, at=datetime.now(UTC))
                            yield [queued]
                        continue
                    finished, pending = pending, None
                    try:
                        batch = finished.result()
                    except StopAsyncIteration:
                        return
                queued = batch[-1] if isinstance(batch[-1], JobQueued) else None
                yield batch
        finally:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
            if (aclose := getattr(stream, "aclose", None)) is not None:
                with contextlib.suppress(RuntimeError):
                    await aclose()
