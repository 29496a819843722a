"""JobService: the one entry point the API layer calls.

It authenticates callers, holds them to their quotas, validates, persists, queues and
reads jobs, hands out their event streams, and runs classifications. Every read and
write is scoped to the caller: another key's job looks exactly like a missing one.
It knows the engine and the database, nothing of GraphQL.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from app.inference.classify import LabelScore, classification_length, score_labels
from app.inference.engine import Engine
from app.inference.model import LoadedModel
from app.inference.types import ModelInfo

from .domain import (
    Batch,
    Caller,
    GenerationSpec,
    Job,
    JobError,
    JobOptions,
    JobStatus,
    Page,
    ReviewVerdict,
    Timing,
    Usage,
    WebhookAttempt,
)
from .errors import Forbidden, InvalidInput, NotFound, Overloaded
from .events import JobEvent, replay_finished
from .keys import KeyStore
from .quotas import Quotas, RateLimited
from .runner import JobRunner, with_position
from .store import IdempotentReplay, JobStore, UsageSummary
from .validation import (
    MAX_BATCH_SIZE,
    MAX_PAGE,
    Limits,
    validate_classification,
    validate_context,
    validate_generation,
    validate_options,
)
from .webhooks import WebhookDispatcher

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


def _check_page(first: int) -> None:
    if not 1 <= first <= MAX_PAGE:
        raise InvalidInput(f"`first` must be between 1 and {MAX_PAGE}", field="first")


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
        max_attempts: int = 3,
        webhooks: WebhookDispatcher | None = None,
        keys: KeyStore | None = None,
        rate_window_seconds: int = 60,
        max_queued_classifications: int = 16,
    ) -> None:
        self._store = store
        self._engine = engine
        self._lm = lm
        self.limits = limits
        self._review_threshold = review_threshold
        self._max_attempts = max_attempts
        self._webhooks = webhooks
        self.keys = keys
        self.quotas = Quotas(rate_window_seconds)
        self._max_classifying = max_queued_classifications
        self._classifying: Counter[str | None] = Counter()  # owner -> classifications waiting or running
        self.runner = JobRunner(
            store, engine, lm.info, review_threshold=review_threshold, max_queued=max_queued,
            on_webhook_queued=webhooks.wake if webhooks else lambda: None,
            on_job_end=self.quotas.settle,
        )

    @property
    def model(self) -> ModelInfo:
        return self._lm.info

    async def start(self) -> None:
        self.runner.start()
        await self._recover()
        if self._webhooks:
            self._webhooks.start()

    async def stop(self) -> None:
        await self.runner.stop()
        if self._webhooks:
            await self._webhooks.stop()

    # ---- callers ------------------------------------------------------------------------

    async def authenticate(self, key: str | None) -> Caller | None:
        """The caller behind an API key; None when the key is missing, unknown or revoked."""
        if self.keys is None or not key:
            return None
        return await self.keys.authenticate(key)

    async def admit(self, caller: Caller) -> None:
        """Counts one request against the caller's requests-per-minute."""
        await self.quotas.hit_request(caller)

    async def rate_state(self, caller: Caller) -> dict | None:
        state = await self.quotas.state(caller)
        if state is not None and caller.concurrency is not None:
            state["concurrency"]["active"] = self._active(caller.owner)
        return state

    def _active(self, owner: str | None) -> int:
        """The owner's generations queued or running, and classifications waiting or running."""
        return self.runner.active_count(owner) + self._classifying[owner]

    @staticmethod
    def _visible(item_owner: str | None, caller: Caller) -> bool:
        return caller.admin or item_owner == caller.owner

    # ---- generations --------------------------------------------------------------------

    def _prompt_ids(self, spec: GenerationSpec) -> list[int]:
        if spec.messages is not None:
            return self._lm.encode_chat([{"role": m.role, "content": m.content} for m in spec.messages])
        if spec.raw:
            return self._lm.encode_raw(spec.prompt)
        return self._lm.encode_chat([{"role": "user", "content": spec.prompt}])

    def _check(self, spec: GenerationSpec) -> list[int]:
        """All input rules; returns the prompt's token ids."""
        validate_generation(spec, self.limits)
        prompt_ids = self._prompt_ids(spec)
        validate_context(len(prompt_ids), spec.sampling.max_tokens, self.limits.context_length)
        return prompt_ids

    def _claim_room(self, caller: Caller, n: int) -> None:
        """Checks the caller's concurrency and the queue's room, and claims n places.

        Check and claim run with no await between them, so concurrent submissions cannot
        all pass a limit only some of them fit. The caller must end the claim: by
        enqueueing (claimed=True) or by `runner.release`.
        """
        if caller.concurrency is not None and self._active(caller.owner) + n > caller.concurrency:
            raise RateLimited(
                f"rate limit: {caller.concurrency} generations queued or running at once for this key",
                limit="concurrency", retryAfterMs=1000,
            )
        free = self.runner.max_queued - self.runner.queued_count
        if n > free:
            raise Overloaded(
                f"the queue is full ({self.runner.queued_count} of {self.runner.max_queued} jobs waiting); "
                "retry shortly", retryAfterMs=1000,
            )
        self.runner.claim(caller.owner, n)

    def _check_priority(self, options: JobOptions, caller: Caller) -> None:
        if caller.max_priority is not None and options.priority > caller.max_priority:
            raise InvalidInput(f"`priority` above {caller.max_priority} is not allowed for this key",
                               field="priority", maxPriority=caller.max_priority)

    def _new_job(self, spec: GenerationSpec, options: JobOptions, caller: Caller, now: datetime,
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

    async def submit(self, spec: GenerationSpec, options: JobOptions | None, caller: Caller) -> Job:
        """Validate, persist a QUEUED job and queue it. Nothing is stored when input is bad.

        The same idempotency key (for the same caller) returns the job it created first.
        """
        options = options or JobOptions()
        validate_options(options)
        self._check_priority(options, caller)
        prompt_ids = self._check(spec)
        job = self._new_job(spec, options, caller, datetime.now(UTC))
        self._claim_room(caller, 1)
        try:
            await self.quotas.reserve_tokens(caller, [job.id], [len(prompt_ids) + spec.sampling.max_tokens])
        except BaseException:
            self.runner.release(caller.owner, 1)
            raise
        try:
            # Shielded: a caller that goes away (a dropped websocket) must not leave a stored
            # job that the runner never heard of. _persist ends the claim and the reservation
            # itself when it fails, so they cannot leak even if nobody awaits it any more.
            position = await asyncio.shield(self._persist(job, prompt_ids))
        except IdempotentReplay as exc:
            if exc.job.spec != spec:
                raise InvalidInput(
                    "this idempotencyKey was already used with a different input", field="idempotencyKey"
                ) from None
            return with_position(exc.job, self.runner)
        return replace(job, queue_position=position)

    async def _persist(self, job: Job, prompt_ids: list[int]) -> int:
        try:
            await self._store.insert(job)
        except BaseException:
            self.runner.release(job.owner, 1)
            await self.quotas.settle(job.id, 0)
            raise
        return await self.runner.enqueue(job, prompt_ids, claimed=True)

    async def submit_batch(self, specs: list[GenerationSpec], options: JobOptions | None, caller: Caller) -> Batch:
        """All or nothing: one invalid input refuses the whole batch, naming its index."""
        options = options or JobOptions()
        if options.idempotency_key:
            raise InvalidInput("`idempotencyKey` is not supported for batches", field="idempotencyKey")
        validate_options(options)
        self._check_priority(options, caller)
        if not 1 <= len(specs) <= MAX_BATCH_SIZE:
            raise InvalidInput(f"a batch holds 1 to {MAX_BATCH_SIZE} inputs; got {len(specs)}", field="inputs")
        prompts = []
        for index, spec in enumerate(specs):
            try:
                prompts.append(self._check(spec))
            except InvalidInput as exc:
                raise InvalidInput(f"inputs[{index}]: {exc.message}", **{**exc.extensions, "index": index}) from None
        now = datetime.now(UTC)
        batch_id = str(uuid.uuid4())
        jobs = [self._new_job(spec, options, caller, now, batch_id=batch_id) for spec in specs]
        self._claim_room(caller, len(specs))
        try:
            await self.quotas.reserve_tokens(caller, [j.id for j in jobs],
                                             [len(p) + s.sampling.max_tokens for p, s in zip(prompts, specs)])
        except BaseException:
            self.runner.release(caller.owner, len(specs))
            raise
        await asyncio.shield(self._persist_batch(batch_id, caller, jobs, prompts, options.webhook_url, now))
        return await self._store.batch(batch_id)

    async def _persist_batch(self, batch_id: str, caller: Caller, jobs: list[Job], prompts: list[list[int]],
                             webhook_url: str | None, now: datetime) -> None:
        try:
            await self._store.insert_batch(batch_id, caller.owner, jobs, webhook_url, now)
        except BaseException:
            self.runner.release(caller.owner, len(jobs))
            for job in jobs:
                await self.quotas.settle(job.id, 0)
            raise
        for job, prompt_ids in zip(jobs, prompts):
            await self.runner.enqueue(job, prompt_ids, claimed=True)

    async def get(self, job_id: str, caller: Caller) -> Job | None:
        job = await self._store.get(job_id)
        if job is None or not self._visible(job.owner, caller):
            return None
        return with_position(job, self.runner)

    async def _get_or_404(self, job_id: str, caller: Caller) -> Job:
        job = await self.get(job_id, caller)
        if job is None:
            raise NotFound(f"no job with id {job_id!r}")
        return job

    async def cancel(self, job_id: str, caller: Caller) -> Job:
        job = await self._get_or_404(job_id, caller)
        if not job.status.terminal:
            await self._cancel_active(job)
        return await self.get(job_id, caller)

    async def _cancel_active(self, job: Job) -> None:
        if await self.runner.cancel(job.id) is JobStatus.QUEUED:
            # It was stored, queued and announced (maybe with a webhook) for nothing.
            await self.quotas.charge_request(job.owner)

    async def events(self, job_id: str, after: int, caller: Caller) -> AsyncIterator[JobEvent]:
        """Replay events with seq > after, then follow live ones to the end."""
        if after < 0:
            raise InvalidInput("`after` must be 0 or more", field="after")
        job = await self._get_or_404(job_id, caller)
        event_log = self.runner.event_log(job.id)
        # An ended job's last seq is known, and an `after` past it can never be reached.
        last = None
        if event_log is not None and event_log.closed:
            last = len(event_log.events)
        elif event_log is None and job.status.terminal:
            last = len(replay_finished(job))
        if last is not None and after > last:
            raise InvalidInput(f"`after` is past this job's last event (seq {last})", field="after", lastSeq=last)
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

    async def list_jobs(self, caller: Caller, *, status: JobStatus | None = None, batch_id: str | None = None,
                        first: int = 20, after: str | None = None, with_results: bool = True) -> Page:
        """with_results=False: every job's `result` is None (not read), for lists that do not show it."""
        _check_page(first)
        page = await self._store.list_jobs(owner=caller.owner, all_owners=caller.admin, status=status,
                                           batch_id=batch_id, first=first, after=after, with_results=with_results)
        return replace(page, items=[with_position(j, self.runner) for j in page.items])

    # ---- batches ------------------------------------------------------------------------

    async def batch(self, batch_id: str, caller: Caller) -> Batch | None:
        batch = await self._store.batch(batch_id)
        if batch is None or not self._visible(batch.owner, caller):
            return None
        return batch

    async def cancel_batch(self, batch_id: str, caller: Caller) -> Batch:
        batch = await self.batch(batch_id, caller)
        if batch is None:
            raise NotFound(f"no batch with id {batch_id!r}")
        if not batch.counts.done:
            await self._store.mark_batch_cancelled(batch_id)
            page = await self._store.list_jobs(owner=None, all_owners=True, batch_id=batch_id, first=MAX_BATCH_SIZE)
            await asyncio.gather(*(self._cancel_active(j) for j in page.items if not j.status.terminal))
        return await self._store.batch(batch_id)

    async def _recover(self) -> None:
        """Jobs a previous process left QUEUED run now; RUNNING ones (their worker died) run
        again, unless they already used every attempt: then they fail with WORKER_LOST."""
        for job in await self._store.by_status(JobStatus.QUEUED, JobStatus.RUNNING):
            if job.status is JobStatus.RUNNING:
                if job.attempts >= self._max_attempts:
                    log.error("job %s: worker lost %d times; failing it", job.id, job.attempts)
                    await self.runner.fail_unstarted(job, JobError(
                        "WORKER_LOST", f"the worker stopped during all {job.attempts} attempts"))
                    continue
                await self._store.requeue(job.id)
            log.info("re-queueing job %s left %s by a previous run", job.id, job.status.value)
            await self.runner.enqueue(job, self._prompt_ids(job.spec))

    # ---- review, webhooks, usage ---------------------------------------------

    @staticmethod
    def _require_admin(caller: Caller, what: str) -> None:
        if not caller.admin:
            raise Forbidden(f"{what} needs an admin key")

    async def review_queue(self, caller: Caller, first: int = 20, after: str | None = None) -> Page:
        self._require_admin(caller, "the review queue")
        _check_page(first)
        return await self._store.list_jobs(owner=None, all_owners=True, first=first, after=after, review_queue=True)

    async def submit_review(self, job_id: str, verdict: ReviewVerdict, corrected_text: str | None,
                            caller: Caller) -> Job:
        self._require_admin(caller, "reviewing")
        job = await self._get_or_404(job_id, caller)
        if job.status is not JobStatus.SUCCEEDED or job.result is None:
            raise InvalidInput(f"only a SUCCEEDED job can be reviewed; this one is {job.status.value}", field="jobId")
        if (verdict is ReviewVerdict.CORRECTED) != bool(corrected_text and corrected_text.strip()):
            raise InvalidInput("`correctedText` is required with CORRECTED and only with it", field="correctedText")
        if corrected_text and len(corrected_text) > self.limits.max_prompt_chars:
            raise InvalidInput(f"`correctedText` is over {self.limits.max_prompt_chars} characters",
                               field="correctedText")
        await self._store.submit_review(job_id, verdict, caller.name, corrected_text, datetime.now(UTC))
        return await self.get(job_id, caller)

    async def webhook_deliveries(self, subject_id: str) -> list[WebhookAttempt]:
        """Callers reach this only through a job or batch they can already see."""
        return await self._store.webhook_attempts(subject_id)

    async def usage(self, caller: Caller, start: datetime, end: datetime) -> list[tuple[UsageSummary, str | None]]:
        """Usage rows with the name of the key each belongs to."""
        start, end = (t if t.tzinfo else t.replace(tzinfo=UTC) for t in (start, end))  # naive = UTC
        if end <= start:
            raise InvalidInput("`to` must be after `from`", field="to")
        rows = await self._store.usage(start, end, owner=caller.owner, all_owners=caller.admin)
        names = {k.id: k.name for k in await self.keys.list()} if self.keys else {}
        return [(row, names.get(row.owner)) for row in rows]

    # ---- classification -----------------------------------------------------------------

    async def classify(self, text: str, labels: list[str], instruction: str | None, caller: Caller) -> Classification:
        validate_classification(text, labels, instruction, self.limits)
        width = classification_length(self._lm, text, labels, instruction)
        if width > self.limits.context_length:
            raise InvalidInput(
                f"text, instruction and the longest label take {width} tokens; the model's context length is "
                f"{self.limits.context_length}", field="text",
            )
        # One row per label, each the prompt plus a label padded to the longest: that is the
        # compute it costs, and what it is billed (rows x width), not the prompt once.
        billed = width * len(labels)
        self._check_classification_room(caller)
        self._classifying[caller.owner] += 1
        try:
            return await self._classify(text, labels, instruction, caller, billed)
        finally:
            self._classifying[caller.owner] -= 1

    def _check_classification_room(self, caller: Caller) -> None:
        if caller.concurrency is not None and self._active(caller.owner) + 1 > caller.concurrency:
            raise RateLimited(
                f"rate limit: {caller.concurrency} generations queued or running at once for this key",
                limit="concurrency", retryAfterMs=1000,
            )
        waiting = sum(self._classifying.values())
        if waiting >= self._max_classifying:
            raise Overloaded(f"{waiting} classifications are waiting for the model; retry shortly",
                             retryAfterMs=1000)

    async def _classify(self, text: str, labels: list[str], instruction: str | None, caller: Caller,
                        billed: int) -> Classification:
        created = time.time()
        timings: dict[str, float] = {}

        def run():
            timings["started"] = time.time()
            return score_labels(self._lm, text, labels, instruction)

        job_id = f"classify-{uuid.uuid4()}"
        await self.quotas.reserve_tokens(caller, [job_id], [billed])
        scored = None
        try:
            scored = await self._engine.call(run)
        finally:
            await self.quotas.settle(job_id, billed if scored else 0)
        finished = time.time()
        best = max(scored.scores, key=lambda s: s.probability)
        started = timings["started"]
        usage = Usage(prompt_tokens=billed, completion_tokens=0)
        await self._store.record_usage(caller.owner, "classification", self._lm.info.version, usage,
                                       datetime.now(UTC))
        return Classification(
            label=best.label,
            confidence=best.probability,
            scores=scored.scores,
            needs_review=best.probability < self._review_threshold,
            model=self._lm.info,
            usage=usage,
            timing=Timing(
                queued_ms=(started - created) * 1000,
                time_to_first_token_ms=None,
                generation_ms=(finished - started) * 1000,
                total_ms=(finished - created) * 1000,
                tokens_per_second=None,
            ),
        )
