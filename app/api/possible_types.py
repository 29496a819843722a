"""`possibleTypes` for client caches (Apollo Client's InMemoryCache, urql's Graphcache):
each union and interface with the object types it can be. Without it Apollo Client cannot
match fragments on `JobEvent` inside the `GenerationEvent` union, and silently drops their
fields (`jobId`, `seq`) from its cache. `inferql schema --possible-types` prints it."""

from __future__ import annotations

from graphql import GraphQLInterfaceType, GraphQLSchema, GraphQLUnionType


def possible_types(schema: GraphQLSchema) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, type_ in sorted(schema.type_map.items()):
        if name.startswith("__"):
            continue
        if isinstance(type_, (GraphQLUnionType, GraphQLInterfaceType)):
            found[name] = sorted(t.name for t in schema.get_possible_types(type_))
    return found
