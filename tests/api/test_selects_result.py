"""Job lists read stored results only when the query selects them."""

from __future__ import annotations

import pytest
import strawberry

from app.api.types.job import JobConnection, selects_result
from app.jobs.domain import Page

seen: list[bool] = []


@strawberry.type
class Query:
    @strawberry.field
    def jobs(self, info: strawberry.Info) -> JobConnection:
        seen.append(selects_result(info))
        return JobConnection.of(Page(items=[], cursors=[], end_cursor=None, has_next_page=False))


schema = strawberry.Schema(query=Query)


@pytest.mark.parametrize(("query", "expected"), [
    ("{ jobs { nodes { id status } } }", False),
    ("{ jobs { edges { cursor node { id } } pageInfo { hasNextPage } } }", False),
    ("{ jobs { nodes { id result { text } } } }", True),
    ("{ jobs { edges { node { result { confidence { score } } } } } }", True),
    ("{ jobs { nodes { ...J } } } fragment J on Job { result { text } }", True),
    ("{ jobs { ... on JobConnection { nodes { ... on Job { result { text } } } } } }", True),
    ("{ jobs { ...C } } fragment C on JobConnection { nodes { id } }", False),
])
def test_selects_result(query, expected):
    seen.clear()
    result = schema.execute_sync(query)
    assert result.errors is None, result.errors
    assert seen == [expected]
