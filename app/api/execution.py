"""The executor: strawberry's, with a subscription's field plan kept from event to event.

graphql-core executes every subscription event as a new operation on a copy of the
subscription's executor: it collects the root fields again, into new lists, and its memo
of each object's sub-fields is keyed by the identity of those lists. So for every token a
`generate` subscriber gets, the memo missed, the selection (fragments, type conditions,
defer usages) was walked again, and a new memo entry was kept until the subscription
ended. That walk was about a quarter of the event loop's CPU per token.

Here an event whose freshly collected root fields equal the first event's (always, as the
document and variables of a subscription do not change) is executed with the first
event's lists, so the memo hits from the second event on and holds one entry per selected
type. Each event's copy of the executor is also made without copy.copy's generic path.
"""

from __future__ import annotations

from typing import Any

from graphql.language import OperationType
from strawberry.schema.schema import StrawberryGraphQLCoreExecutionContext


class InferQLExecutor(StrawberryGraphQLCoreExecutionContext):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Shared with the per-event copies (graphql-core makes them with copy.copy).
        self._root_fields: list = []

    def __copy__(self) -> InferQLExecutor:
        # What copy.copy does for a plain object (a new instance sharing the attributes),
        # without its generic __reduce_ex__ path: one copy per subscription event.
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def execute_collected_root_fields(self, root_type, root_value, grouped_field_set, serially, new_defer_usages):
        if self.operation.operation is OperationType.SUBSCRIPTION and not new_defer_usages:
            kept = self._root_fields
            if not kept:
                kept.append(grouped_field_set)
            elif kept[0] == grouped_field_set:  # same keys, same field nodes (compared by identity first)
                grouped_field_set = kept[0]
        return super().execute_collected_root_fields(root_type, root_value, grouped_field_set, serially,
                                                     new_defer_usages)
