"""The JobQueue on PostgreSQL: the queue is the `jobs` table itself, shared by every process.

The pattern of graphile-worker, Oban and Solid Queue: workers claim rows with
`FOR UPDATE SKIP LOCKED`, a claim is a lease renewed by heartbeat, and `LISTEN/NOTIFY`
wakes idle workers (with a poll as the fallback).

A job's life on this queue (the store inserts the row, QUEUED, before `put`):

- `put` makes the stored job waiting: it gets its fair-queueing tag (`queue_tag`), an
  arrival number (`queue_seq`), its prompt's token ids, and holds a place of its owner's
  concurrency (`queue_held`).
- `claim(n)` takes up to n waiting jobs in one statement, in order, and leases them to
  this worker (`claimed_by`, `leased_until`). The status stays QUEUED: the worker stores
  RUNNING when the engine starts the job (`JobStore.mark_running`, which counts the
  attempt). A claimed job is no longer waiting: `position` is None and `depth` leaves it
  out, but its owner's place stays taken.
- `renew` extends the leases this worker still holds (the heartbeat); `reap` (any
  process, on a timer) takes back claims whose lease ran out: the job waits again, at its
  old tag, with the lost attempt counted, or is handed back to be failed WORKER_LOST once
  it used `max_attempts`. It also takes waiting jobs past their deadline off the queue (to
  be ended EXPIRED) and drops reservations whose process never used them. Nothing with a
  live lease is touched, so a starting process can run `reap` safely.
- `remove` takes a waiting (unclaimed) job off the queue; the caller ends it.
- `done(job)` frees the job's place of its owner's concurrency once its end is stored.

Order: highest priority first; within a priority, virtual-time fair queueing across
owners, FIFO within an owner, exactly as MemoryJobQueue: a job's tag is one past the
larger of its owner's last tag (`queue_owner_tags`) and the priority's virtual time, the
tag last claimed (`queue_clock`).

Counts are database facts: an owner's active jobs are its QUEUED or RUNNING jobs that
hold a place, plus its live reservations (`queue_reservations`); the depth is the waiting
jobs plus the live reservations. `reserve` checks both and takes the places in one
transaction under an advisory lock, so processes reserving at once cannot all pass a
limit that only some of them fit. A reservation expires after `reservation_seconds`: a
process that dies between reserving and `put` does not keep its places.

Jobs ended while held: the place is counted only while the job is QUEUED or RUNNING, so a
process that stores a job's end and dies before `done` leaks nothing.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Sequence
from datetime import datetime

import asyncpg

from .domain import Job
from .errors import Overloaded, RateLimited
from .pg_leases import CHANNEL, JOB_COLUMNS_SQL, LIVE, WAITING, Reaped, queued_job, reap, release, renew
from .queue import QueuedJob

# pg_advisory_xact_lock key for reserve: any constant shared by every process.
_RESERVE_LOCK = 0x1F0E_5E_27

def dsn(url: str) -> str:
    """A SQLAlchemy-style URL (postgresql+asyncpg://...) as asyncpg takes it."""
    scheme, rest = url.split("://", 1)
    if not scheme.startswith("postgres"):
        raise ValueError("PostgresJobQueue needs a postgresql:// URL")
    return "postgresql://" + rest


def _owner_key(owner: str | None) -> str:
    return owner or ""  # queue_owner_tags.owner is part of its primary key: no NULL there


class PostgresJobQueue:
    """The JobQueue over PostgreSQL's `jobs` table; one per process (its worker's identity).

    `await start()` before use (opens the pool and the LISTEN connection); `await close()`."""

    def __init__(self, url: str, max_queued: int, *, worker_id: str | None = None, lease_seconds: float = 30.0,
                 reservation_seconds: float = 60.0, poll_seconds: float = 2.0, pool_size: int = 5) -> None:
        self.max_queued = max_queued
        self.worker_id = worker_id or f"worker-{uuid.uuid4().hex[:12]}"
        self.lease_seconds = lease_seconds
        self.reservation_seconds = reservation_seconds
        self.poll_seconds = poll_seconds
        self._dsn = dsn(url)
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._work = asyncio.Event()

    async def start(self) -> None:
        self._pool = await asyncpg.create_pool(self._dsn, min_size=1, max_size=self._pool_size)
        self._listener = await asyncpg.connect(self._dsn)
        await self._listener.add_listener(CHANNEL, self._notified)

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def _notified(self, *_args) -> None:
        self._work.set()

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("PostgresJobQueue.start() was not awaited")
        return self._pool

    # ---- admission ------------------------------------------------------------------------

    async def reserve(self, owner: str | None, n: int, owner_limit: int | None) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            # One reserver at a time: READ COMMITTED gives each statement after the lock a
            # snapshot that includes every reservation committed before it.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _RESERVE_LOCK)
            if owner_limit is not None:
                active = await self._active(conn, owner)
                if active + n > owner_limit:
                    raise RateLimited(
                        f"rate limit: {owner_limit} generations queued or running at once for this key",
                        limit="concurrency", retryAfterMs=1000,
                    )
            waiting = await self._depth(conn)
            if n > self.max_queued - waiting:
                raise Overloaded(
                    f"the queue is full ({waiting} of {self.max_queued} jobs waiting); retry shortly",
                    retryAfterMs=1000,
                )
            await conn.execute(
                "INSERT INTO queue_reservations (id, owner, n, expires_at) "
                "VALUES ($1, $2, $3, clock_timestamp() + make_interval(secs => $4))",
                str(uuid.uuid4()), owner, n, self.reservation_seconds,
            )

    async def unreserve(self, owner: str | None, n: int) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await self._take_reservations(conn, owner, n)

    @staticmethod
    async def _take_reservations(conn: asyncpg.Connection, owner: str | None, n: int) -> None:
        """Uses up n reserved places of owner, oldest reservation first (live ones before
        expired ones, which are no longer counted anyway)."""
        rows = await conn.fetch(
            "SELECT id, n FROM queue_reservations WHERE owner IS NOT DISTINCT FROM $1 "
            "ORDER BY expires_at > clock_timestamp() DESC, expires_at FOR UPDATE",
            owner,
        )
        for row in rows:
            if n <= 0:
                break
            take = min(n, row["n"])
            n -= take
            if take == row["n"]:
                await conn.execute("DELETE FROM queue_reservations WHERE id = $1", row["id"])
            else:
                await conn.execute("UPDATE queue_reservations SET n = n - $2 WHERE id = $1", row["id"], take)

    # ---- the queue ------------------------------------------------------------------------

    async def put(self, job: Job, prompt_ids: list[int], *, reserved: bool = True) -> int:
        async with self.pool.acquire() as conn, conn.transaction():
            if reserved:
                await self._take_reservations(conn, job.owner, 1)
            # The owner's tag row is locked by the upsert, so one owner's puts get distinct tags.
            updated = await conn.fetchval(
                """
                WITH vt AS (SELECT coalesce((SELECT vtime FROM queue_clock WHERE priority = $2::int), 0) AS v),
                tag AS (
                    INSERT INTO queue_owner_tags (priority, owner, tag) SELECT $2::int, $3::varchar, v + 1 FROM vt
                    ON CONFLICT (priority, owner)
                    DO UPDATE SET tag = greatest(queue_owner_tags.tag, (SELECT v FROM vt)) + 1
                    RETURNING tag
                )
                UPDATE jobs SET queue_tag = (SELECT tag FROM tag), queue_seq = nextval('jobs_queue_seq'),
                       prompt_ids_json = $4, queue_held = true, claimed_by = NULL, leased_until = NULL
                WHERE id = $1 AND status = 'QUEUED'
                RETURNING id
                """,
                job.id, job.priority, _owner_key(job.owner), json.dumps(prompt_ids),
            )
            if updated is None:
                raise LookupError(f"job {job.id} is not stored as QUEUED: the store inserts it before put")
            await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
            return await self._position(conn, job.id)

    async def claim(self, n: int) -> list[QueuedJob]:
        if n <= 0:
            return []
        rows = await self.pool.fetch(
            f"""
            WITH picked AS (
                SELECT j.id FROM jobs j WHERE {WAITING}
                ORDER BY j.priority DESC, j.queue_tag, j.queue_seq
                LIMIT $1 FOR UPDATE SKIP LOCKED
            ),
            claimed AS (
                UPDATE jobs j SET claimed_by = $2, leased_until = clock_timestamp() + make_interval(secs => $3)
                FROM picked WHERE j.id = picked.id
                RETURNING {JOB_COLUMNS_SQL}, j.prompt_ids_json AS _ids
            ),
            clock AS (
                INSERT INTO queue_clock (priority, vtime)
                SELECT priority, max(queue_tag) FROM claimed GROUP BY priority
                ON CONFLICT (priority) DO UPDATE SET vtime = greatest(queue_clock.vtime, excluded.vtime)
            )
            SELECT * FROM claimed ORDER BY priority DESC, queue_tag, queue_seq
            """,
            n, self.worker_id, self.lease_seconds,
        )
        return [queued_job(r) for r in rows]

    async def remove(self, job_id: str) -> QueuedJob | None:
        row = await self.pool.fetchrow(
            f"UPDATE jobs j SET queue_tag = NULL WHERE j.id = $1 AND {WAITING} "
            f"RETURNING {JOB_COLUMNS_SQL}, j.prompt_ids_json AS _ids",
            job_id,
        )
        return queued_job(row) if row is not None else None

    async def done(self, job: Job) -> None:
        # A plain UPDATE of the job's own row: it waits out a heartbeat or a reap that holds
        # the row's lock for a moment (a SKIP LOCKED pick of "one of the owner's places"
        # could skip it and free nothing).
        await self.pool.execute(
            "UPDATE jobs SET queue_held = false, claimed_by = NULL, leased_until = NULL WHERE id = $1 AND queue_held",
            job.id,
        )

    async def position(self, job_id: str) -> int | None:
        async with self.pool.acquire() as conn:
            return await self._position(conn, job_id)

    @staticmethod
    async def _position(conn: asyncpg.Connection, job_id: str) -> int | None:
        return await conn.fetchval(
            f"""
            SELECT (SELECT count(*) FROM jobs j
                    WHERE {WAITING} AND (-j.priority, j.queue_tag, j.queue_seq) < (-me.priority, me.queue_tag, me.queue_seq))
            FROM jobs me
            WHERE me.id = $1 AND me.status = 'QUEUED' AND me.queue_tag IS NOT NULL AND me.claimed_by IS NULL
            """,
            job_id,
        )

    async def active(self, owner: str | None) -> int:
        async with self.pool.acquire() as conn:
            return await self._active(conn, owner)

    @staticmethod
    async def _active(conn: asyncpg.Connection, owner: str | None) -> int:
        return await conn.fetchval(
            f"""
            SELECT (SELECT count(*) FROM jobs j WHERE j.queue_held AND j.owner IS NOT DISTINCT FROM $1 AND {LIVE})
                 + (SELECT coalesce(sum(n), 0) FROM queue_reservations
                    WHERE owner IS NOT DISTINCT FROM $1 AND expires_at > clock_timestamp())
            """,
            owner,
        )

    async def depth(self) -> int:
        async with self.pool.acquire() as conn:
            return await self._depth(conn)

    @staticmethod
    async def _depth(conn: asyncpg.Connection) -> int:
        return await conn.fetchval(
            f"""
            SELECT (SELECT count(*) FROM jobs j WHERE {WAITING})
                 + (SELECT coalesce(sum(n), 0) FROM queue_reservations WHERE expires_at > clock_timestamp())
            """
        )

    async def wait_for_work(self) -> None:
        """Returns on a NOTIFY from any process's put or reap, or after poll_seconds (a
        notification can be missed while the LISTEN connection reconnects)."""
        try:
            await asyncio.wait_for(self._work.wait(), self.poll_seconds)
        except TimeoutError:
            pass
        self._work.clear()

    # ---- leases ---------------------------------------------------------------------------

    async def renew(self, job_ids: Sequence[str]) -> set[str]:
        """The heartbeat: see pg_leases.renew."""
        return await renew(self.pool, self.worker_id, self.lease_seconds, job_ids)

    async def release(self, job_ids: Sequence[str]) -> None:
        """Ends this worker's leases on job_ids now: see pg_leases.release."""
        await release(self.pool, self.worker_id, job_ids)

    async def reap(self, now: datetime | None = None, *, max_attempts: int = 3, orphan_seconds: float = 120.0) -> Reaped:
        """Takes back what dead processes left: see pg_leases.reap."""
        return await reap(self.pool, now, max_attempts=max_attempts, orphan_seconds=orphan_seconds)
