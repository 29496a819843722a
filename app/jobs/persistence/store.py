"""The store: queries on jobs, batches, reviews, usage and webhook attempts.

A job's end and what it brings (as the job layer's `Ending` decides) are written in one
transaction, so a crash can never leave a finished job whose callback or bill is lost.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import and_, bindparam, delete, func, or_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import defer
from sqlmodel import Session, col, select

from ..domain import Batch, BatchCounts, Job, JobStatus, Page, ReviewVerdict, Usage
from .cursors import decode_cursor, decode_index_cursor, encode_cursor, encode_index_cursor
from .db import Database
from .rows import TERMINAL, idempotency_scope, new_row, to_batch, to_job, utc
from .tables import BatchRow, JobRow, UsageRow, WebhookAttemptRow, WebhookRow
from .writer import Writer

if TYPE_CHECKING:
    from ..ending import Ending


@dataclass(frozen=True)
class Ended:
    changed: bool          # False: the job was already terminal (or is unknown)
    webhooks_queued: bool


# Built once, run with each job's values: composing this UPDATE anew cost the event loop
# ~0.5 ms per job (SQLAlchemy's expression building), as much as 4 us per token of a
# 128-token generation.
_MARK_RUNNING = (
    update(JobRow)
    .where(col(JobRow.id) == bindparam("running_id"), col(JobRow.status) == JobStatus.QUEUED.value)
    .values(status=JobStatus.RUNNING.value, attempts=JobRow.attempts + 1,
            started_at=bindparam("running_at", type_=JobRow.__table__.c.started_at.type))
)
_MARK_RUNNING_CLAIMED = _MARK_RUNNING.where(col(JobRow.claimed_by) == bindparam("running_by"))


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
            await self.writer.write(lambda session: session.add(new_row(job)))
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
                row = new_row(job)
                row.batch_index = index
                session.add(row)

        await self.writer.write(op)

    async def mark_running(self, job_id: str, started_at: datetime, *, claimed_by: str | None = None) -> None:
        """claimed_by: only while this worker holds the job's lease (the shared queue)."""
        statement, params = _MARK_RUNNING, {"running_id": job_id, "running_at": started_at}
        if claimed_by is not None:
            statement, params["running_by"] = _MARK_RUNNING_CLAIMED, claimed_by
        await self.writer.write(lambda session: session.exec(statement, params=params))

    async def requeue(self, job_id: str) -> None:
        """A job whose worker died goes back to QUEUED, keeping its attempt count."""
        await self._execute(
            update(JobRow).where(col(JobRow.id) == job_id).values(status=JobStatus.QUEUED.value, started_at=None)
        )

    async def finish(self, job_id: str, ending: Ending, *, claimed_by: str | None = None) -> Ended:
        """Ends a job (once: a job already terminal is left alone) and writes what its end
        brings, as `ending` decides: review flag, usage record, webhook messages, the
        batch's end. All in one transaction.

        The row is locked while it is read (PostgreSQL): two processes ending the same job
        at once cannot both see it live. claimed_by: only while this worker holds the job's
        lease (a worker whose job was re-queued to another after its lease lapsed writes
        nothing)."""

        def op(session: Session) -> Ended:
            row = session.get(JobRow, job_id, with_for_update=True)
            if row is None or JobStatus(row.status).terminal:
                return Ended(False, False)
            if claimed_by is not None and row.claimed_by != claimed_by:
                return Ended(False, False)
            result, error = ending.result, ending.error
            row.status = ending.status.value
            row.finished_at = ending.finished_at
            row.result_json = json.dumps(result.to_dict()) if result else None
            row.error_code = error.code if error else None
            row.error_message = error.message if error else None
            if result is not None:
                row.prompt_tokens = result.usage.prompt_tokens
                row.completion_tokens = result.usage.completion_tokens
            row.needs_review = ending.needs_review
            if (bill := ending.bill) is not None:
                session.add(UsageRow(owner=row.owner, kind="generation", model_version=result.model.version,
                                     at=ending.finished_at, prompt_tokens=bill.prompt_tokens,
                                     completion_tokens=bill.completion_tokens))
            # The ended job as it now stands, from what is in hand (no JSON round trip).
            message = ending.job_webhook(replace(to_job(row, with_result=False), result=result))
            if message is not None:
                session.add(message)
            queued = message is not None
            if row.batch_id:
                session.flush()
                queued |= self._maybe_finish_batch(session, row.batch_id, ending)
            return Ended(True, queued)

        return await self.writer.write(op)

    def _maybe_finish_batch(self, session: Session, batch_id: str, ending: Ending) -> bool:
        batch = session.get(BatchRow, batch_id)
        if batch is None or batch.finished_at is not None:
            return False
        counts, usage = self._batch_counts(session, batch_id)
        if not counts.done:
            return False
        batch.finished_at = ending.finished_at
        message = ending.batch_webhook(to_batch(batch, counts, usage))
        if message is not None:
            session.add(message)
        return message is not None

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

    # ---- reads ----------------------------------------------------------------------------

    async def get(self, job_id: str) -> Job | None:
        def query(session: Session) -> Job | None:
            row = session.get(JobRow, job_id)
            return to_job(row) if row else None

        return await self._db.read(query)

    async def _by_scope(self, scope: str) -> Job | None:
        def query(session: Session) -> Job | None:
            row = session.exec(select(JobRow).where(col(JobRow.idempotency_scope) == scope)).first()
            return to_job(row) if row else None

        return await self._db.read(query)

    async def by_status(self, *statuses: JobStatus) -> list[Job]:
        query = (select(JobRow).where(col(JobRow.status).in_([s.value for s in statuses]))
                 .order_by(col(JobRow.created_at)))
        return await self._db.read(lambda session: [to_job(r) for r in session.exec(query)], offload=True)

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
        input_order: bool = False,
    ) -> Page:
        """Newest first, keyset-paginated on (created_at, id); with `batch_id` and
        `input_order`, in the batch's input order instead, keyset-paginated on the index.

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
        by_index = input_order and batch_id is not None
        if by_index:
            if after:
                query = query.where(col(JobRow.batch_index) > decode_index_cursor(after))
            query = query.order_by(col(JobRow.batch_index)).limit(first + 1)
        else:
            if after:
                at, last_id = decode_cursor(after)
                query = query.where(or_(col(JobRow.created_at) < at,
                                        and_(col(JobRow.created_at) == at, col(JobRow.id) < last_id)))
            query = query.order_by(col(JobRow.created_at).desc(), col(JobRow.id).desc()).limit(first + 1)
        rows = await self._db.read(lambda session: list(session.exec(query)))
        has_next = len(rows) > first
        rows = rows[:first]
        cursors = [encode_index_cursor(r.batch_index or 0) if by_index else encode_cursor(utc(r.created_at), r.id)
                   for r in rows]
        return Page(items=[to_job(r, with_results) for r in rows], cursors=cursors,
                    end_cursor=cursors[-1] if cursors else None, has_next_page=has_next)

    async def batch(self, batch_id: str) -> Batch | None:
        def query(session: Session) -> Batch | None:
            row = session.get(BatchRow, batch_id)
            if row is None:
                return None
            counts, usage = self._batch_counts(session, batch_id)
            return to_batch(row, counts, usage)

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
