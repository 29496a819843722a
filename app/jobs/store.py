"""Persistence of jobs, batches, reviews and webhook messages.

Converts rows <-> domain objects; nothing else reads the job tables. A job's end and the
webhook messages it triggers are written in one transaction, so a crash can never leave
a finished job whose callback is lost.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from sqlalchemy import and_, delete, func, or_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import defer
from sqlmodel import Session, col, select

from .domain import (
    Batch,
    BatchCounts,
    DeliveryOutcome,
    GenerationResult,
    GenerationSpec,
    Job,
    JobError,
    JobStatus,
    Page,
    Review,
    ReviewVerdict,
    Usage,
    WebhookAttempt,
)
from .db import Database
from .errors import InvalidInput
from .tables import BatchRow, JobRow, UsageRow, WebhookAttemptRow, WebhookRow
from .webhook_messages import batch_message, job_message
from .writer import Writer

TERMINAL = [s.value for s in JobStatus if s.terminal]


def utc(dt: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything stored is UTC."""
    if dt is None or dt.tzinfo is not None:
        return dt
    return dt.replace(tzinfo=UTC)


def _to_job(row: JobRow, with_result: bool = True) -> Job:
    review = None
    if row.review_verdict:
        review = Review(ReviewVerdict(row.review_verdict), row.reviewed_by, utc(row.reviewed_at), row.corrected_text)
    return Job(
        id=row.id,
        owner=row.owner,
        status=JobStatus(row.status),
        priority=row.priority,
        spec=GenerationSpec.from_dict(json.loads(row.input_json)),
        created_at=utc(row.created_at),
        started_at=utc(row.started_at),
        finished_at=utc(row.finished_at),
        deadline_at=utc(row.deadline_at),
        idempotency_key=row.idempotency_scope.split(":", 1)[1] if row.idempotency_scope else None,
        webhook_url=row.webhook_url,
        attempts=row.attempts,
        result=GenerationResult.from_dict(json.loads(row.result_json)) if with_result and row.result_json else None,
        error=JobError(row.error_code, row.error_message or "") if row.error_code else None,
        batch_id=row.batch_id,
        review=review,
    )


def idempotency_scope(owner: str | None, key: str | None) -> str | None:
    return f"{owner or ''}:{key}" if key else None


def encode_cursor(at: datetime, item_id: str) -> str:
    return base64.urlsafe_b64encode(f"{at.isoformat()}|{item_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        at, item_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        return utc(datetime.fromisoformat(at)), item_id
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput("`after` is not a cursor this API returned", field="after") from exc


def _new_row(job: Job) -> JobRow:
    return JobRow(
        id=job.id,
        owner=job.owner,
        batch_id=job.batch_id,
        status=job.status.value,
        priority=job.priority,
        input_json=json.dumps(job.spec.to_dict()),
        idempotency_scope=idempotency_scope(job.owner, job.idempotency_key),
        webhook_url=job.webhook_url,
        deadline_at=job.deadline_at,
        created_at=job.created_at,
    )


@dataclass(frozen=True)
class Ended:
    changed: bool          # False: the job was already terminal (or is unknown)
    webhooks_queued: bool


@dataclass(frozen=True)
class UsageSummary:
    owner: str | None
    model_version: str
    requests: int
    prompt_tokens: int
    completion_tokens: int


class IdempotentReplay(Exception):
    """A job with this idempotency key already exists; `job` is it."""

    def __init__(self, job: Job) -> None:
        self.job = job


class JobStore:
    def __init__(self, db: Database, writer: Writer | None = None) -> None:
        self._db = db
        self.writer = writer or Writer(db)  # every write goes through it (group commit)

    # ---- writes ---------------------------------------------------------------------------

    async def _execute(self, statement) -> None:
        await self.writer.write(lambda session: session.exec(statement))

    async def insert(self, job: Job) -> None:
        """Raises IdempotentReplay when the caller already used this idempotency key."""
        scope = idempotency_scope(job.owner, job.idempotency_key)
        if scope and (existing := await self._by_scope(scope)):
            raise IdempotentReplay(existing)
        try:
            await self.writer.write(lambda session: session.add(_new_row(job)))
        except IntegrityError:
            existing = await self._by_scope(scope) if scope else None
            if existing is None:
                raise
            raise IdempotentReplay(existing) from None  # lost a race with the same key

    async def insert_batch(self, batch_id: str, owner: str | None, jobs: list[Job], webhook_url: str | None,
                           created_at: datetime) -> None:
        def op(session: Session) -> None:
            session.add(BatchRow(id=batch_id, owner=owner, size=len(jobs), webhook_url=webhook_url,
                                 created_at=created_at))
            for index, job in enumerate(jobs):
                row = _new_row(job)
                row.batch_index = index
                session.add(row)

        await self.writer.write(op)

    async def mark_running(self, job_id: str, started_at: datetime) -> None:
        await self._execute(
            update(JobRow).where(col(JobRow.id) == job_id, col(JobRow.status) == JobStatus.QUEUED.value)
            .values(status=JobStatus.RUNNING.value, started_at=started_at, attempts=JobRow.attempts + 1)
        )

    async def requeue(self, job_id: str) -> None:
        """A job whose worker died goes back to QUEUED, keeping its attempt count."""
        await self._execute(
            update(JobRow).where(col(JobRow.id) == job_id).values(status=JobStatus.QUEUED.value, started_at=None)
        )

    async def finish(
        self,
        job_id: str,
        status: JobStatus,
        finished_at: datetime,
        result: GenerationResult | None = None,
        error: JobError | None = None,
    ) -> Ended:
        """Ends a job (once: a job already terminal is left alone), queues its webhooks and
        records its usage, all in one transaction."""

        def op(session: Session) -> Ended:
            row = session.get(JobRow, job_id)
            if row is None or JobStatus(row.status).terminal:
                return Ended(False, False)
            row.status = status.value
            row.finished_at = finished_at
            row.result_json = json.dumps(result.to_dict()) if result else None
            row.error_code = error.code if error else None
            row.error_message = error.message if error else None
            if result is not None:
                row.prompt_tokens = result.usage.prompt_tokens
                row.completion_tokens = result.usage.completion_tokens
                row.needs_review = status is JobStatus.SUCCEEDED and result.needs_review
                if result.usage.total_tokens:
                    session.add(UsageRow(owner=row.owner, kind="generation", model_version=result.model.version,
                                         at=finished_at, prompt_tokens=result.usage.prompt_tokens,
                                         completion_tokens=result.usage.completion_tokens))
            queued = False
            if row.webhook_url:
                # The ended job as it now stands, from what is in hand (no JSON round trip).
                ended = replace(_to_job(row, with_result=False), result=result)
                session.add(job_message(ended, row.webhook_url, finished_at))
                queued = True
            if row.batch_id:
                session.flush()
                queued |= self._maybe_finish_batch(session, row.batch_id, finished_at)
            return Ended(True, queued)

        return await self.writer.write(op)

    def _maybe_finish_batch(self, session: Session, batch_id: str, now: datetime) -> bool:
        batch = session.get(BatchRow, batch_id)
        if batch is None or batch.finished_at is not None:
            return False
        counts, usage = self._batch_counts(session, batch_id)
        if not counts.done:
            return False
        batch.finished_at = now
        if batch.webhook_url:
            session.add(batch_message(self._to_batch(batch, counts, usage), batch.webhook_url, now))
            return True
        return False

    async def mark_batch_cancelled(self, batch_id: str) -> None:
        await self._execute(update(BatchRow).where(col(BatchRow.id) == batch_id).values(cancelled=True))

    async def submit_review(self, job_id: str, verdict: ReviewVerdict, reviewer: str | None,
                            corrected_text: str | None, at: datetime) -> None:
        await self._execute(
            update(JobRow).where(col(JobRow.id) == job_id)
            .values(review_verdict=verdict.value, reviewed_by=reviewer, reviewed_at=at, corrected_text=corrected_text)
        )

    async def purge_finished_before(self, cutoff: datetime) -> int:
        """Deletes finished jobs (and their webhook records) older than cutoff; returns how many."""

        def op(session: Session) -> int:
            old = select(JobRow.id).where(col(JobRow.status).in_(TERMINAL), col(JobRow.finished_at) < cutoff)
            hooks = select(WebhookRow.id).where(col(WebhookRow.subject_id).in_(old))
            session.exec(delete(WebhookAttemptRow).where(col(WebhookAttemptRow.webhook_id).in_(hooks)))
            session.exec(delete(WebhookRow).where(col(WebhookRow.subject_id).in_(old)))
            result = session.exec(delete(JobRow).where(col(JobRow.id).in_(old)))
            session.exec(delete(BatchRow).where(
                col(BatchRow.finished_at) < cutoff,
                ~col(BatchRow.id).in_(select(JobRow.batch_id).where(col(JobRow.batch_id).is_not(None))),
            ))
            return result.rowcount or 0

        return await self.writer.write(op)

    async def record_usage(self, owner: str | None, kind: str, model_version: str, usage: Usage,
                           at: datetime) -> None:
        await self.writer.write(lambda session: session.add(UsageRow(
            owner=owner, kind=kind, model_version=model_version, at=at,
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)))

    # ---- reads ----------------------------------------------------------------------------

    async def get(self, job_id: str) -> Job | None:
        def query(session: Session) -> Job | None:
            row = session.get(JobRow, job_id)
            return _to_job(row) if row else None

        return await self._db.read(query)

    async def _by_scope(self, scope: str) -> Job | None:
        def query(session: Session) -> Job | None:
            row = session.exec(select(JobRow).where(col(JobRow.idempotency_scope) == scope)).first()
            return _to_job(row) if row else None

        return await self._db.read(query)

    async def by_status(self, *statuses: JobStatus) -> list[Job]:
        query = (select(JobRow).where(col(JobRow.status).in_([s.value for s in statuses]))
                 .order_by(col(JobRow.created_at)))
        return await self._db.read(lambda session: [_to_job(r) for r in session.exec(query)], offload=True)

    async def list_jobs(
        self,
        *,
        owner: str | None,
        all_owners: bool,
        status: JobStatus | None = None,
        batch_id: str | None = None,
        first: int = 20,
        after: str | None = None,
        review_queue: bool = False,
        with_results: bool = True,
    ) -> Page:
        """Newest first, keyset-paginated on (created_at, id).

        with_results=False leaves every job's `result` None without reading or parsing it:
        a list that shows only ids and statuses must not parse 100 results on the loop.
        """
        query = select(JobRow)
        if not with_results:
            query = query.options(defer(JobRow.result_json))
        if not all_owners:
            query = query.where(col(JobRow.owner) == owner if owner is not None else col(JobRow.owner).is_(None))
        if status is not None:
            query = query.where(col(JobRow.status) == status.value)
        if batch_id is not None:
            query = query.where(col(JobRow.batch_id) == batch_id)
        if review_queue:
            query = query.where(col(JobRow.needs_review).is_(True), col(JobRow.review_verdict).is_(None))
        if after:
            at, last_id = decode_cursor(after)
            query = query.where(or_(col(JobRow.created_at) < at,
                                    and_(col(JobRow.created_at) == at, col(JobRow.id) < last_id)))
        query = query.order_by(col(JobRow.created_at).desc(), col(JobRow.id).desc()).limit(first + 1)
        rows = await self._db.read(lambda session: list(session.exec(query)))
        has_next = len(rows) > first
        rows = rows[:first]
        end = encode_cursor(utc(rows[-1].created_at), rows[-1].id) if rows else None
        return Page(items=[_to_job(r, with_results) for r in rows], end_cursor=end, has_next_page=has_next)

    async def batch(self, batch_id: str) -> Batch | None:
        def query(session: Session) -> Batch | None:
            row = session.get(BatchRow, batch_id)
            if row is None:
                return None
            counts, usage = self._batch_counts(session, batch_id)
            return self._to_batch(row, counts, usage)

        return await self._db.read(query)

    @staticmethod
    def _batch_counts(session: Session, batch_id: str) -> tuple[BatchCounts, Usage]:
        rows = session.exec(
            select(JobRow.status, func.count(), func.sum(JobRow.prompt_tokens), func.sum(JobRow.completion_tokens))
            .where(col(JobRow.batch_id) == batch_id).group_by(JobRow.status)
        )
        counts: dict[str, int] = {}
        prompt = completion = 0
        for status, n, p, c in rows:
            counts[status.lower()] = n
            prompt += p or 0
            completion += c or 0
        return BatchCounts(**counts), Usage(prompt_tokens=prompt, completion_tokens=completion)

    @staticmethod
    def _to_batch(row: BatchRow, counts: BatchCounts, usage: Usage) -> Batch:
        return Batch(id=row.id, owner=row.owner, size=row.size, created_at=utc(row.created_at),
                     finished_at=utc(row.finished_at), cancelled=row.cancelled, counts=counts, usage=usage,
                     webhook_url=row.webhook_url)

    async def webhook_attempts(self, subject_id: str) -> list[WebhookAttempt]:
        query = (
            select(WebhookAttemptRow)
            .join(WebhookRow, col(WebhookRow.id) == col(WebhookAttemptRow.webhook_id))
            .where(col(WebhookRow.subject_id) == subject_id)
            .order_by(col(WebhookAttemptRow.at), col(WebhookAttemptRow.attempt))
        )
        return await self._db.read(lambda session: [
            WebhookAttempt(r.attempt, utc(r.at), r.http_status, r.error, utc(r.next_retry_at),
                           DeliveryOutcome(r.outcome) if r.outcome else None)
            for r in session.exec(query)
        ])

    async def usage(self, start: datetime, end: datetime, *, owner: str | None, all_owners: bool) -> list[UsageSummary]:
        """Requests and tokens in [start, end), per owner and model version."""
        query = (
            select(UsageRow.owner, UsageRow.model_version, func.count(),
                   func.sum(UsageRow.prompt_tokens), func.sum(UsageRow.completion_tokens))
            .where(col(UsageRow.at) >= start, col(UsageRow.at) < end)
            .group_by(UsageRow.owner, UsageRow.model_version)
            .order_by(UsageRow.owner, UsageRow.model_version)
        )
        if not all_owners:
            query = query.where(col(UsageRow.owner) == owner)
        return await self._db.read(  # an aggregate over a time range can be long: off the loop
            lambda session: [UsageSummary(o, v, n, int(p or 0), int(c or 0)) for o, v, n, p, c in session.exec(query)],
            offload=True,
        )
