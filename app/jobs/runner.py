"""The runner: feeds queued jobs to the engine and records what happens to them.

Queued jobs wait here and go to the engine only while it has a free batch slot, so the
engine's own queue stays short and the order is decided here: highest priority first;
within a priority, round-robin across owners (API keys), FIFO within an owner. The
round-robin is virtual-time fair queueing: each job gets a tag one past the larger of
its owner's last tag and the tag last dispatched, so a key with 100 queued jobs delays
another key's single job by about one turn, not by 100. For each running job the runner turns engine outputs into
job events (the in-memory EventLog every consumer follows) and persists the start and
the end of the job; tokens are persisted once, with the result.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from app.inference.engine import Engine, RequestHandle
from app.inference.types import Finished, FinishReason, ModelInfo, Started, TokenStep

from .domain import Job, JobError, JobStatus, TokenRecord
from .events import (
    EventLog,
    GenerationCancelled,
    GenerationCompleted,
    GenerationFailed,
    GenerationStarted,
    JobQueued,
    TokenGenerated,
    epoch_to_dt,
)
from .results import build_result
from .store import JobStore

log = logging.getLogger(__name__)

_STATUS_FOR = {
    FinishReason.STOP: JobStatus.SUCCEEDED,
    FinishReason.LENGTH: JobStatus.SUCCEEDED,
    FinishReason.STOP_SEQUENCE: JobStatus.SUCCEEDED,
    FinishReason.CANCELLED: JobStatus.CANCELLED,
    FinishReason.DEADLINE: JobStatus.EXPIRED,
    FinishReason.ERROR: JobStatus.FAILED,
}


@dataclass(order=True)
class _Entry:
    sort_key: tuple[int, int, int]  # (-priority, fair-queueing tag, arrival)
    job: Job = field(compare=False)
    prompt_ids: list[int] = field(compare=False)


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        engine: Engine,
        model: ModelInfo,
        *,
        review_threshold: float,
        max_queued: int,
        keep_finished_logs: int = 512,
        on_webhook_queued: Callable[[], None] = lambda: None,
        on_job_end: Callable[[str, int], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        self._engine = engine
        self._model = model
        self._review_threshold = review_threshold
        self.max_queued = max_queued
        self._keep_finished = keep_finished_logs
        self._on_webhook_queued = on_webhook_queued
        self._on_job_end = on_job_end
        self._virtual_time: dict[int, int] = {}             # priority -> tag last dispatched
        self._owner_tag: dict[tuple[int, str | None], int] = {}
        self._active: Counter[str | None] = Counter()       # owner -> jobs claimed, queued or running
        self._claimed = 0  # queue places claimed by submissions not yet enqueued
        self._heap: list[_Entry] = []
        self._queued: dict[str, _Entry] = {}
        self._running: dict[str, RequestHandle] = {}
        self._ended: dict[str, asyncio.Event] = {}  # set when a running job's end is persisted
        self._logs: dict[str, EventLog] = {}
        self._finished_logs: OrderedDict[str, None] = OrderedDict()
        self._order = itertools.count()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._dispatcher: asyncio.Task | None = None
        engine.on_slot_free = self._wake.set

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="job-dispatcher")

    async def stop(self) -> None:
        if self._dispatcher:
            self._dispatcher.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- queries --------------------------------------------------------------------------

    @property
    def queued_count(self) -> int:
        """Jobs waiting, counting places claimed by submissions still being stored."""
        return len(self._queued) + self._claimed

    def active_count(self, owner: str | None) -> int:
        return self._active[owner]

    def queue_position(self, job_id: str) -> int | None:
        """0 = next to start. None when the job is not waiting here."""
        entry = self._queued.get(job_id)
        if entry is None:
            return None
        return sum(1 for e in self._queued.values() if e.sort_key < entry.sort_key)

    def event_log(self, job_id: str) -> EventLog | None:
        return self._logs.get(job_id)

    # ---- commands -------------------------------------------------------------------------

    def claim(self, owner: str | None, n: int = 1) -> None:
        """Takes n of the owner's slots and n queue places for jobs about to be stored.

        Synchronous, so a check of the counts and the claim happen with no await between
        them: concurrent submissions cannot all pass a limit that only one of them fits.
        Each claim ends in `enqueue(..., claimed=True)` or in `release`.
        """
        self._active[owner] += n
        self._claimed += n

    def release(self, owner: str | None, n: int = 1) -> None:
        """Gives back claimed places whose jobs will not be enqueued."""
        self._active[owner] -= n
        self._claimed -= n

    async def enqueue(self, job: Job, prompt_ids: list[int], *, claimed: bool = False) -> int:
        owner_key = (job.priority, job.owner)
        tag = max(self._virtual_time.get(job.priority, 0), self._owner_tag.get(owner_key, 0)) + 1
        self._owner_tag[owner_key] = tag
        entry = _Entry((-job.priority, tag, next(self._order)), job, prompt_ids)
        heapq.heappush(self._heap, entry)
        self._queued[job.id] = entry
        if claimed:
            self._claimed -= 1
        else:
            self._active[job.owner] += 1
        event_log = self._logs[job.id] = EventLog(job.id)
        position = self.queue_position(job.id) or 0
        await event_log.append(JobQueued(job.id, 1, job.created_at, position))
        self._wake.set()
        return position

    async def cancel(self, job_id: str, wait: float = 5.0) -> JobStatus | None:
        """The state the job was cancelled in (QUEUED or RUNNING); None when it was not
        active here. A queued job ends at once; a running one stops within a decode step,
        and this waits (up to `wait` s) until its end is stored."""
        entry = self._queued.pop(job_id, None)
        if entry is not None:
            # Out of the heap now: a submit-and-cancel loop must not grow it while the
            # engine is busy (the heap is at most max_queued long, so O(n) is fine).
            self._heap.remove(entry)
            heapq.heapify(self._heap)
            await self._end_unstarted(entry.job, JobStatus.CANCELLED, FinishReason.CANCELLED)
            return JobStatus.QUEUED
        handle = self._running.get(job_id)
        if handle is None:
            return None
        ended = self._ended[job_id]
        handle.cancel()
        try:
            await asyncio.wait_for(ended.wait(), wait)
        except TimeoutError:
            log.warning("job %s: cancel not settled within %.1fs", job_id, wait)
        return JobStatus.RUNNING

    # ---- internals ------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._heap and self._engine.has_capacity():
                entry = heapq.heappop(self._heap)
                del self._queued[entry.job.id]
                self._virtual_time[entry.job.priority] = entry.sort_key[1]
                deadline = entry.job.deadline_at
                if deadline is not None and datetime.now(UTC) >= deadline:
                    await self._end_unstarted(entry.job, JobStatus.EXPIRED, FinishReason.DEADLINE)
                    continue
                handle = self._engine.submit(entry.prompt_ids, entry.job.spec.sampling, request_id=entry.job.id)
                self._running[entry.job.id] = handle
                self._ended[entry.job.id] = asyncio.Event()
                task = asyncio.create_task(self._follow(entry.job, handle, len(entry.prompt_ids)))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _follow(self, job: Job, handle: RequestHandle, prompt_tokens: int) -> None:
        event_log = self._logs[job.id]
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
                    alts = tuple((a.token_id, a.text, a.logprob) for a in out.alternatives)
                    record = TokenRecord(out.index, out.token_id, out.text, out.logprob, alts, out.at)
                    tokens.append(record)
                    await event_log.append(TokenGenerated(job.id, event_log.next_seq, epoch_to_dt(out.at), record))
                elif isinstance(out, Started):
                    started = out.at
                    # Stored in the background: the first token must not wait for a commit.
                    marked = asyncio.create_task(self._store.mark_running(job.id, epoch_to_dt(out.at)))
                    await event_log.append(
                        GenerationStarted(job.id, event_log.next_seq, epoch_to_dt(out.at), self._model, prompt_tokens)
                    )
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
            await self._fail(job, JobError("INTERNAL", "the job could not be recorded"))
        finally:
            if deadline_timer is not None:
                deadline_timer.cancel()
            self._running.pop(job.id, None)
            self._ended.pop(job.id).set()
            self._retire_log(job.id)

    async def _finish(
        self, job: Job, out: Finished, tokens: list[TokenRecord], started: float | None, prompt_tokens: int
    ) -> None:
        status = _STATUS_FOR[out.reason]
        if status is JobStatus.FAILED:
            log.error("job %s failed in the engine: %s", job.id, out.error)
            await self._fail(job, JobError("ENGINE_ERROR", "the model failed while generating; try again"))
            return
        result = build_result(
            tokens=tokens,
            reason=out.reason,
            model=self._model,
            prompt_tokens=prompt_tokens,
            created=job.created_at.timestamp(),
            started=started,
            finished=out.at,
            review_threshold=self._review_threshold,
        )
        at = epoch_to_dt(out.at)
        await self._persist_end(job, status, at, result=result)
        event_log = self._logs[job.id]
        if status is JobStatus.SUCCEEDED:
            await event_log.append(GenerationCompleted(job.id, event_log.next_seq, at, result))
        else:
            await event_log.append(GenerationCancelled(job.id, event_log.next_seq, at, result, status))

    async def _fail(self, job: Job, error: JobError) -> None:
        at = datetime.now(UTC)
        await self._persist_end(job, JobStatus.FAILED, at, error=error)
        event_log = self._logs[job.id]
        if not event_log.closed:
            await event_log.append(GenerationFailed(job.id, event_log.next_seq, at, error))

    async def _end_unstarted(self, job: Job, status: JobStatus, reason: FinishReason) -> None:
        now = time.time()
        result = build_result(
            tokens=[], reason=reason, model=self._model, prompt_tokens=0,
            created=job.created_at.timestamp(), started=None, finished=now,
            review_threshold=self._review_threshold,
        )
        at = epoch_to_dt(now)
        await self._persist_end(job, status, at, result=result)
        event_log = self._logs[job.id]
        await event_log.append(GenerationCancelled(job.id, event_log.next_seq, at, result, status))
        self._retire_log(job.id)

    async def _persist_end(self, job: Job, status: JobStatus, at: datetime, **outcome) -> None:
        """Stores a job's end, once; releases its owner's slot and settles its quota."""
        ended = await self._store.finish(job.id, status, at, **outcome)
        if ended.webhooks_queued:
            self._on_webhook_queued()
        if not ended.changed:
            return
        self._active[job.owner] -= 1
        if self._on_job_end is not None:
            result = outcome.get("result")
            await self._on_job_end(job.id, result.usage.total_tokens if result else 0)

    async def fail_unstarted(self, job: Job, error: JobError) -> None:
        """Ends a job that will not run (e.g. its worker died too often) with a failure event."""
        self._active[job.owner] += 1  # _fail releases it
        event_log = self._logs[job.id] = EventLog(job.id)
        await event_log.append(JobQueued(job.id, 1, job.created_at, 0))
        await self._fail(job, error)
        self._retire_log(job.id)

    def _retire_log(self, job_id: str) -> None:
        """Keep recent finished logs for cheap replay; older ones are rebuilt from the DB."""
        self._finished_logs[job_id] = None
        while len(self._finished_logs) > self._keep_finished:
            old, _ = self._finished_logs.popitem(last=False)
            self._logs.pop(old, None)


def with_position(job: Job, runner: JobRunner) -> Job:
    return replace(job, queue_position=runner.queue_position(job.id))
