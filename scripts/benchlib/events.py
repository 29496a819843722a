"""`--events`: the event loop's CPU per subscription event through `schema.subscribe`, for
the server's schema (its extensions, its executor and extension runner: app/api/execution.py)
against strawberry's own executor and runner with the same extensions. No server, no
model: a subscription yields ready-made token events, so what is timed is what the API adds
to each one (building the event's GraphQL object, executing the selection, the extensions'
hooks). The two alternate, and the CPU time of this thread is read around each run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import AsyncGenerator

SELECTIONS = {
    "the bench's": """subscription { generate { __typename
        ... on TokenGenerated { index text }
        ... on TokensGenerated { tokens { index text } }
        ... on GenerationCompleted { result { usage { completionTokens } } } } }""",
    "confidence": """subscription { generate { __typename
        ... on JobEvent { seq at }
        ... on TokenGenerated { index text tokenId logprob probability alternatives { text logprob probability } } } }""",
}


import strawberry  # noqa: E402

from app.api.execution import InferQLExecutor  # noqa: E402
from app.api.schema import InferQLSchema  # noqa: E402
from app.api.schema import schema as app_schema  # noqa: E402
from app.api.types.events import GenerationEvent, event_of  # noqa: E402
from app.inference.types import TokenAlternative  # noqa: E402
from app.jobs import events as ev  # noqa: E402
from app.jobs.domain import TokenRecord  # noqa: E402

ALTERNATIVES = (TokenAlternative(11, " a", -1.5), TokenAlternative(12, " the", -2.25))
EVENTS = {"per run": 3000}


@strawberry.type
class Query:
    ok: bool = True


@strawberry.type
class Subscription:
    @strawberry.subscription
    async def generate(self) -> AsyncGenerator[GenerationEvent, None]:
        for n in range(EVENTS["per run"]):
            token = TokenRecord(n, 42, " tok", -0.25, ALTERNATIVES, 1767312000.0 + n / 50)
            yield event_of(ev.TokenGenerated("job-1", ev.epoch_to_dt(token.at), token, seq=n + 1))


def _schemas():
    extensions = app_schema.extensions
    plain = strawberry.Schema(query=Query, subscription=Subscription, extensions=extensions)
    ours = InferQLSchema(query=Query, subscription=Subscription, extensions=extensions,
                         execution_context_class=InferQLExecutor)
    return plain, ours


async def _results(schema, document: str) -> list:
    stream = await schema.subscribe(document)
    return [(r.data, r.errors) async for r in stream]


async def _cpu_per_event(schema, document: str) -> float:
    stream = await schema.subscribe(document)
    n, t0 = 0, time.thread_time()
    async for result in stream:
        if result.errors:
            raise RuntimeError(result.errors)
        n += 1
    return (time.thread_time() - t0) / n * 1e6


async def events_section(quick: bool) -> None:
    events = EVENTS["per run"] = 300 if quick else 3000
    plain, ours = _schemas()
    print(f"subscription events through schema.subscribe ({events} token events per run; CPU of this thread):")
    for name, document in SELECTIONS.items():
        if await _results(ours, document) != await _results(plain, document):
            raise RuntimeError(f"{name} selection: the two executors' results differ")
        before: list[float] = []
        after: list[float] = []
        for _ in range(2 if quick else 5):
            before.append(await _cpu_per_event(plain, document))
            after.append(await _cpu_per_event(ours, document))
        a, b = statistics.median(before), statistics.median(after)
        print(f"  {name} selection: strawberry's executor {a:6.1f} us, the server's {b:6.1f} us per event   {a / b:.2f}x")
