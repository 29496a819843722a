"""What the API tells operators: a log line per GraphQL error at the right level, and
metrics per operation.

- A client's error (BAD_USER_INPUT, which covers syntax and validation errors,
  UNAUTHENTICATED, FORBIDDEN, NOT_FOUND, RATE_LIMITED, OVERLOADED) is logged at INFO in
  one line, without a traceback: it is not the server's fault.
- A server error (INTERNAL) is logged at ERROR with its traceback.
- Every operation is counted by its type and outcome code; queries and mutations are
  timed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from graphql.error import GraphQLError
from strawberry.extensions import SchemaExtension

from .errors import coded_error
from .metrics import OPERATION_SECONDS, REQUESTS

log = logging.getLogger("inferql.api")


def error_code(error: GraphQLError) -> str:
    return (coded_error(error).extensions or {}).get("code", "INTERNAL")


def log_errors(errors: list[GraphQLError]) -> None:
    for error in errors:
        coded = coded_error(error)
        code = (coded.extensions or {}).get("code", "INTERNAL")
        where = ".".join(str(p) for p in error.path) if error.path else "-"
        if code == "INTERNAL":
            log.error("INTERNAL error at %s: %s", where, error.message, exc_info=error.original_error or True)
        else:
            log.info("client error %s at %s: %s", code, where, coded.message)


class ObserveOperations(SchemaExtension):
    """Counts (and times) each operation with its outcome. First in the extension list,
    so it sees the errors after ErrorCodes has coded them."""

    def on_operation(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            ctx = self.execution_context
            try:
                operation = ctx.operation_type.value
            except Exception:  # no document: it did not parse
                operation = "unknown"
            # A subscription's result is its last event's; strawberry keeps the errors of
            # the last result that had any in pre_execution_errors. (No on_stream_result
            # hook: it would cost a context manager per event sent.)
            errors = getattr(ctx.result, "errors", None) or ctx.pre_execution_errors or []
            code = error_code(errors[0]) if errors else "OK"
            REQUESTS.labels(operation, code).inc()
            if operation != "subscription":
                OPERATION_SECONDS.labels(operation).observe(time.perf_counter() - started)

