"""Every GraphQL error leaves with an `extensions.code`, and internals never leave.

- Errors the services raise on purpose (ServiceError) keep their message and code.
- Errors graphql-core raises about the document or variables (syntax, unknown field,
  wrong type) are the client's: BAD_USER_INPUT, message kept (it names only the query).
- Anything else is a bug: sent as INTERNAL with a generic message (and logged with its
  traceback by the schema, app/api/observe.py).
- In production, graphql-core's suggestions ("Did you mean 'models'?") are cut from every
  message: they would spell out the schema that disabled introspection hides.
"""

from __future__ import annotations

import re

from graphql.error import GraphQLError
from strawberry.extensions import MaskErrors

from app.jobs.errors import ServiceError

INTERNAL_MESSAGE = "internal error; it has been logged"
# graphql-core writes its suggestions in this one form (graphql.pyutils.did_you_mean), whether
# they name fields, arguments, types or enum values; GraphQL names never contain "?".
_SUGGESTION = re.compile(r"\s*Did you mean [^?]*\?")


def coded_error(error: GraphQLError) -> GraphQLError:
    original = error.original_error
    if isinstance(original, ServiceError):
        extensions = {**original.extensions, "code": original.code}
        return GraphQLError(original.message, error.nodes, error.source, error.positions, error.path, None, extensions)
    if error.extensions and "code" in error.extensions:
        return error
    if original is None or isinstance(original, (GraphQLError, ValueError, TypeError)) and error.path is None:
        # Raised by graphql-core while parsing, validating or coercing the request.
        return GraphQLError(error.message, error.nodes, error.source, error.positions, error.path, None,
                            {"code": "BAD_USER_INPUT"})
    # A bug: the schema's process_errors logs it with its traceback (app/api/observe.py).
    return GraphQLError(INTERNAL_MESSAGE, error.nodes, error.source, error.positions, error.path, None,
                        {"code": "INTERNAL"})


def without_suggestions(error: GraphQLError) -> GraphQLError:
    message = _SUGGESTION.sub("", error.message)
    if message == error.message:
        return error
    return GraphQLError(message, error.nodes, error.source, error.positions, error.path, None, error.extensions)


class ErrorCodes(MaskErrors):
    def __init__(self, hide_suggestions: bool = False) -> None:
        super().__init__()
        self.hide_suggestions = hide_suggestions

    def _process_result(self, result: object) -> None:
        # MaskErrors asks isinstance(result, <a runtime-checkable Protocol>), which costs
        # more than the rest of the hook; it runs for every event a subscription sends.
        if errors := getattr(result, "errors", None):
            result.errors = self._process_errors(errors)

    def _process_errors(self, errors: list[GraphQLError]) -> list[GraphQLError]:
        coded = [coded_error(e) for e in errors]
        return [without_suggestions(e) for e in coded] if self.hide_suggestions else coded
