"""Limits on what one request may ask of the server, each refused with a clear error.

- Document: depth (introspection included: strawberry's depth limiter skips it, and
  `types { fields { type { fields ...` fans out fast), aliases, tokens, directives.
- Transport: request body size (413), subscriptions open on one websocket.
"""

from __future__ import annotations

import json

from graphql import FieldNode, FragmentSpreadNode, GraphQLError, ValidationRule
from graphql.language import DirectiveNode, OperationDefinitionNode, SelectionSetNode
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from strawberry.extensions import (
    AddValidationRules,
    MaxTokensLimiter,
    ParserCache,
    ValidationCache,
)


# Introspection fields that return lists: nesting them multiplies the response size
# (`types { fields { type { fields ...`), so their nesting is capped, not the depth: the
# standard introspection query is 15 levels deep but nests only 3 of these.
_INTROSPECTION_LISTS = frozenset(
    {"types", "fields", "args", "inputFields", "interfaces", "possibleTypes", "enumValues", "directives"}
)
MAX_INTROSPECTION_LIST_NESTING = 3


def _depth_rule(max_depth: int) -> type[ValidationRule]:
    class MaxDepth(ValidationRule):
        """Depth of the schema's own fields, and list nesting inside introspection."""

        def enter_operation_definition(self, node: OperationDefinitionNode, *_):
            self._fragments = {f.name.value: f for f in self.context.document.definitions
                               if f.kind == "fragment_definition"}
            depth, lists = self._measure(node.selection_set, set(), introspecting=False)
            name = node.name.value if node.name else "anonymous"
            if depth > max_depth:
                self.report_error(GraphQLError(
                    f"operation '{name}' is {depth} levels deep; the limit is {max_depth}", node))
            if lists > MAX_INTROSPECTION_LIST_NESTING:
                self.report_error(GraphQLError(
                    f"operation '{name}' nests {lists} introspection lists; the limit is "
                    f"{MAX_INTROSPECTION_LIST_NESTING}", node))

        def _measure(self, selection_set: SelectionSetNode | None, seen: set[str], introspecting: bool):
            """(depth of non-introspection fields, deepest nesting of introspection list fields)."""
            if selection_set is None:
                return 0, 0
            depth = lists = 0
            for sel in selection_set.selections:
                if isinstance(sel, FieldNode):
                    name = sel.name.value
                    inside = introspecting or name in ("__schema", "__type")
                    d, n = self._measure(sel.selection_set, seen, inside)
                    depth = max(depth, d + (0 if inside or name.startswith("__") else 1))
                    lists = max(lists, n + (1 if inside and name in _INTROSPECTION_LISTS else 0))
                else:
                    if isinstance(sel, FragmentSpreadNode):
                        fragment = self._fragments.get(sel.name.value)
                        if fragment is None or sel.name.value in seen:  # graphql-core reports these itself
                            continue
                        inner, seen = fragment.selection_set, seen | {sel.name.value}
                    else:
                        inner = sel.selection_set
                    d, n = self._measure(inner, seen, introspecting)
                    depth, lists = max(depth, d), max(lists, n)
            return depth, lists

    return MaxDepth


def _count_rule(max_aliases: int, max_directives: int) -> type[ValidationRule]:
    class MaxAliasesAndDirectives(ValidationRule):
        aliases = directives = 0

        def enter_field(self, node: FieldNode, *_):
            if node.alias is not None:
                self.aliases += 1
                if self.aliases == max_aliases + 1:
                    self.report_error(GraphQLError(f"more than {max_aliases} aliases in one request", node))

        def enter_directive(self, node: DirectiveNode, *_):
            self.directives += 1
            if self.directives == max_directives + 1:
                self.report_error(GraphQLError(f"more than {max_directives} directives in one request", node))

    return MaxAliasesAndDirectives


def document_limits(*, max_depth: int, max_aliases: int, max_tokens: int, max_directives: int) -> list:
    """Schema extensions (as factories: strawberry wants classes or callables).

    Parsing and validating a document costs several ms of pure Python; the caches make a
    document seen before (clients send the same few operations) cost nearly nothing.
    The limit rules run inside validation, so a cached document was already checked.
    """
    # Built once: the validation cache is keyed by the rule classes, among other things.
    rules = [_depth_rule(max_depth), _count_rule(max_aliases, max_directives)]
    return [
        lambda: MaxTokensLimiter(max_token_count=max_tokens),
        lambda: _ParserCache(maxsize=1024),
        lambda: AddValidationRules(rules),
        lambda: ValidationCache(maxsize=1024),
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


class BodySizeLimit:
    """ASGI middleware: answers 413 to an HTTP request body over `max_bytes`, even when chunked."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        seen = 0
        started = False

        async def guarded_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"errors": [{
            "message": f"request body is over {self.max_bytes} bytes",
            "extensions": {"code": "BAD_USER_INPUT", "limit": "bodyBytes"},
        }]}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass
