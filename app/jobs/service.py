"""JobService: the one entry point the API layer calls.

It validates, persists, queues and reads jobs, hands out their event streams, and runs
classifications. It knows the engine and the database, nothing of GraphQL.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from app.inference.classify import LabelScore, score_labels
from app.inference.engine import Engine
from app.inference.model import LoadedModel
from app.inference.types import ModelInfo

from .domain import GenerationSpec, Job, JobOptions, JobStatus, Timing, Usage
from .errors import InvalidInput, NotFound, Overloaded
from .events import JobEvent, replay_finished
from .runner import JobRunner, with_position
from .store import JobStore
from .validation import Limits, validate_classification, validate_context, validate_generation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Classification:
    label: str
    confidence: float
    scores: tuple[LabelScore, ...]
    needs_review: bool
    model: ModelInfo
    usage: Usage
    timing: Timing


class JobService:
    def __init__(
        self,
        *,
        store: JobStore,
        engine: Engine,
        lm: LoadedModel,
        limits: Limits,
        review_threshold: float,
        max_queued: int,
    ) -> None:
        self._store = store
        self._engine = engine
        self._lm = lm
        self.limits = limits
        self._review_threshold = review_threshold
        self.runner = JobRunner(
            store, engine, lm.info, review_threshold=review_threshold, max_queued=max_queued
        )

    @property
    def model(self) -> ModelInfo:
        return self._lm.info

    async def start(self) -> None:
        self.runner.start()
        await self._recover()

    async def stop(self) -> None:
        await self.runner.stop()

    # ---- generations --------------------------------------------------------------------

    def _prompt_ids(self, spec: GenerationSpec) -> list[int]:
        if spec.messages is not None:
            return self._lm.encode_chat([{"role": m.role, "content": m.content} for m in spec.messages])
        if spec.raw:
            return self._lm.encode_raw(spec.prompt)
        return self._lm.encode_chat([{"role": "user", "content": spec.prompt}])

    async def submit(self, spec: GenerationSpec, options: JobOptions | None = None, owner: str | None = None) -> Job:
        """Validate, persist a QUEUED job and queue it. Nothing is stored when input is bad."""
        options = options or JobOptions()
        validate_generation(spec, self.limits)
        if options.deadline_seconds is not None and not 0 < options.deadline_seconds <= 86400:
            raise InvalidInput("`deadlineSeconds` must be in (0, 86400]", field="deadlineSeconds")
        if not -100 <= options.priority <= 100:
            raise InvalidInput("`priority` must be between -100 and 100", field="priority")
        prompt_ids = self._prompt_ids(spec)
        validate_context(len(prompt_ids), spec.sampling.max_tokens, self.limits.context_length)
        if self.runner.queued_count >= self.runner.max_queued:
            raise Overloaded(
                f"the queue is full ({self.runner.max_queued} jobs waiting); retry shortly",
                retryAfterMs=1000,
            )
        now = datetime.now(UTC)
        job = Job(
            id=str(uuid.uuid4()),
            owner=owner,
            status=JobStatus.QUEUED,
            priority=options.priority,
            spec=spec,
            created_at=now,
            deadline_at=now + timedelta(seconds=options.deadline_seconds) if options.deadline_seconds else None,
            idempotency_key=options.idempotency_key,
            webhook_url=options.webhook_url,
        )
        await self._store.insert(job)
        position = await self.runner.enqueue(job, prompt_ids)
        return replace(job, queue_position=position, prompt_tokens=len(prompt_ids))

    async def get(self, job_id: str, owner: str | None = None) -> Job | None:
        job = await self._store.get(job_id)
        if job is None or (owner is not None and job.owner != owner):
            return None
        return with_position(job, self.runner)

    async def cancel(self, job_id: str, owner: str | None = None) -> Job:
        job = await self.get(job_id, owner)
        if job is None:
            raise NotFound(f"no job with id {job_id!r}")
        if not job.status.terminal:
            await self.runner.cancel(job_id)
        return await self.get(job_id, owner)

    async def events(self, job_id: str, after: int = 0, owner: str | None = None) -> AsyncIterator[JobEvent]:
        """Replay events with seq > after, then follow live ones to the end."""
        if after < 0:
            raise InvalidInput("`after` must be 0 or more", field="after")
        job = await self.get(job_id, owner)
        if job is None:
            raise NotFound(f"no job with id {job_id!r}")
        return self._follow(job, after)

    async def _follow(self, job: Job, after: int) -> AsyncIterator[JobEvent]:
        event_log = self.runner.event_log(job.id)
        if event_log is not None:
            async for event in event_log.follow(after):
                yield event
            return
        for event in replay_finished(await self._store.get(job.id)):
            if event.seq > after:
                yield event

    async def _recover(self) -> None:
        """Jobs left QUEUED or RUNNING by a previous process are queued again."""
        for job in await self._store.by_status(JobStatus.QUEUED, JobStatus.RUNNING):
            log.info("re-queueing job %s left %s by a previous run", job.id, job.status.value)
            await self.runner.enqueue(job, self._prompt_ids(job.spec))

    # ---- classification -----------------------------------------------------------------

    async def classify(self, text: str, labels: list[str], instruction: str | None = None) -> Classification:
        validate_classification(text, labels, instruction, self.limits)
        created = time.time()
        timings: dict[str, float] = {}

        def run():
            timings["started"] = time.time()
            return score_labels(self._lm, text, labels, instruction)

        scored = await self._engine.call(run)
        finished = time.time()
        best = max(scored.scores, key=lambda s: s.probability)
        started = timings["started"]
        return Classification(
            label=best.label,
            confidence=best.probability,
            scores=scored.scores,
            needs_review=best.probability < self._review_threshold,
            model=self._lm.info,
            usage=Usage(prompt_tokens=scored.prompt_tokens, completion_tokens=0),
            timing=Timing(
                queued_ms=(started - created) * 1000,
                time_to_first_token_ms=None,
                generation_ms=(finished - started) * 1000,
                total_ms=(finished - created) * 1000,
                tokens_per_second=None,
            ),
        )
