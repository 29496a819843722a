"""Live JobQueued position updates (JobService._with_positions): while a job waits, a
follower gets its JobQueued again, same seq, whenever the queue says its place changed;
once it starts, the queue is no longer asked. On each EventBus (in memory and Redis, the
seams test's `bus` fixture), against a queue whose positions the test sets."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from app.inference.types import ModelInfo
from app.jobs.events import GenerationStarted, JobQueued, MemoryEventBus, flatten
from app.jobs.service import JobService
from tests.jobs.test_seams import bus  # noqa: F401  (the fixture: one EventBus per backend)

MODEL = ModelInfo("m", "v", 1, "float32", "cpu", 16, "local")


class StillQueue:
    """Only `position`, set by the test; counts how often it is asked."""

    def __init__(self, position: int | None) -> None:
        self.value = position
        self.asked = 0

    async def position(self, job_id: str) -> int | None:
        self.asked += 1
        return self.value


def service(queue: StillQueue, bus) -> JobService:
    return JobService(store=None, queue=queue, bus=bus, quotas=None, recorder=None, canceller=None,
                      admission=None, position_interval=0.02)


async def test_a_waiting_job_gets_its_jobqueued_again_when_its_position_changes(bus):  # noqa: F811
    queue = StillQueue(2)
    now = datetime.now(UTC)
    await bus.append(JobQueued("j", now, 2))
    stream = flatten(service(queue, bus)._with_positions("j", await bus.follow_batches("j")))
    first = await anext(stream)
    assert (type(first), first.seq, first.position) == (JobQueued, 1, 2)
    queue.value = 1
    moved = await asyncio.wait_for(anext(stream), 5)
    assert (type(moved), moved.seq, moved.position) == (JobQueued, 1, 1) and moved.at >= now
    queue.value = 0
    assert (await asyncio.wait_for(anext(stream), 5)).position == 0
    # Unchanged positions send nothing; the next event is the job's own.
    await asyncio.sleep(0.1)
    await bus.append(GenerationStarted("j", now, MODEL, 3))
    started = await asyncio.wait_for(anext(stream), 5)
    assert (type(started), started.seq) == (GenerationStarted, 2)
    asked = queue.asked
    await asyncio.sleep(0.1)
    assert queue.asked == asked  # a started job's follower no longer asks the queue
    await stream.aclose()


async def test_a_follower_that_leaves_while_waiting_stops_cleanly():
    bus, queue = MemoryEventBus(), StillQueue(0)
    await bus.append(JobQueued("k", datetime.now(UTC), 0))
    stream = flatten(service(queue, bus)._with_positions("k", await bus.follow_batches("k")))
    assert (await anext(stream)).position == 0
    nxt = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.1)  # polling, nothing changes
    nxt.cancel()
    await asyncio.gather(nxt, return_exceptions=True)
    await stream.aclose()
    asked = queue.asked
    await asyncio.sleep(0.1)
    assert queue.asked == asked
