"""The executor keeps a subscription's field plan from event to event: the same results as
strawberry's own executor, without walking the selection again for every event."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import graphql.execution.executor as graphql_executor
import pytest
import strawberry

from app.api.execution import InferQLExecutor


@strawberry.type
class Tick:
    n: int
    label: str


@strawberry.type
class Tock:
    n: int
    tags: list[str]


@strawberry.type
class Query:
    ok: bool = True


@strawberry.type
class Subscription:
    @strawberry.subscription
    async def events(self, count: int) -> AsyncGenerator[Tick | Tock, None]:
        for n in range(count):
            yield Tick(n=n, label=f"t{n}") if n % 3 else Tock(n=n, tags=["a", str(n)])

    @strawberry.subscription
    async def numbers(self, count: int) -> AsyncGenerator[int, None]:
        for n in range(count):
            yield n


DOCUMENT = """
subscription Events($count: Int!, $withTags: Boolean!) {
  events(count: $count) {
    __typename
    ... on Tick { n name: label }
    ...TockFields @include(if: $withTags)
    ... on Tock { n }
  }
}
fragment TockFields on Tock { tags }
"""


def schema(executor=None) -> strawberry.Schema:
    return strawberry.Schema(query=Query, subscription=Subscription, execution_context_class=executor)


async def results(s: strawberry.Schema, document: str, variables: dict) -> list:
    stream = await s.subscribe(document, variable_values=variables)
    return [(r.data, r.errors) async for r in stream]


@pytest.mark.parametrize("with_tags", [True, False])
async def test_the_same_results_as_strawberrys_executor(with_tags):
    variables = {"count": 12, "withTags": with_tags}
    ours = await results(schema(InferQLExecutor), DOCUMENT, variables)
    assert ours == await results(schema(), DOCUMENT, variables)
    assert ours[1] == ({"events": {"__typename": "Tick", "n": 1, "name": "t1"}}, None)
    tock = {"__typename": "Tock", "tags": ["a", "3"], "n": 3} if with_tags else {"__typename": "Tock", "n": 3}
    assert ours[3] == ({"events": tock}, None)


async def test_scalar_events_are_unchanged():
    document = "subscription { numbers(count: 3) }"
    assert await results(schema(InferQLExecutor), document, {}) == [({"numbers": n}, None) for n in range(3)]


async def test_the_selection_is_walked_once_per_type_not_once_per_event(monkeypatch):
    calls = 0
    collect = graphql_executor.collect_subfields

    def counting(*args, **kwargs):
        nonlocal calls
        calls += 1
        return collect(*args, **kwargs)

    monkeypatch.setattr(graphql_executor, "collect_subfields", counting)
    variables = {"count": 60, "withTags": True}
    await results(schema(), DOCUMENT, variables)
    assert calls == 60  # strawberry's own: once per event
    calls = 0
    assert len(await results(schema(InferQLExecutor), DOCUMENT, variables)) == 60
    assert calls == 2  # Tick and Tock
