"""The Subscription root: a job's events, live."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Annotated

import strawberry

from .auth import admitted, subscription_slot
from .context import Info
from .inputs import GenerationInput, JobOptions
from .types.events import GenerationEvent, event_of

# Cancellations started when a subscriber vanishes; kept so they are not garbage-collected.
_background: set[asyncio.Task] = set()


@strawberry.type(description="Live streams of job events.")
class Subscription:
    @strawberry.subscription(
        description="Run a generation and stream its events. Leaving early cancels it (CANCELLED, partial result)."
    )
    async def generate(
        self, info: Info, input: Annotated[GenerationInput, strawberry.argument(description="What to generate.")],
        options: Annotated[JobOptions | None, strawberry.argument(
            description="Priority, idempotency key, webhook and deadline.")] = None,
    ) -> AsyncGenerator[GenerationEvent, None]:
        jobs, caller = info.context.jobs, await admitted(info)
        finished = False
        async with subscription_slot(info):
            job = await jobs.submit(input.to_spec(), JobOptions.to_data(options), caller)
            try:
                async for event in await jobs.events(job.id, 0, caller):
                    yield event_of(event)
                finished = True
            finally:
                if not finished:  # the client completed, unsubscribed or dropped the socket
                    task = asyncio.get_running_loop().create_task(jobs.cancel(job.id, caller))
                    _background.add(task)
                    task.add_done_callback(_background.discard)

    @strawberry.subscription(description="Replay a job's events with seq > after, then follow it live to the end.")
    async def job_events(
        self, info: Info, id: Annotated[strawberry.ID, strawberry.argument(description="The job's id.")],
        after: Annotated[int, strawberry.argument(
            description="Replay only events with a greater seq (the last seq you saw; 0 = from the start).")] = 0,
    ) -> AsyncGenerator[GenerationEvent, None]:
        caller = await admitted(info)
        async with subscription_slot(info):
            async for event in await info.context.jobs.events(str(id), after, caller):
                yield event_of(event)
