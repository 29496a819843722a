"""One tenant cannot exceed its limits or starve the others: the job layer in process, on
the tiny model and a real SQLite file.

The worker is not started unless a test needs it, so submitted jobs stay queued: what is
measured is admission, not generation.
"""

from __future__ import annotations

import asyncio

import pytest

from app.inference.classify import classification_length
from app.inference.engine import Engine
from app.inference.model import load_model
from app.jobs.persistence.db import Database
from app.jobs.domain import Caller, GenerationSpec, JobOptions, JobStatus, SamplingParams
from app.jobs.errors import InvalidInput, Overloaded, RateLimited
from app.jobs.keys import Defaults, KeyStore
from app.jobs.persistence.migrate import upgrade
from app.settings import Settings
from app.wiring import build_services


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    return load_model(tiny_model_dir, device="cpu", threads=1)


@pytest.fixture
async def make_service(tmp_path, tiny_lm):
    made = []
    db = Database(f"sqlite:///{tmp_path / 'jobs.db'}")
    await upgrade(db.engine)
    engine = Engine(tiny_lm, max_batch_size=1)
    engine.start()

    def make(**settings):
        settings = Settings(data_dir=tmp_path / "data", max_new_tokens=64, **settings)
        services = build_services(settings, db=db, lm=tiny_lm, engine=engine, keys=KeyStore(db, Defaults(0, 0, 0)))
        made.append(services)
        return services

    yield make
    for services in made:
        await services.worker.stop()
    await engine.stop()
    await db.dispose()


def spec(prompt: str = "Say hi.", max_tokens: int = 4) -> GenerationSpec:
    return GenerationSpec(prompt=prompt, messages=None, sampling=SamplingParams(max_tokens=max_tokens))


def key(name: str = "a", **limits) -> Caller:
    return Caller(key_id=f"id-{name}", name=name, admin=False, **limits)


async def test_concurrent_submits_cannot_all_pass_the_concurrency_check(make_service):
    s = make_service()
    caller = key(concurrency=5)
    outcomes = await asyncio.gather(*(s.jobs.submit(spec(), None, caller) for _ in range(50)),
                                    return_exceptions=True)
    admitted = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, RateLimited)]
    assert len(admitted) == 5 and len(refused) == 45, outcomes
    assert refused[0].extensions["limit"] == "concurrency"
    assert await s.queue.active(caller.owner) == 5
    page = await s.jobs.list_jobs(caller, first=100)
    assert len(page.items) == 5  # nothing stored for the refused ones


async def test_concurrent_submits_cannot_overfill_the_queue(make_service):
    s = make_service(max_queued_jobs=3)
    outcomes = await asyncio.gather(*(s.jobs.submit(spec(), None, key(f"k{i}")) for i in range(10)),
                                    return_exceptions=True)
    assert sum(not isinstance(o, BaseException) for o in outcomes) == 3
    assert sum(isinstance(o, Overloaded) for o in outcomes) == 7
    assert await s.queue.depth() == 3


async def test_a_failed_store_write_gives_the_claimed_slot_back(make_service):
    s = make_service()
    caller = key(concurrency=1)
    first = await s.jobs.submit(spec(), JobOptions(idempotency_key="same"), caller)
    assert await s.queue.active(caller.owner) == 1
    await s.jobs.cancel(first.id, caller)
    assert await s.queue.active(caller.owner) == 0
    # The replay of an idempotency key stores nothing: its claim must not leak.
    again = await s.jobs.submit(spec(), JobOptions(idempotency_key="same"), caller)
    assert again.id == first.id
    assert await s.queue.active(caller.owner) == 0 and await s.queue.depth() == 0


async def test_cancelled_queued_jobs_leave_the_queue_and_are_charged(make_service):
    s = make_service()
    caller = key(rpm=1000)
    for _ in range(30):
        job = await s.jobs.submit(spec(), None, caller)
        await s.jobs.cancel(job.id, caller)
    # The heap is the queue's only storage; cancelled entries must not pile up in it while
    # the engine is busy (here: never dispatching).
    assert len(s.queue._heap) == 0
    assert await s.queue.depth() == 0
    state = await s.access.rate_state(caller)
    assert state["requests"]["remaining"] == 1000 - 30  # each one cost a request


async def test_priority_is_capped_per_key(make_service):
    s = make_service()
    capped = key(max_priority=10)
    assert (await s.jobs.submit(spec(), JobOptions(priority=10), capped)).priority == 10
    with pytest.raises(InvalidInput) as refused:
        await s.jobs.submit(spec(), JobOptions(priority=11), capped)
    assert refused.value.extensions["field"] == "priority" and refused.value.extensions["maxPriority"] == 10
    with pytest.raises(InvalidInput):
        await s.batches.submit([spec()], JobOptions(priority=50), capped)
    assert (await s.jobs.list_jobs(capped, first=10)).items[0].priority == 10  # only the allowed one
    assert (await s.jobs.submit(spec(), JobOptions(priority=100), key("b"))).priority == 100  # no cap


async def test_classify_bills_every_label_row(make_service, tiny_lm):
    s = make_service()
    s.worker.start()
    labels = ["positive", "negative", "neutral"]
    text = "I loved this film."
    result = await s.classifier.classify(text, labels, None, key(tpm=100_000))
    width = classification_length(tiny_lm, text, labels)
    assert result.usage.prompt_tokens == width * len(labels)
    assert result.usage.prompt_tokens > width


async def test_classify_counts_against_concurrency(make_service):
    s = make_service()  # not started: the job below stays queued
    caller = key(concurrency=1)
    await s.jobs.submit(spec(), None, caller)
    with pytest.raises(RateLimited) as refused:
        await s.classifier.classify("text", ["a", "b"], None, caller)
    assert refused.value.extensions["limit"] == "concurrency"


async def test_classifications_waiting_for_the_engine_are_bounded(make_service):
    s = make_service(max_queued_classifications=1)
    s.worker.start()
    outcomes = await asyncio.gather(*(s.classifier.classify("text", ["a", "b"], None, key(f"k{i}")) for i in range(3)),
                                    return_exceptions=True)
    assert sum(isinstance(o, Overloaded) for o in outcomes) == 2
    assert sum(not isinstance(o, BaseException) for o in outcomes) == 1
    # Once the first has finished, there is room again.
    assert (await s.classifier.classify("text", ["a", "b"], None, key())).label in ("a", "b")


async def test_job_events_after_the_end_complete_or_are_refused(make_service):
    s = make_service()
    caller = key()
    job = await s.jobs.submit(spec(), None, caller)
    await s.jobs.cancel(job.id, caller)  # events: JobQueued (1), GenerationCancelled (2)

    async def drain(after, svc=s):
        return [e.seq async for e in await svc.jobs.events(job.id, after, caller)]

    assert await asyncio.wait_for(drain(0), 5) == [1, 2]
    assert await asyncio.wait_for(drain(2), 5) == []  # at the end: completes at once
    with pytest.raises(InvalidInput) as refused:
        await drain(3)
    assert refused.value.extensions["lastSeq"] == 2
    # A process that never saw the job replays it from the database: same rules.
    fresh = make_service()
    assert await asyncio.wait_for(drain(2, fresh), 5) == []
    with pytest.raises(InvalidInput):
        await drain(9, fresh)


async def test_job_lists_can_skip_results(make_service):
    s = make_service()
    s.worker.start()
    caller = key()
    job = await s.jobs.submit(spec(max_tokens=2), None, caller)
    async with asyncio.timeout(30):
        while (await s.jobs.get(job.id, caller)).status is not JobStatus.SUCCEEDED:
            await asyncio.sleep(0.05)
    with_results = await s.jobs.list_jobs(caller, first=5)
    without = await s.jobs.list_jobs(caller, first=5, with_results=False)
    assert with_results.items[0].result is not None
    assert without.items[0].result is None and without.items[0].status is JobStatus.SUCCEEDED
