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


# ---- the plan: the same results and errors as graphql-core's generic path ----------------

import enum  # noqa: E402

from strawberry.extensions import SchemaExtension  # noqa: E402
from strawberry.schema.schema import StrawberryGraphQLCoreExecutionContext  # noqa: E402


@strawberry.enum
class Mood(enum.Enum):
    CALM = "calm"
    LOUD = "loud"


@strawberry.interface
class Named:
    name: str


@strawberry.type
class Leaf(Named):
    weight: float | None
    mood: Mood


@strawberry.type
class Branch(Named):
    leaves: list[Leaf]
    best: Leaf | None
    parent: Named | None

    @strawberry.field
    def shout(self) -> str:
        return self.name.upper()


@strawberry.type
class Tree:
    branch: Branch
    count: int


def make_branch(n: int) -> Branch:
    leaves = [Leaf(name=f"l{n}.{i}", weight=None if i == 1 else i / 2, mood=Mood.LOUD if i else Mood.CALM)
              for i in range(3)]
    return Branch(name=f"b{n}", leaves=leaves, best=leaves[0] if n % 2 else None,
                  parent=Leaf(name="root", weight=1.0, mood=Mood.CALM) if n % 3 else make_parent())


def make_parent() -> Branch:
    return Branch(name="p", leaves=[], best=None, parent=None)


@strawberry.type
class TreeSubscription:
    @strawberry.subscription
    async def trees(self, count: int, broken_at: int = -1) -> AsyncGenerator[Tree | Leaf, None]:
        for n in range(count):
            if n == broken_at:  # a null where the schema forbids one: an error, as graphql-core reports it
                yield Tree(branch=None, count=n)  # type: ignore[arg-type]
            else:
                yield Tree(branch=make_branch(n), count=n) if n % 4 else Leaf(name=f"solo{n}", weight=None,
                                                                               mood=Mood.LOUD)


TREES = """
subscription Trees($count: Int!, $brokenAt: Int!, $deep: Boolean!) {
  trees(count: $count, brokenAt: $brokenAt) {
    __typename
    ... on Leaf { name w: weight mood }
    ... on Tree {
      count
      branch {
        name
        leaves { __typename name weight mood }
        best @include(if: $deep) { name mood }
        parent { __typename name ... on Leaf { weight } ... on Branch { leaves { name } } }
      }
    }
  }
}
"""


def tree_schema(executor=None, extensions=()) -> strawberry.Schema:
    return strawberry.Schema(query=Query, subscription=TreeSubscription, execution_context_class=executor,
                             extensions=list(extensions))


def count_generic_events(monkeypatch) -> list:
    """Each event that took graphql-core's own path appends to the returned list."""
    calls: list = []
    original = StrawberryGraphQLCoreExecutionContext.execute_collected_root_fields

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StrawberryGraphQLCoreExecutionContext, "execute_collected_root_fields", counting)
    return calls


@pytest.mark.parametrize("deep", [True, False])
async def test_the_plan_gives_graphql_cores_results_for_nested_selections(monkeypatch, deep):
    variables = {"count": 13, "brokenAt": -1, "deep": deep}
    expected = await results(tree_schema(), TREES, variables)
    generic = count_generic_events(monkeypatch)
    ours = await results(tree_schema(InferQLExecutor), TREES, variables)
    assert ours == expected
    assert generic == []  # every event completed by the plan
    assert ours[0] == ({"trees": {"__typename": "Leaf", "name": "solo0", "w": None, "mood": "LOUD"}}, None)
    branch = ours[1][0]["trees"]["branch"]
    assert branch["leaves"][1] == {"__typename": "Leaf", "name": "l1.1", "weight": None, "mood": "LOUD"}
    assert ("best" in branch) is deep


async def test_an_event_that_makes_an_error_takes_graphql_cores_path(monkeypatch):
    variables = {"count": 6, "brokenAt": 3, "deep": True}
    expected = await results(tree_schema(), TREES, variables)
    generic = count_generic_events(monkeypatch)
    ours = await results(tree_schema(InferQLExecutor), TREES, variables)
    assert [data for data, _ in ours] == [data for data, _ in expected]
    assert [[e.message for e in errors or ()] for _, errors in ours] == \
           [[e.message for e in errors or ()] for _, errors in expected]
    assert ours[3][0] is None and "non-nullable" in ours[3][1][0].message
    assert len(generic) == 1  # only the broken event


async def test_a_field_with_a_resolver_takes_graphql_cores_path(monkeypatch):
    document = "subscription { trees(count: 6) { ... on Tree { branch { name shout } } ... on Leaf { name } } }"
    expected = await results(tree_schema(), document, {})
    generic = count_generic_events(monkeypatch)
    ours = await results(tree_schema(InferQLExecutor), document, {})
    assert ours == expected
    assert ours[1] == ({"trees": {"branch": {"name": "b1", "shout": "B1"}}}, None)
    assert len(generic) == 4  # the Tree events; the Leaf events are planned


async def test_field_middleware_keeps_graphql_cores_path(monkeypatch):
    seen: list[str] = []

    class Spy(SchemaExtension):
        def resolve(self, _next, root, info, *args, **kwargs):
            seen.append(info.field_name)
            return _next(root, info, *args, **kwargs)

    variables = {"count": 5, "brokenAt": -1, "deep": True}
    expected = await results(tree_schema(extensions=[Spy]), TREES, variables)
    n = len(seen)
    generic = count_generic_events(monkeypatch)
    assert await results(tree_schema(InferQLExecutor, [Spy]), TREES, variables) == expected
    assert len(seen) == 2 * n and len(generic) == 5  # every field through the extension, as before


# ---- the extensions' per-result hooks, looked up once per operation ---------------------

from app.api.execution import LeanExtensionsRunner  # noqa: E402


class LeanSchema(strawberry.Schema):
    def create_extensions_runner(self, execution_context, extensions):
        return LeanExtensionsRunner(execution_context=execution_context, extensions=extensions)


def recording_extensions() -> list:
    class Stamp(SchemaExtension):
        """Sees every streamed result (and may change it); reports a count in `extensions`."""

        def __init__(self, *, execution_context=None) -> None:
            self.seen = 0

        def on_stream_result(self, result):
            self.seen += 1
            if result.data and result.data["events"].get("n") == 2:
                result.data["events"]["n"] = -2
            yield

        def get_results(self):
            return {"seen": self.seen}

    class Quiet(SchemaExtension):  # neither hook: not asked for results
        pass

    return [Quiet, Stamp]


async def stamped(schema_class) -> list:
    s = schema_class(query=Query, subscription=Subscription, extensions=recording_extensions())
    stream = await s.subscribe("subscription { events(count: 5) { ... on Tick { n } ... on Tock { n } } }")
    return [(r.data, r.extensions) async for r in stream]


async def test_the_extensions_see_each_result_as_with_strawberrys_runner():
    ours = await stamped(LeanSchema)
    assert ours == await stamped(strawberry.Schema)
    assert [data["events"]["n"] for data, _ in ours] == [0, 1, -2, 3, 4]
    assert [ext for _, ext in ours] == [{"seen": n} for n in range(5)]  # results are read before the hook runs


async def test_without_a_stream_hook_a_result_costs_no_exit_stacks():
    from app.api.execution import _NO_HOOKS

    class Quiet(SchemaExtension):
        pass

    managers = []

    class Watched(LeanExtensionsRunner):
        def on_stream_result(self, result):
            managers.append(super().on_stream_result(result))
            return managers[-1]

    class WatchedSchema(strawberry.Schema):
        def create_extensions_runner(self, execution_context, extensions):
            return Watched(execution_context=execution_context, extensions=extensions)

    async def run(schema_class) -> list:
        s = schema_class(query=Query, subscription=Subscription, extensions=[Quiet])
        stream = await s.subscribe("subscription { events(count: 4) { ... on Tick { n label } } }")
        return [(r.data, r.errors, r.extensions) async for r in stream]

    assert await run(WatchedSchema) == await run(strawberry.Schema)
    assert len(managers) == 4 and all(m is _NO_HOOKS for m in managers[1:]) and managers[0] is not _NO_HOOKS
