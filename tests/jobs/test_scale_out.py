"""The shared topology's own rules, on the real PostgreSQL and Redis: topology checks at
start, migrations racing on a fresh database, a job's end written once, the reaper, and the
deployment file naming only real settings and commands. (The whole topology, as separate
processes with the real model: tests/e2e/test_cluster.py.)"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
import yaml

from app.inference.types import ModelInfo
from app.jobs.domain import JobStatus
from app.jobs.ending import Ending
from app.jobs.events import GenerationFailed, JobQueued, MemoryEventBus
from app.jobs.persistence.db import Database
from app.jobs.persistence.migrate import head, upgrade
from app.jobs.persistence.store import JobStore
from app.jobs.pg_queue import PostgresJobQueue
from app.jobs.quotas import MemoryQuotaStore
from app.jobs.reaper import Reaper
from app.jobs.recorder import JobRecorder
from app.settings import Settings
from app.wiring import ConfigError, check_topology
from tests.databases import POSTGRES, REDIS, fresh_postgres
from tests.jobs.test_seams import job

ROOT = Path(__file__).resolve().parents[2]
MODEL = ModelInfo(id="m", version="v", parameters=1, dtype="float32", device="cpu", context_length=64, source="t")


@pytest.fixture
async def fresh_pg():
    async with fresh_postgres("inferql_scale") as url:
        yield url


# ---- topology checks ----------------------------------------------------------------------

def test_roles_other_than_all_need_postgresql_and_redis():
    with pytest.raises(ConfigError, match="API-only replica needs the shared topology"):
        check_topology(Settings(role="api", database_url="sqlite:///x.db"))
    with pytest.raises(ConfigError, match="separate worker needs the shared topology"):
        check_topology(Settings(role="worker", database_url=POSTGRES))
    with pytest.raises(ConfigError, match="must be PostgreSQL"):
        check_topology(Settings(redis_url=REDIS, database_url="sqlite:///x.db"))
    with pytest.raises(ConfigError, match="cannot reach Redis"):
        check_topology(Settings(role="api", redis_url="redis://127.0.0.1:1/0", database_url=POSTGRES))
    check_topology(Settings(role="api", redis_url=REDIS, database_url=POSTGRES))
    check_topology(Settings())  # the embedded default


def test_the_compose_file_names_only_real_settings_and_commands():
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    fields = {f"INFERQL_{name.upper()}" for name in Settings.model_fields}
    commands = {}
    for name, service in services.items():
        for var in service.get("environment", {}):
            if var.startswith("INFERQL_"):
                assert var in fields, f"{name}: {var} is no setting"
        commands[name] = service.get("command")
    assert commands["api-1"] == commands["api-2"] == ["inferql", "serve", "--api-only"]
    assert commands["worker-1"] == commands["worker-2"] == ["inferql", "worker"]
    env = services["api-1"]["environment"]
    shared = Settings(database_url=env["INFERQL_DATABASE_URL"], redis_url=env["INFERQL_REDIS_URL"], role="api")
    assert shared.database_url.startswith("postgresql://") and shared.redis_url.startswith("redis://")


# ---- migrations ---------------------------------------------------------------------------

async def test_replicas_migrating_a_fresh_database_at_once_all_come_up(fresh_pg):
    dbs = [Database(fresh_pg) for _ in range(3)]
    try:
        await asyncio.gather(*(upgrade(db.engine) for db in dbs))
    finally:
        for db in dbs:
            await db.dispose()
    conn = await asyncpg.connect(fresh_pg)
    try:
        assert await conn.fetch("SELECT version_num FROM alembic_version") == [(head(),)]
    finally:
        await conn.close()


# ---- a job's end, once --------------------------------------------------------------------

@pytest.fixture
async def migrated(fresh_pg):
    db = Database(fresh_pg)
    await upgrade(db.engine)
    yield fresh_pg, db
    await db.dispose()


async def test_a_job_ends_once_when_two_processes_end_it_at_once(migrated):
    url, db = migrated
    store = JobStore(db)
    await store.insert(job("j1"))
    others = [Database(url) for _ in range(2)]
    try:
        stores = [JobStore(d) for d in others]
        at = datetime.now(UTC)
        ended = await asyncio.gather(stores[0].finish("j1", Ending(JobStatus.CANCELLED, at)),
                                     stores[1].finish("j1", Ending(JobStatus.FAILED, at)))
    finally:
        for d in others:
            await d.dispose()
    assert sorted(e.changed for e in ended) == [False, True]
    winner = JobStatus.CANCELLED if ended[0].changed else JobStatus.FAILED
    assert (await store.get("j1")).status is winner


async def test_only_the_lease_holder_stores_a_start_or_an_end(migrated):
    url, db = migrated
    store = JobStore(db)
    queue = PostgresJobQueue(url, 10, worker_id="w1")
    await queue.start()
    try:
        await store.insert(job("j1"))
        await queue.put(job("j1"), [1, 2], reserved=False)
        assert [q.job.id for q in await queue.claim(1)] == ["j1"]
        at = datetime.now(UTC)
        await store.mark_running("j1", at, claimed_by="w2")
        assert (await store.get("j1")).status is JobStatus.QUEUED
        await store.mark_running("j1", at, claimed_by="w1")
        assert (await store.get("j1")).status is JobStatus.RUNNING
        assert not (await store.finish("j1", Ending(JobStatus.SUCCEEDED, at), claimed_by="w2")).changed
        assert (await store.finish("j1", Ending(JobStatus.SUCCEEDED, at), claimed_by="w1")).changed
    finally:
        await queue.close()


# ---- the reaper ---------------------------------------------------------------------------

async def first_events(bus, job_id: str, n: int) -> list:
    stream = await bus.follow(job_id, 0)
    out = []
    async with asyncio.timeout(5):
        async for event in stream:
            out.append(event)
            if len(out) == n:
                break
    return out


async def running_on_w1(store: JobStore, queue: PostgresJobQueue, job_id: str) -> None:
    """A job stored, queued, claimed by worker w1 (the queue's worker id) and started there."""
    await store.insert(job(job_id))
    await queue.put(job(job_id), [1], reserved=False)
    await queue.claim(1)
    await store.mark_running(job_id, datetime.now(UTC), claimed_by="w1")


async def reaper_parts(url: str, db: Database, lease: float = 30.0):
    store = JobStore(db)
    queue = PostgresJobQueue(url, 10, worker_id="w1", lease_seconds=lease)
    await queue.start()
    bus = MemoryEventBus()
    recorder = JobRecorder(store=store, queue=queue, bus=bus, quotas=MemoryQuotaStore(60), model=MODEL,
                           review_threshold=0.5)
    return store, queue, bus, recorder


async def test_the_reaper_fails_a_job_whose_worker_died_at_its_last_attempt(migrated):
    url, db = migrated
    store, queue, bus, recorder = await reaper_parts(url, db, lease=0.2)
    try:
        await running_on_w1(store, queue, "j1")
        await asyncio.sleep(0.4)  # the worker "died": no heartbeat
        reaper = Reaper(queue, recorder, lambda spec: [1], max_attempts=1, interval=60)
        reaped = await reaper.run_once()
        assert [q.job.id for q in reaped.lost] == ["j1"]
        stored = await store.get("j1")
        assert stored.status is JobStatus.FAILED and stored.error.code == "WORKER_LOST"
        assert isinstance((await first_events(bus, "j1", 1))[-1], GenerationFailed)
        assert await queue.active("a") == 0  # its owner's place is free again
    finally:
        await queue.close()


async def test_the_reaper_queues_a_job_stored_but_never_queued(migrated):
    url, db = migrated
    store, queue, bus, recorder = await reaper_parts(url, db)
    try:
        now = datetime.now(UTC)
        await store.insert(replace(job("j1"), created_at=now - timedelta(hours=1)))  # its process died before put
        await store.insert(replace(job("j2"), created_at=now))  # a fresh one: its put may be on its way
        reaper = Reaper(queue, recorder, lambda spec: [7, 8, 9], max_attempts=3, interval=60)
        reaped = await reaper.run_once()
        assert [q.job.id for q in reaped.orphans] == ["j1"]
        assert await queue.position("j1") == 0 and await queue.position("j2") is None
        assert isinstance((await first_events(bus, "j1", 1))[-1], JobQueued)
        claimed = await queue.claim(5)
        assert [(q.job.id, q.prompt_ids) for q in claimed] == [("j1", [7, 8, 9])]
        assert (await reaper.run_once()).orphans == []  # taken once
    finally:
        await queue.close()


async def test_a_starting_process_reaps_nothing_with_a_live_lease(migrated):
    url, db = migrated
    store, queue, bus, recorder = await reaper_parts(url, db, lease=30)
    try:
        await running_on_w1(store, queue, "j1")
        reaped = await Reaper(queue, recorder, lambda spec: [1], max_attempts=3, interval=60).run_once()
        assert (reaped.requeued, reaped.lost, reaped.expired, reaped.orphans) == ([], [], [], [])
        assert (await store.get("j1")).status is JobStatus.RUNNING
    finally:
        await queue.close()


async def test_a_worker_stopping_on_purpose_releases_its_leases_at_once(migrated):
    url, db = migrated
    store, queue, bus, recorder = await reaper_parts(url, db, lease=30)
    try:
        await running_on_w1(store, queue, "j1")
        await queue.release(["j1"])
        reaped = await Reaper(queue, recorder, lambda spec: [1], max_attempts=3, interval=60).run_once()
        assert reaped.requeued == ["j1"]  # not after 30 s: now
        assert await queue.position("j1") == 0
    finally:
        await queue.close()
