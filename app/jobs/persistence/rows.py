"""Rows <-> domain objects: the only place that knows how a job, batch or attempt is laid
out in the tables."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from ..domain import (
    Batch,
    BatchCounts,
    DeliveryOutcome,
    GenerationResult,
    GenerationSpec,
    Job,
    JobError,
    JobStatus,
    Review,
    ReviewVerdict,
    Usage,
    WebhookAttempt,
)
from .tables import BatchRow, JobRow, WebhookAttemptRow

TERMINAL = [s.value for s in JobStatus if s.terminal]


def utc(dt: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything stored is UTC."""
    if dt is None or dt.tzinfo is not None:
        return dt
    return dt.replace(tzinfo=UTC)


def to_job(row: JobRow, with_result: bool = True) -> Job:
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
        batch_index=row.batch_index,
    )


def idempotency_scope(owner: str | None, key: str | None) -> str | None:
    return f"{owner or ''}:{key}" if key else None


def new_row(job: Job) -> JobRow:
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


def to_batch(row: BatchRow, counts: BatchCounts, usage: Usage) -> Batch:
    return Batch(id=row.id, owner=row.owner, size=row.size, created_at=utc(row.created_at),
                 finished_at=utc(row.finished_at), cancelled=row.cancelled, counts=counts, usage=usage,
                 webhook_url=row.webhook_url)


def to_attempt(row: WebhookAttemptRow) -> WebhookAttempt:
    return WebhookAttempt(row.attempt, utc(row.at), row.http_status, row.error, utc(row.next_retry_at),
                          DeliveryOutcome(row.outcome) if row.outcome else None)
