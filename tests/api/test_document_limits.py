"""The document limits in process (no server): depth, introspection lists, aliases,
directives and the static cost, each measured in one pass linear in the document."""

from __future__ import annotations

import pytest
from graphql import parse

from app.api.limits import STATS, DocumentLimitSettings, check_document
from app.api.schema import build_schema
from app.settings import Settings

LIMITS = DocumentLimitSettings(max_depth=12, max_aliases=20, max_tokens=2000, max_directives=20, max_cost=5000)
SCHEMA = build_schema(Settings(_env_file=None))


def fan_out(levels: int, leaf: str = "models { id }") -> str:
    """N fragment levels, each level's two fragments spreading both fragments of the next."""
    parts = ["query Q { ...A0 ...B0 }"]
    for i in range(levels):
        parts += [f"fragment {f}{i} on Query {{ ...A{i + 1} ...B{i + 1} }}" for f in "AB"]
    parts += [f"fragment {f}{levels} on Query {{ {leaf} }}" for f in "AB"]
    return " ".join(parts)


def check(document: str, variables: dict | None = None, limits: DocumentLimitSettings = LIMITS,
          operation: str | None = None):
    return check_document(SCHEMA._schema, parse(document), operation, variables, limits)


@pytest.mark.parametrize("levels", [16, 24, 40])
def test_fragment_fan_out_is_measured_once_per_fragment(levels):
    document = fan_out(levels)
    before = STATS.selections_visited
    errors = check(document)
    visits = STATS.selections_visited - before
    # Each selection of the document is visited once (2^levels paths without the memo).
    assert visits <= 2 * len(parse(document).definitions) + 4, visits
    # ... yet the cost counts every path: 2^(levels+1) leaves, 2 fields each.
    [error] = errors
    assert error.extensions["limit"] == "queryCost"
    assert error.extensions["cost"] == min(2 ** (levels + 2), 2**53 - 1)
    assert error.extensions["code"] == "BAD_USER_INPUT"


def test_cyclic_fragments_end():
    errors = check("query Q { ...A } fragment A on Query { ...B models { id } } fragment B on Query { ...A }")
    assert errors == []  # graphql-core's own rule reports the cycle after this pass


async def test_a_fragment_spread_again_deeper_counts_its_full_depth():
    """A sibling fragment spread used to hide the same fragment's spreads deeper down."""
    schema = build_schema(Settings(_env_file=None, max_query_depth=4))
    # E is 2 deep; spread under generate (1) it is 3 levels, under generate.result.tokens it is 5.
    document = """subscription S { generate(input: {prompt: "x"}) {
        ...E
        ... on GenerationCompleted { result { tokens { ...E } } }
    } } fragment E on TokenGenerated { alternatives { text } }"""
    result = await anext(await schema.subscribe(document, context_value={}))
    assert result.errors, result
    assert "5 levels deep; the limit is 4" in result.errors[0].message, result.errors


@pytest.mark.parametrize(("document", "variables", "cost"), [
    ("{ jobs(first: 100) { nodes { id } } }", None, 201),
    ("{ jobs { nodes { id } } }", None, 41),  # first defaults to 20
    ("query J($n: Int!) { jobs(first: $n) { nodes { id status } } }", {"n": 7}, 22),
    ("query J($n: Int = 3) { jobs(first: $n) { nodes { id } } }", {}, 7),
    ('{ batch(id: "b") { id jobs(first: 50) { nodes { id } } } }', None, 1 + 1 + 1 + 50 * 2),
    ("{ models { id version } }", None, 3),
])
def test_cost_multiplies_by_page_sizes_on_the_path(document, variables, cost):
    limits = DocumentLimitSettings(max_depth=12, max_aliases=20, max_tokens=2000, max_directives=20, max_cost=cost)
    assert check(document, variables, limits) == []
    too_low = DocumentLimitSettings(max_depth=12, max_aliases=20, max_tokens=2000, max_directives=20,
                                    max_cost=cost - 1)
    [error] = check(document, variables, too_low)
    assert error.extensions == {"code": "BAD_USER_INPUT", "limit": "queryCost", "cost": cost, "maxCost": cost - 1}


def test_aliased_pages_cost_adds_up():
    document = "{ " + " ".join(f"a{i}: jobs(first: 100) {{ nodes {{ id status }} }}" for i in range(20)) + " }"
    [error] = check(document)
    assert error.extensions["cost"] == 20 * (1 + 100 * 3)
    assert "the limit is 5000" in error.message


def test_only_the_selected_operation_is_measured():
    document = "query Small { models { id } } query Big { " + " ".join(
        f"a{i}: jobs(first: 100) {{ nodes {{ id status }} }}" for i in range(20)) + " }"
    assert check(document, operation="Small") == []
    assert check(document, operation="Big")[0].extensions["limit"] == "queryCost"


def test_more_directives_on_a_node_than_can_apply_is_one_error():
    errors = check("query { __typename @aa@aa@aa@aa@aa@aa@aa@aa@aa@aa }")
    assert len(errors) == 1 and errors[0].extensions["limit"] == "directivesPerLocation", errors
    assert check("query($a: Boolean!) { models @include(if: $a) @skip(if: false) { id } }", {"a": True}) == []


def test_readme_operations_are_within_the_limits():
    for document in [
        'query { batch(id: "x") { status finishedAt counts { succeeded failed total } usage { totalTokens } '
        "webhookDeliveries { attempt httpStatus nextRetryAt } jobs(first: 50) { nodes { id status result { text } } } } }",
        "query { jobs(status: SUCCEEDED, first: 20) { edges { cursor node { id createdAt } } "
        "pageInfo { hasNextPage endCursor } } }",
        "query { reviewQueue(first: 20) { nodes { id result { text confidence { score } } } } }",
    ]:
        assert check(document) == [], document
    from graphql import get_introspection_query

    assert check(get_introspection_query()) == []
