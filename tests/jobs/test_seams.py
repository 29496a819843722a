"""The job lifecycle's seams, tested against their protocols.

Each fixture yields one implementation per backend: in process (memory), PostgreSQL for
the queue, Redis for the event bus and the quotas. Every implementation passes the same
protocol tests; tests named test_pg_* / test_redis_* check what only a shared store can
show (several instances at once, leases, expiry).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from app.inference.types import SamplingParams
from app.jobs.domain import Caller, GenerationSpec, Job, JobError, JobStatus
from app.jobs.errors import Overloaded, RateLimited
from app.jobs.events import (
    GenerationFailed,
    GenerationStarted,
    JobQueued,
    MemoryEventBus,
)
from app.jobs.persistence.db import Database
from app.jobs.persistence.migrate import upgrade
from app.jobs.persistence.store import JobStore
from app.jobs.pg_queue import PostgresJobQueue
from app.jobs.queue import MemoryJobQueue
from app.jobs.quotas import MemoryQuotaStore

NOW = datetime(2026, 1, 1, tzinfo=UTC)
SPEC = GenerationSpec(prompt="hi", messages=None, sampling=SamplingParams(max_tokens=4))


def job(job_id: str, owner: str = "a", priority: int = 0) -> Job:
    return Job(id=job_id, owner=owner, status=JobStatus.QUEUED, priority=priority, spec=SPEC, created_at=NOW)


# ---- JobQueue ------------------------------------------------------------------------------

POSTGRES = os.environ.get("INFERQL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="module")
async def pg_url():
    """A PostgreSQL database of this module's own, migrated; dropped afterwards."""
    name = f"inferql_test_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(POSTGRES)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = POSTGRES.rsplit("/", 1)[0] + "/" + name
    db = Database(url)
    await upgrade(db.engine)
    await db.dispose()
    yield url
    await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    await admin.close()


@pytest.fixture
async def pg_store(pg_url):
    """Empty queue tables and a JobStore on them."""
    conn = await asyncpg.connect(pg_url)
    await conn.execute("TRUNCATE jobs, queue_reservations, queue_clock, queue_owner_tags")
    await conn.close()
    db = Database(pg_url)
    yield JobStore(db)
    await db.dispose()


class StoredFirst:
    """The PostgreSQL queue takes jobs the store inserted (as JobService does): this inserts
    each job's row before `put`. Everything else goes straight to the queue."""

    def __init__(self, queue: PostgresJobQueue, store: JobStore) -> None:
        self.inner, self._store = queue, store

    async def put(self, job: Job, prompt_ids: list[int], *, reserved: bool = True) -> int:
        if await self._store.get(job.id) is None:
            await self._store.insert(job)
        return await self.inner.put(job, prompt_ids, reserved=reserved)

    def __getattr__(self, name):
        return getattr(self.inner, name)


async def pg_queue(url: str, **kw) -> PostgresJobQueue:
    queue = PostgresJobQueue(url, **{"max_queued": 10, **kw})
    await queue.start()
    return queue


@pytest.fixture(params=["memory", "postgresql"])
def queue_backend(request):
    if request.param == "memory":
        return None
    return request.getfixturevalue("pg_url"), request.getfixturevalue("pg_store")


@pytest.fixture
async def queue(queue_backend):
    if queue_backend is None:
        yield MemoryJobQueue(max_queued=10)
        return
    url, store = queue_backend
    pg = await pg_queue(url)
    yield StoredFirst(pg, store)
    await pg.close()


async def put(queue, *jobs: Job) -> list[int]:
    return [await queue.put(j, [1, 2, 3], reserved=False) for j in jobs]


async def claim_ids(queue, n: int = 100) -> list[str]:
    return [q.job.id for q in await queue.claim(n)]


async def test_queue_claims_by_priority_then_round_robin_across_owners(queue):
    await put(queue, job("a1", "a"), job("a2", "a"), job("a3", "a"), job("b1", "b"), job("hi", "c", priority=5))
    assert await claim_ids(queue) == ["hi", "a1", "b1", "a2", "a3"]
    assert await queue.depth() == 0


async def test_queue_positions_follow_the_claim_order(queue):
    positions = await put(queue, job("a1", "a"), job("a2", "a"), job("b1", "b"))
    assert positions == [0, 1, 1]  # b1 goes before a2: a's second turn comes after b's first
    assert [await queue.position(i) for i in ("a1", "b1", "a2")] == [0, 1, 2]
    assert await queue.position("unknown") is None


async def test_queue_claims_at_most_n(queue):
    await put(queue, job("1"), job("2"), job("3"))
    assert await claim_ids(queue, 2) == ["1", "2"]
    assert await claim_ids(queue, 2) == ["3"]
    assert await queue.claim(2) == []


async def test_queue_remove_takes_a_waiting_job_out(queue):
    await put(queue, job("1"), job("2"))
    removed = await queue.remove("1")
    assert removed is not None and removed.job.id == "1" and removed.prompt_ids == [1, 2, 3]
    assert await queue.remove("1") is None
    assert await queue.position("2") == 0
    assert await claim_ids(queue) == ["2"]


async def test_queue_reserve_holds_the_owner_limit_and_the_room(queue):
    await queue.reserve("a", 3, owner_limit=3)
    with pytest.raises(RateLimited):
        await queue.reserve("a", 1, owner_limit=3)
    assert await queue.active("a") == 3 and await queue.depth() == 3
    await queue.reserve("b", 7, owner_limit=None)
    with pytest.raises(Overloaded):
        await queue.reserve("c", 1, owner_limit=None)
    await queue.unreserve("b", 7)
    assert await queue.depth() == 3


async def test_queue_active_counts_until_done(queue):
    await queue.reserve("a", 1, owner_limit=1)
    await queue.put(job("1", "a"), [1])  # the reserved place becomes the job
    assert await queue.active("a") == 1 and await queue.depth() == 1
    assert await claim_ids(queue) == ["1"]
    assert await queue.active("a") == 1 and await queue.depth() == 0  # running still counts
    await queue.done(job("1", "a"))
    assert await queue.active("a") == 0
    await queue.reserve("a", 1, owner_limit=1)  # room again


async def test_queue_wakes_a_waiting_worker(queue):
    waiter = asyncio.ensure_future(queue.wait_for_work())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await put(queue, job("1"))
    await asyncio.wait_for(waiter, 1)


# PostgreSQL only: what the in-process queue cannot be asked (other processes, leases).

async def stored(store: JobStore, *jobs: Job) -> None:
    for j in jobs:
        await store.insert(j)


async def test_pg_two_workers_never_claim_the_same_job(pg_url, pg_store):
    one, other = await pg_queue(pg_url, max_queued=100), await pg_queue(pg_url, max_queued=100)
    try:
        jobs = [job(f"j{i}", owner=f"o{i % 4}") for i in range(60)]
        await stored(pg_store, *jobs)
        for j in jobs:
            await one.put(j, [1], reserved=False)

        async def drain(queue) -> list[str]:
            got = []
            while batch := await queue.claim(3):
                got += [q.job.id for q in batch]
            return got

        results = await asyncio.gather(*(drain(q) for q in (one, other) for _ in range(4)))
        claimed = [i for r in results for i in r]
        assert sorted(claimed) == sorted(j.id for j in jobs)  # each once
        assert await one.depth() == 0 and await other.active("o1") == 15  # claimed still counts
    finally:
        await one.close()
        await other.close()


async def test_pg_put_on_one_process_wakes_and_is_claimed_by_another_in_fair_order(pg_url, pg_store):
    one, other = await pg_queue(pg_url), await pg_queue(pg_url)
    try:
        waiter = asyncio.ensure_future(other.wait_for_work())
        await asyncio.sleep(0.05)
        await stored(pg_store, job("a1", "a"), job("a2", "a"), job("b1", "b"))
        await one.put(job("a1", "a"), [1], reserved=False)
        await asyncio.wait_for(waiter, 1)  # NOTIFY, well before the poll
        await one.put(job("a2", "a"), [1], reserved=False)
        await other.put(job("b1", "b"), [1], reserved=False)
        assert await claim_ids(other, 1) == ["a1"]
        await stored(pg_store, job("c1", "c"))
        await one.put(job("c1", "c"), [1], reserved=False)  # its tag follows the clock the claim moved
        assert await claim_ids(one) == ["b1", "a2", "c1"]
    finally:
        await one.close()
        await other.close()


async def test_pg_an_expired_lease_is_reaped_and_claimed_again(pg_url, pg_store):
    dead, alive = await pg_queue(pg_url, lease_seconds=30), await pg_queue(pg_url, lease_seconds=30)
    try:
        await stored(pg_store, job("1"), job("2"))
        await dead.put(job("1"), [4, 5], reserved=False)
        await dead.put(job("2"), [6], reserved=False)
        assert await claim_ids(dead) == ["1", "2"]
        await pg_store.mark_running("2", NOW)  # "2" started, "1" was only claimed

        # A starting process reaps: leases still live, nothing is touched.
        reaped = await alive.reap(max_attempts=3)
        assert reaped.requeued == [] and reaped.lost == []
        assert await alive.claim(5) == [] and await alive.position("1") is None

        later = datetime.now(UTC) + timedelta(seconds=31)
        reaped = await alive.reap(later, max_attempts=3)
        assert sorted(reaped.requeued) == ["1", "2"] and reaped.lost == []
        assert await alive.position("1") == 0 and await alive.depth() == 2
        again = await alive.claim(5)
        assert [q.job.id for q in again] == ["1", "2"] and again[0].prompt_ids == [4, 5]
        assert [q.job.attempts for q in again] == [1, 1]  # the claim lost, the run lost (counted when it started)
        row = await pg_store.get("2")
        assert row.status is JobStatus.QUEUED and row.started_at is None

        assert await dead.renew(["1", "2"]) == set()  # the dead worker's heartbeat: no longer its jobs
        assert await alive.renew(["1", "2"]) == {"1", "2"}

        # Past max_attempts: handed back to be failed WORKER_LOST; its owner's place still held until done.
        reaped = await dead.reap(later + timedelta(seconds=31), max_attempts=2)
        assert reaped.requeued == [] and sorted(q.job.id for q in reaped.lost) == ["1", "2"]
        assert await alive.claim(5) == [] and await alive.active("a") == 2
        await alive.done(job("1"))
        await alive.done(job("2"))
        assert await alive.active("a") == 0
    finally:
        await dead.close()
        await alive.close()


async def test_pg_done_frees_its_own_job_even_while_a_heartbeat_locks_the_row(pg_url, pg_store):
    """A worker's heartbeat or a reap can hold the row's lock when the job's end comes: done
    waits for it rather than skipping the row and leaving the ended job holding its place."""
    q = await pg_queue(pg_url)
    try:
        await stored(pg_store, job("1"), job("2"))
        await put(q, job("1"), job("2"))
        assert await claim_ids(q) == ["1", "2"]
        async with q.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT 1 FROM jobs WHERE id = '2' FOR UPDATE")
            freeing = asyncio.ensure_future(q.done(job("2")))
            await asyncio.sleep(0.2)
            assert not freeing.done()
        await asyncio.wait_for(freeing, 5)
        held = await q.pool.fetch("SELECT id FROM jobs WHERE queue_held ORDER BY id")
        assert [r["id"] for r in held] == ["1"] and await q.active("a") == 1
    finally:
        await q.close()


async def test_pg_reap_takes_waiting_jobs_past_their_deadline(pg_url, pg_store):
    queue = await pg_queue(pg_url)
    try:
        late = Job(id="late", owner="a", status=JobStatus.QUEUED, priority=0, spec=SPEC, created_at=NOW,
                   deadline_at=datetime.now(UTC) - timedelta(seconds=1))
        await stored(pg_store, late, job("fine"))
        await queue.put(late, [1], reserved=False)
        await queue.put(job("fine"), [1], reserved=False)
        reaped = await queue.reap()
        assert [q.job.id for q in reaped.expired] == ["late"]
        assert await queue.position("late") is None and await queue.position("fine") == 0
    finally:
        await queue.close()


async def test_pg_reserve_is_atomic_across_processes(pg_url, pg_store):
    one, other = await pg_queue(pg_url, max_queued=100), await pg_queue(pg_url, max_queued=100)
    try:
        async def try_reserve(queue) -> bool:
            try:
                await queue.reserve("a", 1, owner_limit=5)
                return True
            except RateLimited:
                return False

        outcomes = await asyncio.gather(*(try_reserve(q) for q in (one, other) for _ in range(10)))
        assert outcomes.count(True) == 5
        assert await one.active("a") == 5 and await other.depth() == 5
    finally:
        await one.close()
        await other.close()


async def test_pg_reservations_of_a_dead_process_expire(pg_url, pg_store):
    dead = await pg_queue(pg_url, reservation_seconds=0.2)
    other = await pg_queue(pg_url)
    try:
        await dead.reserve("a", 3, owner_limit=3)
        with pytest.raises(RateLimited):
            await other.reserve("a", 1, owner_limit=3)
        await asyncio.sleep(0.3)
        assert await other.active("a") == 0 and await other.depth() == 0
        assert (await other.reap()).reservations_dropped == 1
        await other.reserve("a", 3, owner_limit=3)
    finally:
        await dead.close()
        await other.close()


# ---- EventBus ------------------------------------------------------------------------------

REDIS_URL = os.environ.get("INFERQL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def fresh_redis_prefix() -> str:
    """A key prefix of this test's own on the test Redis (skips the test when there is none)."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.ConnectionError:
        pytest.skip(f"no Redis at {REDIS_URL}")
    return f"inferql-test:{uuid.uuid4().hex}:"


async def drop_redis_prefix(prefix: str) -> None:
    import redis.asyncio as aredis

    client = aredis.Redis.from_url(REDIS_URL)
    keys = [key async for key in client.scan_iter(match=prefix + "*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
async def redis_prefix():
    prefix = fresh_redis_prefix()
    yield prefix
    await drop_redis_prefix(prefix)


@pytest.fixture(params=["memory", "redis"])
async def bus(request):
    if request.param == "memory":
        yield MemoryEventBus(keep_ended=2)
        return
    from app.jobs.redis_events import RedisEventBus

    bus = RedisEventBus(REDIS_URL, prefix=(prefix := fresh_redis_prefix()))
    yield bus
    await bus.aclose()
    await drop_redis_prefix(prefix)


def started(job_id: str = "j"):
    from app.inference.types import ModelInfo

    return GenerationStarted(job_id, NOW, ModelInfo("m", "v", 1, "float32", "cpu", 8, "s"), 3)


async def test_bus_numbers_events_whatever_they_came_with(bus):
    first = await bus.append(JobQueued("j", NOW, 0, seq=99))
    second = await bus.append(started())
    assert (first.seq, second.seq) == (1, 2)
    assert await bus.last_seq("j") == 2 and await bus.ended("j") is False
    assert await bus.last_seq("other") is None and await bus.ended("other") is None
    assert await bus.follow("other") is None


async def test_bus_replays_after_seq_then_follows_live_to_the_end(bus):
    await bus.append(JobQueued("j", NOW, 0))
    await bus.append(started())
    seen = []

    async def consume():
        async for event in await bus.follow("j", after=1):
            seen.append(event.seq)

    task = asyncio.ensure_future(consume())
    await asyncio.sleep(0.01)
    assert seen == [2] and not task.done()
    await bus.append(GenerationFailed("j", NOW, JobError("X", "x")))
    await asyncio.wait_for(task, 1)
    assert seen == [2, 3]
    assert await bus.ended("j") is True


async def test_bus_follow_from_the_end_of_an_ended_stream_completes(bus):
    await bus.append(JobQueued("j", NOW, 0))
    await bus.append(GenerationFailed("j", NOW, JobError("X", "x")))
    assert [e.seq async for e in await bus.follow("j", after=2)] == []
    with pytest.raises(RuntimeError):
        await bus.append(started())


async def test_bus_forgets_old_ended_streams(bus):
    if not isinstance(bus, MemoryEventBus):
        pytest.skip("keep_ended bounds the in-memory bus; Redis streams expire instead "
                    "(test_redis_bus_expires_ended_streams)")
    for job_id in ("1", "2", "3"):
        await bus.append(JobQueued(job_id, NOW, 0))
        await bus.append(GenerationFailed(job_id, NOW, JobError("X", "x")))
    assert await bus.last_seq("1") is None  # keep_ended=2: the oldest is gone (replayed from the DB)
    assert await bus.last_seq("3") == 2


async def test_redis_follow_waits_past_the_clients_default_socket_timeout(redis_prefix):
    """redis-py's default 5 s socket timeout once cut XREAD BLOCK 5000 short: a subscriber of a
    job queued for longer got a TimeoutError instead of its next event."""
    from app.jobs.redis_events import RedisEventBus

    bus = RedisEventBus(REDIS_URL, prefix=redis_prefix)  # the default 5 s block, as deployed
    try:
        await bus.append(JobQueued("idle", NOW, 0))
        stream = await bus.follow("idle", 1)
        nxt = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(6.5)
        assert not nxt.done()
        await bus.append(GenerationFailed("idle", NOW, JobError("INTERNAL", "x")))
        event = await asyncio.wait_for(nxt, 5)
        assert isinstance(event, GenerationFailed) and event.seq == 2
    finally:
        await bus.aclose()


# Redis only: what the in-memory bus does by other means (expiry, other replicas).

def full_events(job_id: str) -> list:
    """One event of each kind, with every nested object filled in."""
    from app.inference.confidence import Confidence
    from app.inference.types import FinishReason, ModelInfo, TokenAlternative
    from app.jobs.domain import GenerationResult, TokenRecord, Timing, Usage
    from app.jobs.events import GenerationCancelled, GenerationCompleted, TokenGenerated

    model = ModelInfo("m", "v1", 135_000_000, "bfloat16", "cuda:0", 8192, "hf:org/m@abc")
    tokens = tuple(TokenRecord(i, 100 + i, f" t{i}", -0.1 * (i + 1) / 3,
                               (TokenAlternative(7, "é", -1.25), TokenAlternative(8, "\n", float("-inf"))),
                               1767225600.123456 + i, seq=3 + i) for i in range(2))
    result = GenerationResult(" t0 t1", FinishReason.LENGTH, Confidence(0.9, -0.105, 0.81, 1.11), True, tokens,
                              model, Usage(3, 2), Timing(1.5, 20.25, 40.0, 61.75, None))
    at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    return [JobQueued(job_id, at, position=4), GenerationStarted(job_id, at, model=model, prompt_tokens=3),
            TokenGenerated(job_id, at, token=tokens[0]), GenerationCompleted(job_id, at, result=result),
            GenerationFailed(job_id, at, error=JobError("ENGINE_ERROR", "boom \u2603")),
            GenerationCancelled(job_id, at, result=result, status=JobStatus.EXPIRED)]


async def test_redis_bus_replays_every_event_kind_faithfully_on_another_replica(redis_prefix):
    from dataclasses import replace

    from app.jobs.redis_events import RedisEventBus

    one, other = RedisEventBus(REDIS_URL, prefix=redis_prefix), RedisEventBus(REDIS_URL, prefix=redis_prefix)
    try:
        for i, event in enumerate(full_events("x")):  # each kind second in a stream of its own
            job_id = f"j{i}"
            await one.append(JobQueued(job_id, NOW, 0))
            appended = await one.append(replace(event, job_id=job_id))
            assert appended == replace(event, job_id=job_id, seq=2)
            assert [e async for e in _take(await other.follow(job_id, after=1), 1)] == [appended]
    finally:
        await one.aclose()
        await other.aclose()


async def test_redis_bus_follows_live_events_appended_by_another_replica(redis_prefix):
    from app.jobs.redis_events import RedisEventBus

    worker, api = (RedisEventBus(REDIS_URL, prefix=redis_prefix, block_ms=50) for _ in range(2))
    try:
        await worker.append(JobQueued("j", NOW, 0))
        seen = []

        async def consume():
            async for event in await api.follow("j"):
                seen.append(event.seq)

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.2)  # the follower waits past a few empty blocking reads
        assert seen == [1] and not task.done()
        await worker.append(started())
        await worker.append(GenerationFailed("j", NOW, JobError("X", "x")))
        await asyncio.wait_for(task, 2)
        assert seen == [1, 2, 3]
        with pytest.raises(RuntimeError):
            await api.append(started())  # no replica may add after the end
    finally:
        await worker.aclose()
        await api.aclose()


async def test_redis_bus_numbers_concurrent_appends_of_one_step(redis_prefix):
    from app.jobs.events import TokenGenerated
    from app.jobs.redis_events import RedisEventBus

    bus = RedisEventBus(REDIS_URL, prefix=redis_prefix)
    token = full_events("x")[2].token
    try:
        for job_id in "abc":
            await bus.append(JobQueued(job_id, NOW, 0))
        for _ in range(20):  # like the worker: each step, every running job appends its token at once
            await asyncio.gather(*(bus.append(TokenGenerated(job_id, NOW, token)) for job_id in "abc"))
        assert [await bus.last_seq(job_id) for job_id in "abc"] == [21, 21, 21]
        seqs = [e.seq async for e in _take(await bus.follow("b"), 21)]
        assert seqs == list(range(1, 22))
    finally:
        await bus.aclose()


async def _take(stream, n: int):
    async for event in stream:
        yield event
        n -= 1
        if n == 0:
            return


async def test_redis_bus_expires_ended_streams(redis_prefix):
    import redis.asyncio as aredis

    from app.jobs.redis_events import RedisEventBus

    bus = RedisEventBus(REDIS_URL, prefix=redis_prefix, ended_ttl=0.3, live_ttl=3600)
    client = aredis.Redis.from_url(REDIS_URL)
    try:
        await bus.append(JobQueued("j", NOW, 0))
        assert 3000_000 < await client.pttl(bus.key("j")) <= 3600_000  # a live stream: the long TTL
        await bus.append(GenerationFailed("j", NOW, JobError("X", "x")))
        assert 0 < await client.pttl(bus.key("j")) <= 300  # ended: the short one
        assert await bus.last_seq("j") == 2
        await asyncio.sleep(0.4)
        assert await bus.last_seq("j") is None and await bus.ended("j") is None
        assert await bus.follow("j") is None  # the caller replays it from the database
    finally:
        await bus.aclose()
        await client.aclose()


# ---- QuotaStore ----------------------------------------------------------------------------

@pytest.fixture(params=["memory", "redis"])
async def quotas(request):
    if request.param == "memory":
        yield MemoryQuotaStore(window_seconds=60)
        return
    from app.jobs.redis_quotas import RedisQuotaStore

    quotas = RedisQuotaStore(REDIS_URL, prefix=(prefix := fresh_redis_prefix()), window_seconds=60)
    yield quotas
    await quotas.aclose()
    await drop_redis_prefix(prefix)


KEY = Caller(key_id="k", name="k", admin=False, rpm=2, tpm=100)


async def test_quota_requests_are_counted_and_refused_past_the_limit(quotas):
    await quotas.hit_request(KEY)
    await quotas.hit_request(KEY)
    with pytest.raises(RateLimited) as refused:
        await quotas.hit_request(KEY)
    assert refused.value.extensions["limit"] == "requests" and refused.value.extensions["retryAfterMs"] > 0
    assert (await quotas.state(KEY))["requests"]["remaining"] == 0


async def test_quota_charge_counts_even_past_the_limit(quotas):
    for _ in range(3):
        await quotas.charge_request(KEY.owner)
    with pytest.raises(RateLimited):
        await quotas.hit_request(KEY)


async def test_quota_tokens_are_reserved_all_or_none_and_settled(quotas):
    await quotas.reserve_tokens(KEY, ["1", "2"], [30, 30])
    with pytest.raises(RateLimited):
        await quotas.reserve_tokens(KEY, ["3", "4"], [30, 30])  # 60 + 60 > 100: neither is reserved
    assert (await quotas.state(KEY))["tokens"]["remaining"] == 40
    await quotas.settle("1", 10)  # used 10 of its 30
    await quotas.settle("2", 0)   # released
    assert (await quotas.state(KEY))["tokens"]["remaining"] == 90
    await quotas.settle("1", 10)  # a second settle is a no-op
    assert (await quotas.state(KEY))["tokens"]["remaining"] == 90


async def test_quota_refuses_a_request_bigger_than_the_whole_limit(quotas):
    with pytest.raises(RateLimited) as refused:
        await quotas.reserve_tokens(KEY, ["1"], [101])
    assert "lower maxTokens" in refused.value.message


async def test_quota_leaves_unlimited_callers_alone(quotas):
    free = Caller(key_id="f", name="f", admin=False)
    for _ in range(100):
        await quotas.hit_request(free)
    await quotas.reserve_tokens(free, ["x"], [10**9])
    assert await quotas.state(Caller(key_id=None, name="anon", admin=True)) is None


# Redis only: reservations that nobody settles, and one window shared by every replica.

async def test_redis_quota_reservation_expires_when_nobody_settles_it(redis_prefix):
    from app.jobs.redis_quotas import RedisQuotaStore

    quotas = RedisQuotaStore(REDIS_URL, prefix=redis_prefix, reservation_ttl=0.3)
    try:
        await quotas.reserve_tokens(KEY, ["dead"], [80])  # its worker dies: no settle comes
        with pytest.raises(RateLimited):
            await quotas.reserve_tokens(KEY, ["next"], [30])
        await asyncio.sleep(0.4)
        assert (await quotas.state(KEY))["tokens"]["remaining"] == 100
        await quotas.reserve_tokens(KEY, ["next"], [30])
        await quotas.settle("dead", 80)  # too late: it no longer counts, nor is it billed
        assert (await quotas.state(KEY))["tokens"]["remaining"] == 70
    finally:
        await quotas.aclose()


async def test_redis_quota_replicas_share_one_window(redis_prefix):
    from app.jobs.redis_quotas import RedisQuotaStore

    one, other = (RedisQuotaStore(REDIS_URL, prefix=redis_prefix) for _ in range(2))
    try:
        await one.hit_request(KEY)
        await other.hit_request(KEY)
        with pytest.raises(RateLimited):
            await one.hit_request(KEY)  # rpm=2 across both
        await one.reserve_tokens(KEY, ["1"], [60])
        with pytest.raises(RateLimited):
            await other.reserve_tokens(KEY, ["2"], [60])
        await other.settle("1", 25)  # settled by whichever replica ran it
        assert (await one.state(KEY))["tokens"]["remaining"] == 75
        await other.reserve_tokens(KEY, ["2"], [60])
    finally:
        await one.aclose()
        await other.aclose()


async def test_redis_quota_check_and_reserve_is_atomic_under_contention(redis_prefix):
    from app.jobs.redis_quotas import RedisQuotaStore

    stores = [RedisQuotaStore(REDIS_URL, prefix=redis_prefix) for _ in range(4)]
    try:
        async def try_reserve(i: int) -> bool:
            try:
                await stores[i % 4].reserve_tokens(KEY, [f"j{i}"], [10])
                return True
            except RateLimited:
                return False

        granted = await asyncio.gather(*(try_reserve(i) for i in range(40)))
        assert sum(granted) == 10  # tpm=100: exactly ten of 10, whatever the interleaving
    finally:
        for store in stores:
            await store.aclose()


async def test_redis_quota_window_moves(redis_prefix):
    from app.jobs.redis_quotas import RedisQuotaStore

    quotas = RedisQuotaStore(REDIS_URL, prefix=redis_prefix, window_seconds=1)
    try:
        await quotas.hit_request(KEY)
        await asyncio.sleep(0.3)
        await quotas.hit_request(KEY)
        with pytest.raises(RateLimited) as refused:
            await quotas.hit_request(KEY)
        assert 0 < refused.value.extensions["retryAfterMs"] <= 700
        await asyncio.sleep(refused.value.extensions["retryAfterMs"] / 1000 + 0.05)
        await quotas.hit_request(KEY)  # the oldest hit left the window
        assert (await quotas.state(KEY))["requests"]["remaining"] == 0
    finally:
        await quotas.aclose()


# ---- Canceller (the in-process Worker) -----------------------------------------------------

async def test_worker_cancels_only_jobs_it_runs(tmp_path, tiny_model_dir):
    from app.inference.engine import Engine
    from app.inference.model import load_model
    from app.jobs.persistence.db import Database
    from app.jobs.persistence.migrate import upgrade
    from app.jobs.recorder import JobRecorder
    from app.jobs.persistence.store import JobStore
    from app.jobs.worker import Worker

    lm = load_model(tiny_model_dir, device="cpu", threads=1)
    db = Database(f"sqlite:///{tmp_path / 'jobs.db'}")
    await upgrade(db.engine)
    engine = Engine(lm, max_batch_size=2)
    engine.start()
    queue, bus = MemoryJobQueue(10), MemoryEventBus()
    store = JobStore(db)
    recorder = JobRecorder(store=store, queue=queue, bus=bus, quotas=MemoryQuotaStore(), model=lm.info,
                           review_threshold=0.5)
    worker = Worker(queue, engine, recorder)
    try:
        assert await worker.cancel("nobody") is False
        long = Job(id="long", owner="a", status=JobStatus.QUEUED, priority=0, created_at=datetime.now(UTC),
                   spec=GenerationSpec(prompt="hi", messages=None, sampling=SamplingParams(max_tokens=400)))
        await store.insert(long)
        await recorder.queued(long, await queue.put(long, lm.encode_raw("hi"), reserved=False))
        worker.start()
        events = await bus.follow("long")
        kinds = []
        async for event in events:
            kinds.append(type(event).__name__)
            if len(kinds) == 3:  # queued, started, a first token: it runs here
                assert await worker.cancel("long") is True
        assert kinds[-1] == "GenerationCancelled" and len(kinds) < 400
        assert (await store.get("long")).status is JobStatus.CANCELLED
        assert await queue.active("a") == 0
    finally:
        await worker.stop()
        await engine.stop()
        await db.dispose()
