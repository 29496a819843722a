"""The Subscription root: a job's events, live.

Each GraphQL result costs CPU that the model's cores pay for. A subscription whose
selection names `TokensGenerated` gets the tokens that piled up since its last message in
one TokensGenerated event (each token with its own seq, in order): those of a subscriber
that fell behind (a slow client, a loop busy with many streams), and those the engine
handed over together (after a generation's first token, at most every
INFERQL_STREAM_INTERVAL_MS). When one token is waiting it gets a TokenGenerated; a
selection that does not name the type always does. What piled up comes from the event bus
in one read (EventBus.follow_batches), with no task reading ahead.
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from typing import Annotated

import strawberry
from strawberry.types.nodes import FragmentSpread, InlineFragment, SelectedField

from app.jobs import events as ev

from .auth import admitted, subscription_slot
from .context import Info
from .inputs import GenerationInput, JobOptions
from .types.events import GenerationEvent, TokensGenerated, event_of

# Cancellations started when a subscriber vanishes; kept so they are not garbage-collected.
_background: set[asyncio.Task] = set()

BATCH_TYPE = "TokensGenerated"


def _names_type(selections: Iterable, type_name: str) -> bool:
    for sel in selections:
        if isinstance(sel, (InlineFragment, FragmentSpread)):
            if sel.type_condition == type_name or _names_type(sel.selections, type_name):
                return True
    return False


def wants_token_batches(info: Info) -> bool:
    """Whether the subscription's selection names TokensGenerated (`... on TokensGenerated`,
    inline or in a named fragment): only such a client is sent one."""
    fields: list[SelectedField] = info.selected_fields
    return any(_names_type(f.selections, BATCH_TYPE) for f in fields)


def group_tokens(ready: list[ev.JobEvent]) -> list[ev.JobEvent | list[ev.TokenGenerated]]:
    """Runs of two or more consecutive token events become one list; other events stay."""
    out: list = []
    run: list[ev.TokenGenerated] = []
    for event in ready:
        if isinstance(event, ev.TokenGenerated):
            run.append(event)
            continue
        if run:
            out.append(run if len(run) > 1 else run[0])
            run = []
        out.append(event)
    if run:
        out.append(run if len(run) > 1 else run[0])
    return out


async def deliver(info: Info, batches: AsyncIterator[list[ev.JobEvent]]) -> AsyncIterator[GenerationEvent]:
    """The job's events as GraphQL events. Each batch holds what arrived while this
    subscription was busy with the previous one (JobService.event_batches)."""
    grouped = wants_token_batches(info)
    async with aclosing(batches):
        async for batch in batches:
            if not grouped:
                for event in batch:
                    yield event_of(event)
                continue
            for item in group_tokens(batch):
                yield TokensGenerated.of(item) if isinstance(item, list) else event_of(item)


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
                async with aclosing(deliver(info, jobs.own_events(job))) as stream:
                    async for event in stream:
                        yield event
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
            async with aclosing(deliver(info, await info.context.jobs.event_batches(str(id), after, caller))) as stream:
                async for event in stream:
                    yield event
