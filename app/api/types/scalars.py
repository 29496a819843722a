"""Custom scalars."""

from __future__ import annotations

from typing import NewType

import strawberry
from graphql import IntValueNode, StringValueNode

# A 64-bit signed integer. GraphQL's Int is 32-bit, and JavaScript numbers are exact only
# up to 2^53, so a Long is sent as a decimal string and read from an integer or a string.
LONG_MIN, LONG_MAX = -(2**63), 2**63 - 1


def _parse(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError("Long must be an integer or a decimal string, not a boolean")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.strip().lstrip("+-").isdigit() and value.isascii():
        number = int(value.strip())
    else:
        raise ValueError("Long must be an integer or a decimal string such as \"9007199254740993\"")
    if not LONG_MIN <= number <= LONG_MAX:
        raise ValueError("Long must be between -2^63 and 2^63 - 1")
    return number


def _parse_literal(node, _variables=None) -> int:
    if isinstance(node, (IntValueNode, StringValueNode)):
        return _parse(int(node.value) if isinstance(node, IntValueNode) else node.value)
    raise ValueError("Long must be an integer or a decimal string")


Long = strawberry.scalar(
    NewType("Long", int),
    name="Long",
    description="A 64-bit integer (-2^63 to 2^63 - 1). Sent as a decimal string, since JavaScript numbers are "
                "exact only up to 2^53; accepted as an integer or a decimal string.",
    serialize=lambda value: str(int(value)),
    parse_value=_parse,
    parse_literal=_parse_literal,
)
