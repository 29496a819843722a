"""Limits on what one request may ask of the server, each refused with a clear error.

- Document: depth (introspection included: strawberry's depth limiter skips it, and
  `types { fields { type { fields ...` fans out fast), aliases, tokens, directives, and a
  static cost estimate (list fields multiply what they select by their page size).
(Transport limits, body and websocket message size, are in body_limit.py.)

Every document limit is checked in one pass over the document that measures each
fragment once (memoised), however often it is spread, so the work is linear in the
document's size. The checks run before graphql-core's own validation: a document over a
limit is refused with one error naming that limit, without validating it further.

Strawberry's `QueryDepthLimiter` and `MaxAliasesLimiter` are not used: both walk into a
fragment again at every spread, without a memo, so a document of N fragment levels that
each spread the next level twice costs them 2^N visits.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLSchema,
    InlineFragmentNode,
    IntValueNode,
    Node,
    OperationDefinitionNode,
    SelectionSetNode,
    VariableNode,
    get_named_type,
    is_interface_type,
    is_object_type,
)
from graphql.language import DirectiveLocation
from graphql.type import SchemaMetaFieldDef, TypeMetaFieldDef
from strawberry.extensions import MaxTokensLimiter, ParserCache, SchemaExtension
from strawberry.schema.schema import validate_document


# Introspection fields that return lists: nesting them multiplies the response size
# (`types { fields { type { fields ...`), so their nesting is capped, not the depth: the
# standard introspection query is 15 levels deep but nests only 3 of these.
_INTROSPECTION_LISTS = frozenset(
    {"types", "fields", "args", "inputFields", "interfaces", "possibleTypes", "enumValues", "directives"}
)
MAX_INTROSPECTION_LIST_NESTING = 3
# Arguments that say how many items a list field returns: what it selects is multiplied by them.
PAGE_ARGUMENTS = ("first",)
# A cost beyond this is reported as this (a JavaScript client reads numbers as doubles).
_COST_CAP = 2**53 - 1
_EXECUTABLE_LOCATIONS = frozenset({
    DirectiveLocation.QUERY, DirectiveLocation.MUTATION, DirectiveLocation.SUBSCRIPTION, DirectiveLocation.FIELD,
    DirectiveLocation.FRAGMENT_DEFINITION, DirectiveLocation.FRAGMENT_SPREAD, DirectiveLocation.INLINE_FRAGMENT,
    DirectiveLocation.VARIABLE_DEFINITION,
})


@dataclass(frozen=True)
class DocumentLimitSettings:
    max_depth: int
    max_aliases: int
    max_tokens: int
    max_directives: int
    max_cost: int


@dataclass
class DocumentStats:
    """What the limit checks did since the process started (exported on /metrics)."""

    documents: int = 0
    selections_visited: int = 0
    refused: int = 0


STATS = DocumentStats()


@dataclass(frozen=True)
class Measure:
    depth: int   # levels of the schema's own fields (introspection fields count 0)
    lists: int   # deepest nesting of introspection list fields
    cost: int    # fields selected, each multiplied by the page sizes of the list fields above it


_NOTHING = Measure(0, 0, 0)


class _Walk:
    """Measures one operation, visiting each selection of the document at most twice (once
    outside and once inside introspection): a fragment is measured once and remembered,
    however often it is spread."""

    def __init__(self, schema: GraphQLSchema, document: DocumentNode, variables: Mapping | None) -> None:
        self.schema = schema
        self.fragments = {d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)}
        self.variables = variables if isinstance(variables, Mapping) else {}
        self.defaults: dict[str, object] = {}
        self.memo: dict[tuple[str, bool], Measure] = {}
        self.active: set[tuple[str, bool]] = set()  # fragments being measured: a spread of one is a cycle
        self.visits = 0

    def operation(self, op: OperationDefinitionNode) -> Measure:
        self.defaults = {v.variable.name.value: v.default_value for v in op.variable_definitions or ()}
        return self.selection_set(op.selection_set, self.schema.get_root_type(op.operation), False)

    def selection_set(self, selection_set: SelectionSetNode | None, parent, introspecting: bool) -> Measure:
        if selection_set is None:
            return _NOTHING
        depth = lists = cost = 0
        for sel in selection_set.selections:
            self.visits += 1
            if isinstance(sel, FieldNode):
                name = sel.name.value
                inside = introspecting or name in ("__schema", "__type")
                field = _field_def(parent, name)
                child = get_named_type(field.type) if field is not None else None
                m = self.selection_set(sel.selection_set, child, inside)
                depth = max(depth, m.depth + (0 if inside or name.startswith("__") else 1))
                lists = max(lists, m.lists + (1 if inside and name in _INTROSPECTION_LISTS else 0))
                cost += 1 + self.page_size(sel, field) * m.cost
            else:
                if isinstance(sel, FragmentSpreadNode):
                    m = self.fragment(sel.name.value, introspecting)
                else:
                    assert isinstance(sel, InlineFragmentNode)
                    inner = self.schema.get_type(sel.type_condition.name.value) if sel.type_condition else parent
                    m = self.selection_set(sel.selection_set, inner, introspecting)
                depth, lists, cost = max(depth, m.depth), max(lists, m.lists), cost + m.cost
        return Measure(depth, lists, min(cost, _COST_CAP))

    def fragment(self, name: str, introspecting: bool) -> Measure:
        key = (name, introspecting)
        known = self.memo.get(key)
        if known is not None:
            return known
        fragment = self.fragments.get(name)
        if fragment is None or key in self.active:  # unknown or cyclic: graphql-core reports both
            return _NOTHING
        self.active.add(key)
        try:
            m = self.selection_set(fragment.selection_set, self.schema.get_type(fragment.type_condition.name.value),
                                   introspecting)
        finally:
            self.active.discard(key)
        self.memo[key] = m
        return m

    def page_size(self, node: FieldNode, field) -> int:
        """How many items a list field with a page argument returns: the argument's value
        (a literal, a variable, the variable's default or the argument's default)."""
        if field is None:
            return 1
        for name in PAGE_ARGUMENTS:
            if name not in field.args:
                continue
            value = field.args[name].default_value
            for arg in node.arguments or ():
                if arg.name.value != name:
                    continue
                value = arg.value
                if isinstance(value, VariableNode):
                    var = value.name.value
                    value = self.variables.get(var, self.defaults.get(var))
                if isinstance(value, IntValueNode):
                    value = int(value.value)
            if isinstance(value, int) and not isinstance(value, bool):
                return max(value, 0)
        return 1


def _field_def(parent, name: str):
    if name == "__schema":
        return SchemaMetaFieldDef
    if name == "__type":
        return TypeMetaFieldDef
    if is_object_type(parent) or is_interface_type(parent):
        return parent.fields.get(name)
    return None


def _nodes(document: DocumentNode) -> Iterator[Node]:
    stack: list[Node] = [document]
    while stack:
        node = stack.pop()
        yield node
        for key in node.keys:
            value = getattr(node, key, None)
            if isinstance(value, Node):
                stack.append(value)
            elif isinstance(value, (list, tuple)):
                stack.extend(v for v in value if isinstance(v, Node))


@functools.lru_cache(maxsize=64)
def _directives_per_node(schema: GraphQLSchema) -> int | None:
    """The most directives one node of a valid document can carry: each executable directive
    once (none can repeat). None when one may repeat."""
    executable = [d for d in schema.directives if _EXECUTABLE_LOCATIONS & set(d.locations)]
    return None if any(d.is_repeatable for d in executable) else len(executable)


def _selected_operation(document: DocumentNode, operation_name: str | None) -> OperationDefinitionNode | None:
    operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
    if operation_name is None:
        return operations[0] if len(operations) == 1 else None  # else graphql-core says which to pick
    return next((op for op in operations if op.name is not None and op.name.value == operation_name), None)


def _refusal(message: str, node: Node | None, limit: str, **extensions) -> GraphQLError:
    return GraphQLError(message, node, extensions={"code": "BAD_USER_INPUT", "limit": limit, **extensions})


def check_document(schema: GraphQLSchema, document: DocumentNode, operation_name: str | None,
                   variables: Mapping | None, limits: DocumentLimitSettings) -> list[GraphQLError]:
    """The document's crossed limits, each as one error; linear in the document's size."""
    errors: list[GraphQLError] = []
    aliases = directives = 0
    per_node = _directives_per_node(schema)
    crowded: Node | None = None
    for node in _nodes(document):
        if isinstance(node, FieldNode) and node.alias is not None:
            aliases += 1
        marks = getattr(node, "directives", None)
        if marks:
            directives += len(marks)
            if per_node is not None and len(marks) > per_node and crowded is None:
                crowded = node
    if aliases > limits.max_aliases:
        errors.append(_refusal(f"more than {limits.max_aliases} aliases in one request ({aliases})", None, "aliases"))
    if directives > limits.max_directives:
        errors.append(_refusal(f"more than {limits.max_directives} directives in one request ({directives})", None,
                               "directives"))
    elif crowded is not None:
        errors.append(_refusal(f"a {crowded.kind.replace('_', ' ')} carries {len(crowded.directives)} directives; "
                               f"this schema has {per_node} that can apply to it, each at most once", crowded,
                               "directivesPerLocation"))
    op = _selected_operation(document, operation_name)
    if op is not None:
        walk = _Walk(schema, document, variables)
        try:
            m = walk.operation(op)
        except RecursionError:
            m = Measure(limits.max_depth + 1, 0, _COST_CAP)
        STATS.selections_visited += walk.visits
        name = op.name.value if op.name else "anonymous"
        if m.depth > limits.max_depth:
            errors.append(_refusal(f"operation '{name}' is {m.depth} levels deep; the limit is {limits.max_depth}",
                                   op, "depth"))
        if m.lists > MAX_INTROSPECTION_LIST_NESTING:
            errors.append(_refusal(f"operation '{name}' nests {m.lists} introspection lists; the limit is "
                                   f"{MAX_INTROSPECTION_LIST_NESTING}", op, "introspectionLists"))
        if m.cost > limits.max_cost:
            errors.append(_refusal(
                f"operation '{name}' costs {m.cost}; the limit is {limits.max_cost} (each field selected counts 1, "
                f"multiplied by the page size `first` of every list field above it)",
                op, "queryCost", cost=m.cost, maxCost=limits.max_cost))
    STATS.documents += 1
    STATS.refused += bool(errors)
    return errors


@functools.lru_cache(maxsize=1024)
def _validate(schema: GraphQLSchema, document: DocumentNode, rules: tuple) -> list[GraphQLError]:
    return validate_document(schema, document, rules)


class DocumentLimits(SchemaExtension):
    """Validation: the document limits first (one linear pass), then graphql-core's rules
    (cached: clients send the same few documents) only for a document within them."""

    def __init__(self, limits: DocumentLimitSettings) -> None:
        self.limits = limits

    def on_validate(self) -> Iterator[None]:
        ctx = self.execution_context
        schema, document = ctx.schema._schema, ctx.graphql_document
        errors = check_document(schema, document, ctx.operation_name, ctx.variables, self.limits)
        ctx.pre_execution_errors = errors or _validate(schema, document, tuple(ctx.validation_rules))
        yield


def document_limits(limits: DocumentLimitSettings) -> list:
    """Schema extensions (as factories: strawberry wants classes or callables).

    Parsing and validating a document costs several ms of pure Python; the caches make a
    document seen before (clients send the same few operations) cost nearly nothing.
    """
    return [
        lambda: MaxTokensLimiter(max_token_count=limits.max_tokens),
        lambda: _ParserCache(maxsize=1024),
        lambda: DocumentLimits(limits),
    ]


class _ParserCache(ParserCache):
    """ParserCache parses outside strawberry's error handling, so a syntax error would
    escape without a code. On a parse error, leave the document unset: strawberry then
    parses it itself, reports the error normally, and it gets BAD_USER_INPUT."""

    def on_parse(self):
        ctx = self.execution_context
        try:
            ctx.graphql_document = self.cached_parse_document(ctx.query, **ctx.parse_options)
        except GraphQLError:
            ctx.graphql_document = None
        yield
