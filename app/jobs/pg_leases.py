"""PostgresJobQueue's leases: the heartbeat (`renew`) and `reap`, which takes back what
dead processes left; and the job-row shape both share with the queue."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from .persistence.rows import to_job
from .persistence.tables import JobRow
from .queue import QueuedJob

CHANNEL = "inferql_jobs"

JOB_COLUMNS = [name for name in JobRow.model_fields if name != "result_json"]
JOB_COLUMNS_SQL = ", ".join(f"j.{c}" for c in JOB_COLUMNS)

# Waiting = on the queue, not claimed, still QUEUED. The claim order is (priority desc, tag, arrival).
WAITING = "j.status = 'QUEUED' AND j.queue_tag IS NOT NULL AND j.claimed_by IS NULL"
LIVE = "j.status IN ('QUEUED', 'RUNNING')"


@dataclass
class Reaped:
    """What `reap` did. The caller ends `lost` (WORKER_LOST) and `expired` (EXPIRED) jobs,
    as for a removed job: each still holds its owner's place until `done`, which
    JobRecorder.end calls once the end is stored."""

    requeued: list[str] = field(default_factory=list)
    lost: list[QueuedJob] = field(default_factory=list)
    expired: list[QueuedJob] = field(default_factory=list)
    orphans: list[QueuedJob] = field(default_factory=list)  # stored but never put: the caller puts them
    reservations_dropped: int = 0


def queued_job(row: asyncpg.Record) -> QueuedJob:
    job_row = JobRow(**{c: row[c] for c in JOB_COLUMNS})
    ids = json.loads(row["_ids"]) if row["_ids"] else []
    return QueuedJob(to_job(job_row, with_result=False), ids)


async def renew(pool: asyncpg.Pool, worker_id: str, lease_seconds: float, job_ids: Sequence[str]) -> set[str]:
    """The heartbeat: extends this worker's leases on job_ids. Returns the ids it still
    holds; a job missing from the answer was reaped (its worker should stop it)."""
    if not job_ids:
        return set()
    rows = await pool.fetch(
        f"UPDATE jobs j SET leased_until = clock_timestamp() + make_interval(secs => $3) "
        f"WHERE j.id = ANY($1::varchar[]) AND j.claimed_by = $2 AND {LIVE} RETURNING j.id",
        list(job_ids), worker_id, lease_seconds,
    )
    return {r["id"] for r in rows}


async def release(pool: asyncpg.Pool, worker_id: str, job_ids: Sequence[str]) -> None:
    """A worker stopping on purpose lets its leases lapse now: the next reaper pass (any
    process) queues its jobs again, instead of after a whole lease."""
    if job_ids:
        await pool.execute(
            f"UPDATE jobs j SET leased_until = clock_timestamp() - interval '1 second' "
            f"WHERE j.id = ANY($1::varchar[]) AND j.claimed_by = $2 AND {LIVE}",
            list(job_ids), worker_id,
        )


async def reap(pool: asyncpg.Pool, now: datetime | None = None, *, max_attempts: int = 3,
               orphan_seconds: float = 120.0) -> Reaped:
    """Takes back what dead processes left (any process may run this, at any time):

    - claimed jobs whose lease ran out wait again, at their old tag (first in line). The
      lost attempt is counted: a RUNNING job's when it started (mark_running), a job
      claimed but never started here. One that used max_attempts is taken off the queue
      and returned in `lost`, for the caller to fail (WORKER_LOST);
    - waiting jobs past their deadline are taken off the queue, returned in `expired`;
    - expired reservations are dropped;
    - jobs stored QUEUED but never put on the queue (their process died between the insert
      and the put) for orphan_seconds are returned in `orphans`, marked as holding their
      owner's place, for the caller to put (they have no prompt ids yet).

    `now` defaults to the database's clock."""
    reaped = Reaped()
    async with pool.acquire() as conn, conn.transaction():
        at = now if now is not None else await conn.fetchval("SELECT clock_timestamp()")
        rows = await conn.fetch(
            f"""
            WITH lapsed AS (
                SELECT j.id FROM jobs j
                WHERE j.claimed_by IS NOT NULL AND j.leased_until < $1 AND {LIVE}
                FOR UPDATE SKIP LOCKED
            )
            UPDATE jobs j SET
                attempts = CASE WHEN j.status = 'QUEUED' THEN j.attempts + 1 ELSE j.attempts END,
                status = 'QUEUED', started_at = NULL, claimed_by = NULL, leased_until = NULL,
                queue_tag = CASE WHEN (CASE WHEN j.status = 'QUEUED' THEN j.attempts + 1 ELSE j.attempts END) >= $2
                                 THEN NULL ELSE j.queue_tag END
            FROM lapsed WHERE j.id = lapsed.id
            RETURNING {JOB_COLUMNS_SQL}, j.prompt_ids_json AS _ids
            """,
            at, max_attempts,
        )
        for row in rows:
            if row["queue_tag"] is None:
                reaped.lost.append(queued_job(row))
            else:
                reaped.requeued.append(row["id"])
        expired = await conn.fetch(
            f"""
            WITH due AS (
                SELECT j.id FROM jobs j WHERE {WAITING} AND j.deadline_at < $1 FOR UPDATE SKIP LOCKED
            )
            UPDATE jobs j SET queue_tag = NULL FROM due WHERE j.id = due.id
            RETURNING {JOB_COLUMNS_SQL}, j.prompt_ids_json AS _ids
            """,
            at,
        )
        reaped.expired = [queued_job(r) for r in expired]
        orphans = await conn.fetch(
            f"""
            WITH never_put AS (
                SELECT j.id FROM jobs j
                WHERE j.status = 'QUEUED' AND j.queue_tag IS NULL AND j.claimed_by IS NULL AND NOT j.queue_held
                  AND j.created_at < $1::timestamptz - make_interval(secs => $2)
                FOR UPDATE SKIP LOCKED
            )
            UPDATE jobs j SET queue_held = true FROM never_put WHERE j.id = never_put.id
            RETURNING {JOB_COLUMNS_SQL}, j.prompt_ids_json AS _ids
            """,
            at, orphan_seconds,
        )
        reaped.orphans = [queued_job(r) for r in orphans]
        dropped = await conn.execute("DELETE FROM queue_reservations WHERE expires_at < $1", at)
        reaped.reservations_dropped = int(dropped.rsplit(" ", 1)[-1])
        if reaped.requeued:
            await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
    return reaped
