"""Admission: what a submission must pass before anything is stored, and what it takes.

Input rules and the prompt's tokens, the key's priority cap, then its places in the
queue (per-key concurrency, queue room) and its tokens, reserved all or none. A
reservation ends when the job is queued (the queue place becomes the job) or released.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from app.inference.model import LoadedModel

from .domain import Caller, GenerationSpec, Job, JobOptions, JobStatus
from .errors import InvalidInput
from .queue import JobQueue
from .quotas import QuotaStore
from .validation import Limits, validate_context, validate_generation, validate_options


def encode_prompt(lm: LoadedModel, spec: GenerationSpec) -> list[int]:
    if spec.messages is not None:
        return lm.encode_chat([{"role": m.role, "content": m.content} for m in spec.messages])
    if spec.raw:
        return lm.encode_raw(spec.prompt)
    return lm.encode_chat([{"role": "user", "content": spec.prompt}])


class Admission:
    def __init__(self, *, queue: JobQueue, quotas: QuotaStore, lm: LoadedModel, limits: Limits) -> None:
        self._queue = queue
        self._quotas = quotas
        self._lm = lm
        self.limits = limits

    def check(self, spec: GenerationSpec) -> list[int]:
        """All input rules; returns the prompt's token ids."""
        validate_generation(spec, self.limits)
        prompt_ids = encode_prompt(self._lm, spec)
        validate_context(len(prompt_ids), spec.sampling.max_tokens, self.limits.context_length)
        return prompt_ids

    def check_options(self, options: JobOptions, caller: Caller) -> None:
        validate_options(options, allow_private_webhooks=self.limits.allow_private_webhooks)
        if caller.max_priority is not None and options.priority > caller.max_priority:
            raise InvalidInput(f"`priority` above {caller.max_priority} is not allowed for this key",
                               field="priority", maxPriority=caller.max_priority)

    @staticmethod
    def new_job(spec: GenerationSpec, options: JobOptions, caller: Caller, now: datetime,
                batch_id: str | None = None) -> Job:
        return Job(
            id=str(uuid.uuid4()),
            owner=caller.owner,
            status=JobStatus.QUEUED,
            priority=options.priority,
            spec=spec,
            created_at=now,
            deadline_at=now + timedelta(seconds=options.deadline_seconds) if options.deadline_seconds else None,
            idempotency_key=options.idempotency_key if batch_id is None else None,
            webhook_url=options.webhook_url if batch_id is None else None,  # a batch has one webhook
            batch_id=batch_id,
        )

    async def reserve(self, caller: Caller, jobs: list[Job], prompts: list[list[int]]) -> None:
        """Reserves the jobs' queue places (concurrency, queue room) and their tokens, all or none."""
        await self._queue.reserve(caller.owner, len(jobs), caller.concurrency)
        try:
            await self._quotas.reserve_tokens(caller, [j.id for j in jobs],
                                              [len(p) + j.spec.sampling.max_tokens for j, p in zip(jobs, prompts)])
        except BaseException:
            await self._queue.unreserve(caller.owner, len(jobs))
            raise

    async def release(self, owner: str | None, jobs: list[Job]) -> None:
        """Gives back what `reserve` took, for jobs that will not be queued."""
        await self._queue.unreserve(owner, len(jobs))
        for job in jobs:
            await self._quotas.settle(job.id, 0)
