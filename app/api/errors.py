"""Every GraphQL error leaves with an `extensions.code`, and internals never leave.

- Errors the services raise on purpose (ServiceError) keep their message and code.
- Errors graphql-core raises about the document or variables (syntax, unknown field,
  wrong type) are the client's: BAD_USER_INPUT, message kept (it names only the query).
- Anything else is a bug: logged with its traceback here, sent as INTERNAL with a
  generic message.
"""

from __future__ import annotations

import logging

from graphql.error import GraphQLError
from strawberry.extensions import MaskErrors

from app.jobs.errors import ServiceError

log = logging.getLogger("inferql.api")

INTERNAL_MESSAGE = "internal error; it has been logged"


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
    log.error("unexpected error in %s", error.path, exc_info=original)
    return GraphQLError(INTERNAL_MESSAGE, error.nodes, error.source, error.positions, error.path, None,
                        {"code": "INTERNAL"})


class ErrorCodes(MaskErrors):
    def _process_errors(self, errors: list[GraphQLError]) -> list[GraphQLError]:
        return [coded_error(e) for e in errors]
