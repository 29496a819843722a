"""Batches: many generations submitted together, validated all or none."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

from .admission import Admission
from .domain import Batch, Caller, GenerationSpec, Job, JobOptions
from .errors import InvalidInput, NotFound
from .persistence.store import JobStore
from .queue import JobQueue
from .recorder import JobRecorder
from .service import JobService, visible
from .validation import MAX_BATCH_SIZE


class Batches:
    def __init__(self, *, store: JobStore, queue: JobQueue, recorder: JobRecorder, admission: Admission,
                 jobs: JobService) -> None:
        self._store = store
        self._queue = queue
        self._recorder = recorder
        self._admission = admission
        self._jobs = jobs

    async def submit(self, specs: list[GenerationSpec], options: JobOptions | None, caller: Caller) -> Batch:
        """All or nothing: one invalid input refuses the whole batch, naming its index."""
        options = options or JobOptions()
        if options.idempotency_key:
            raise InvalidInput("`idempotencyKey` is not supported for batches", field="idempotencyKey")
        self._admission.check_options(options, caller)
        if not 1 <= len(specs) <= MAX_BATCH_SIZE:
            raise InvalidInput(f"a batch holds 1 to {MAX_BATCH_SIZE} inputs; got {len(specs)}", field="inputs")
        prompts = []
        for index, spec in enumerate(specs):
            try:
                prompts.append(self._admission.check(spec))
            except InvalidInput as exc:
                raise InvalidInput(f"inputs[{index}]: {exc.message}", **{**exc.extensions, "index": index}) from None
        now = datetime.now(UTC)
        batch_id = str(uuid.uuid4())
        jobs = [self._admission.new_job(spec, options, caller, now, batch_id=batch_id) for spec in specs]
        await self._admission.reserve(caller, jobs, prompts)
        await asyncio.shield(self._persist_batch(batch_id, caller, jobs, prompts, options.webhook_url, now))
        return await self._store.batch(batch_id)

    async def _persist_batch(self, batch_id: str, caller: Caller, jobs: list[Job], prompts: list[list[int]],
                             webhook_url: str | None, now: datetime) -> None:
        try:
            await self._store.insert_batch(batch_id, caller.owner, jobs, webhook_url, now)
        except BaseException:
            await self._admission.release(caller.owner, jobs)
            raise
        for job, prompt_ids in zip(jobs, prompts):
            await self._recorder.queued(job, await self._queue.put(job, prompt_ids))

    async def get(self, batch_id: str, caller: Caller) -> Batch | None:
        batch = await self._store.batch(batch_id)
        if batch is None or not visible(batch.owner, caller):
            return None
        return batch

    async def cancel(self, batch_id: str, caller: Caller) -> Batch:
        batch = await self.get(batch_id, caller)
        if batch is None:
            raise NotFound(f"no batch with id {batch_id!r}")
        if not batch.counts.done:
            await self._store.mark_batch_cancelled(batch_id)
            page = await self._store.list_jobs(owner=None, all_owners=True, batch_id=batch_id, first=MAX_BATCH_SIZE,
                                               with_results=False)
            await asyncio.gather(*(self._jobs.cancel_active(j) for j in page.items if not j.status.terminal))
        return await self._store.batch(batch_id)
