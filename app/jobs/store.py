"""Persistence of jobs. Converts rows <-> domain Jobs; nothing else reads the tables."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from .domain import GenerationResult, GenerationSpec, Job, JobError, JobStatus
from .tables import JobRow


def utc(dt: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything stored is UTC."""
    if dt is None or dt.tzinfo is not None:
        return dt
    return dt.replace(tzinfo=UTC)


def _to_job(row: JobRow) -> Job:
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
        idempotency_key=row.idempotency_key,
        webhook_url=row.webhook_url,
        attempts=row.attempts,
        result=GenerationResult.from_dict(json.loads(row.result_json)) if row.result_json else None,
        error=JobError(row.error_code, row.error_message or "") if row.error_code else None,
    )


class JobStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    def _session(self) -> AsyncSession:
        return AsyncSession(self._engine, expire_on_commit=False)

    async def insert(self, job: Job) -> None:
        row = JobRow(
            id=job.id,
            owner=job.owner,
            status=job.status.value,
            priority=job.priority,
            input_json=json.dumps(job.spec.to_dict()),
            idempotency_key=job.idempotency_key,
            webhook_url=job.webhook_url,
            deadline_at=job.deadline_at,
            created_at=job.created_at,
        )
        async with self._session() as session:
            session.add(row)
            await session.commit()

    async def get(self, job_id: str) -> Job | None:
        async with self._session() as session:
            row = await session.get(JobRow, job_id)
            return _to_job(row) if row else None

    async def by_status(self, *statuses: JobStatus) -> list[Job]:
        async with self._session() as session:
            rows = await session.exec(
                select(JobRow)
                .where(col(JobRow.status).in_([s.value for s in statuses]))
                .order_by(col(JobRow.created_at))
            )
            return [_to_job(r) for r in rows]

    async def mark_running(self, job_id: str, started_at: datetime) -> None:
        async with self._session() as session:
            row = await session.get(JobRow, job_id)
            row.status = JobStatus.RUNNING.value
            row.started_at = started_at
            row.attempts += 1
            await session.commit()

    async def finish(
        self,
        job_id: str,
        status: JobStatus,
        finished_at: datetime,
        result: GenerationResult | None = None,
        error: JobError | None = None,
    ) -> None:
        async with self._session() as session:
            row = await session.get(JobRow, job_id)
            row.status = status.value
            row.finished_at = finished_at
            row.result_json = json.dumps(result.to_dict()) if result else None
            row.error_code = error.code if error else None
            row.error_message = error.message if error else None
            await session.commit()
