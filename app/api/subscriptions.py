"""The Subscription root: a job's events, live.

A subscriber that falls behind the model (a slow client, or a loop busy with many
streams) would otherwise cost one GraphQL result per token, on the same CPU that runs
the model. A subscription whose selection names `TokensGenerated` gets the tokens that
piled up since its last message in one TokensGenerated event instead (each token with
its own seq, in order); one that keeps up still gets one TokenGenerated per token, and
one that does not name the type always does.
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


_END = object()


async def backlog(events: AsyncIterator[ev.JobEvent]) -> AsyncIterator[list[ev.JobEvent]]:
    """The events in order, as lists: each list holds what arrived while the consumer was
    busy with the previous one (one event when it keeps up). A task reads ahead into a queue."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump() -> None:
        try:
            async for event in events:
                queue.put_nowait(event)
        except Exception as exc:  # handed to the consumer, raised there in order
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(_END)

    task = asyncio.get_running_loop().create_task(pump())
    try:
        while True:
            ready = [await queue.get()]
            while not queue.empty():
                ready.append(queue.get_nowait())
            end = next((i for i, e in enumerate(ready) if e is _END or isinstance(e, Exception)), None)
            if end is None:
                yield ready
                continue
            if end:
                yield ready[:end]
            if isinstance(ready[end], Exception):
                raise ready[end]
            return
    finally:
        if not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass


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


async def deliver(info: Info, events: AsyncIterator[ev.JobEvent]) -> AsyncIterator[GenerationEvent]:
    if not wants_token_batches(info):
        async for event in events:
            yield event_of(event)
        return
    async with aclosing(backlog(events)) as batches:
        async for ready in batches:
            for item in group_tokens(ready):
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
                async with aclosing(deliver(info, await jobs.events(job.id, 0, caller))) as stream:
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
            async with aclosing(deliver(info, await info.context.jobs.events(str(id), after, caller))) as stream:
                async for event in stream:
                    yield event
