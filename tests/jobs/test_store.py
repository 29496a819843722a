"""The job store on both databases it supports: SQLite and PostgreSQL (asyncpg).

PostgreSQL runs on 127.0.0.1:5432 with trust auth (INFERQL_TEST_POSTGRES_URL overrides);
each run gets a database of its own, created here and dropped afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from app.inference.confidence import Confidence
from app.inference.types import FinishReason, ModelInfo, SamplingParams, TokenAlternative
from app.jobs.persistence.db import Database
from app.jobs.domain import (
    GenerationResult,
    GenerationSpec,
    Job,
    JobStatus,
    ReviewVerdict,
    Timing,
    TokenRecord,
    Usage,
)
from app.jobs.persistence.cursors import BadCursor
from app.jobs.persistence.migrate import current, head, upgrade
from app.jobs.persistence.store import IdempotentReplay, JobStore
from app.jobs.persistence.rows import new_row as _row
from app.jobs.ending import Ending
from app.jobs.persistence.tables import WebhookRow

POSTGRES = os.environ.get("INFERQL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
MODEL = ModelInfo("m", "abc123def456", 1, "float32", "cpu", 512, "local")


@pytest.fixture(params=["sqlite", "postgresql"], scope="module")
async def store(request, tmp_path_factory):
    if request.param == "sqlite":
        url, cleanup = f"sqlite:///{tmp_path_factory.mktemp('store') / 'jobs.db'}", None
    else:
        name = f"inferql_test_{uuid.uuid4().hex[:10]}"
        admin = await asyncpg.connect(POSTGRES)
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = POSTGRES.rsplit("/", 1)[0] + "/" + name

        async def cleanup():
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            await admin.close()

    db = Database(url)
    await upgrade(db.engine)
    yield JobStore(db)
    await db.dispose()
    if cleanup:
        await cleanup()


def spec(prompt: str = "hi", max_tokens: int = 4) -> GenerationSpec:
    return GenerationSpec(prompt=prompt, messages=None, sampling=SamplingParams(max_tokens=max_tokens, stop=("x",)))


def new_job(**kw) -> Job:
    defaults = dict(id=str(uuid.uuid4()), owner=None, status=JobStatus.QUEUED, priority=0, spec=spec(),
                    created_at=datetime.now(UTC))
    return Job(**{**defaults, **kw})


def result(text: str = "ok", needs_review: bool = False) -> GenerationResult:
    tokens = (TokenRecord(0, 5, text, -0.1, (TokenAlternative(5, text, -0.1), TokenAlternative(6, "no", -2.3)), 1.0, seq=3),)
    return GenerationResult(
        text=text, finish_reason=FinishReason.STOP, confidence=Confidence(0.9, -0.1, 0.9, 1.1),
        needs_review=needs_review, tokens=tokens, model=MODEL, usage=Usage(7, 1),
        timing=Timing(1.0, 2.0, 3.0, 4.0, 5.0),
    )


async def test_migrations_are_at_head_and_idempotent(store):
    assert await current(store._db.engine) == head()
    await upgrade(store._db.engine)  # a second run is a no-op
    assert await current(store._db.engine) == head()


async def test_round_trip_keeps_everything(store):
    job = new_job(priority=5, webhook_url="http://example.test/hook", deadline_at=datetime.now(UTC))
    await store.insert(job)
    got = await store.get(job.id)
    assert got.spec == job.spec and got.priority == 5 and got.webhook_url == job.webhook_url
    assert got.created_at == job.created_at and got.created_at.tzinfo is not None
    started = datetime.now(UTC)
    await store.mark_running(job.id, started)
    assert (await store.get(job.id)).status is JobStatus.RUNNING
    assert (await store.finish(job.id, Ending(JobStatus.SUCCEEDED, datetime.now(UTC), result=result("done")))).changed
    got = await store.get(job.id)
    assert got.status is JobStatus.SUCCEEDED and got.result == result("done") and got.attempts == 1
    assert got.started_at == started


async def test_finish_happens_once_and_queues_one_webhook(store):
    job = new_job(webhook_url="http://example.test/hook")
    await store.insert(job)
    assert (await store.finish(job.id, Ending(JobStatus.SUCCEEDED, datetime.now(UTC), result=result()))).webhooks_queued
    # a second end (say, a late cancel) changes nothing and queues nothing
    late = await store.finish(job.id, Ending(JobStatus.CANCELLED, datetime.now(UTC), result=result("other")))
    assert not late.changed and not late.webhooks_queued
    assert (await store.get(job.id)).status is JobStatus.SUCCEEDED
    from sqlmodel import select

    hooks = select(WebhookRow).where(WebhookRow.subject_id == job.id)
    rows = await store._db.read(lambda session: list(session.exec(hooks)))
    assert len(rows) == 1 and rows[0].state == "PENDING" and rows[0].event_type == "job.succeeded"
    assert json.loads(rows[0].payload_json)["data"]["job"]["result"]["text"] == "ok"


async def test_idempotency_scope_is_per_owner_and_race_safe(store):
    a = new_job(owner="key-a", idempotency_key="k1")
    await store.insert(a)
    with pytest.raises(IdempotentReplay) as replay:
        await store.insert(new_job(owner="key-a", idempotency_key="k1"))
    assert replay.value.job.id == a.id
    await store.insert(new_job(owner="key-b", idempotency_key="k1"))  # another owner: its own key space
    # ten concurrent inserts with one fresh key: exactly one wins, the others get it back
    racers = [new_job(owner="key-c", idempotency_key="k2") for _ in range(10)]
    outcomes = await asyncio.gather(*(store.insert(j) for j in racers), return_exceptions=True)
    winners = [j for j, o in zip(racers, outcomes) if o is None]
    assert len(winners) == 1
    assert all(isinstance(o, IdempotentReplay) and o.job.id == winners[0].id for o in outcomes if o is not None)


async def test_listing_is_newest_first_with_stable_cursors(store):
    owner = f"lister-{uuid.uuid4().hex[:6]}"
    base = datetime.now(UTC)
    jobs = [new_job(owner=owner, created_at=base + timedelta(seconds=i // 2)) for i in range(7)]  # ties on time
    for job in jobs:
        await store.insert(job)
    seen, after = [], None
    while True:
        page = await store.list_jobs(owner=owner, all_owners=False, first=3, after=after)
        seen += [j.id for j in page.items]
        if not page.has_next_page:
            break
        after = page.end_cursor
    expected = [j.id for j in sorted(jobs, key=lambda j: (j.created_at, j.id), reverse=True)]
    assert seen == expected
    with pytest.raises(BadCursor):
        await store.list_jobs(owner=owner, all_owners=False, after="not-a-cursor")


async def test_batch_counts_usage_and_one_batch_webhook(store):
    batch_id = str(uuid.uuid4())
    jobs = [new_job(batch_id=batch_id) for _ in range(3)]
    await store.insert_batch(batch_id, None, jobs, "http://example.test/batch", datetime.now(UTC))
    batch = await store.batch(batch_id)
    assert batch.counts.queued == 3 and batch.status.value == "IN_PROGRESS"
    queued = [(await store.finish(j.id, Ending(JobStatus.SUCCEEDED, datetime.now(UTC), result=result()))).webhooks_queued
              for j in jobs]
    assert queued == [False, False, True]  # only the last job's end queues the batch webhook
    batch = await store.batch(batch_id)
    assert batch.counts.succeeded == 3 and batch.finished_at is not None and batch.status.value == "COMPLETED"
    assert batch.usage == Usage(21, 3)


async def test_review_and_purge(store):
    job = new_job()
    await store.insert(job)
    await store.finish(job.id, Ending(JobStatus.SUCCEEDED, datetime.now(UTC) - timedelta(days=40), result=result(needs_review=True)))
    queue = await store.list_jobs(owner=None, all_owners=True, review_queue=True, first=100)
    assert job.id in [j.id for j in queue.items]
    await store.submit_review(job.id, ReviewVerdict.APPROVED, "alice", None, datetime.now(UTC))
    got = await store.get(job.id)
    assert got.review.verdict is ReviewVerdict.APPROVED and got.review.reviewer == "alice"
    queue = await store.list_jobs(owner=None, all_owners=True, review_queue=True, first=100)
    assert job.id not in [j.id for j in queue.items]
    fresh = new_job()
    await store.insert(fresh)
    assert await store.purge_finished_before(datetime.now(UTC) - timedelta(days=30)) >= 1
    assert await store.get(job.id) is None
    assert await store.get(fresh.id) is not None  # unfinished jobs are never purged


async def test_concurrent_writes_share_transactions(store):
    jobs = [new_job(owner="key-g") for _ in range(20)]
    before = store.writer.transactions
    assert await asyncio.gather(*(store.insert(j) for j in jobs)) == [None] * 20
    assert all([(await store.get(j.id)) is not None for j in jobs])
    # queued together, committed together (written one by one, this would be 20)
    assert store.writer.transactions - before < 5


async def test_a_bad_write_in_a_group_fails_alone(store):
    taken = new_job(owner="key-h", idempotency_key="taken")
    await store.insert(taken)
    jobs = [new_job(owner="key-h") for _ in range(20)]
    duplicate = new_job(owner="key-h", idempotency_key="taken")
    # The duplicate passes the early check (it races the first insert of its key in real
    # life); bypass that check here so that it reaches the grouped transaction.
    duplicate_op = store.writer.write(lambda session: session.add(_row(duplicate)))
    outcomes = await asyncio.gather(*(store.insert(j) for j in jobs), duplicate_op, return_exceptions=True)
    assert outcomes[:-1] == [None] * 20
    assert "IntegrityError" in type(outcomes[-1]).__name__
    assert all([(await store.get(j.id)) is not None for j in jobs])
    assert await store.get(duplicate.id) is None


async def test_a_cancelled_caller_still_gets_its_write(store):
    job = new_job()
    task = asyncio.create_task(store.insert(job))
    await asyncio.sleep(0)  # the write is queued
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        if await store.get(job.id):
            break
        await asyncio.sleep(0.02)
    assert (await store.get(job.id)).status is JobStatus.QUEUED
