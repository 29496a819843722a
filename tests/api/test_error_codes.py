"""Unit tests of the error policy: coded on purpose, BAD_USER_INPUT for the document, INTERNAL masked."""

import logging

from graphql.error import GraphQLError

from app.api.errors import INTERNAL_MESSAGE, coded_error
from app.api.observe import log_errors
from app.jobs.errors import InvalidInput, NotFound, Overloaded


def wrap(exc: Exception, path=("job",)) -> GraphQLError:
    return GraphQLError(str(exc), path=list(path), original_error=exc)


def test_service_errors_keep_message_code_and_extensions():
    err = coded_error(wrap(InvalidInput("`topP` must be in (0, 1]", field="topP")))
    assert err.message == "`topP` must be in (0, 1]"
    assert err.extensions == {"field": "topP", "code": "BAD_USER_INPUT"}
    assert coded_error(wrap(NotFound("no job"))).extensions["code"] == "NOT_FOUND"
    assert coded_error(wrap(Overloaded("full", retryAfterMs=1000))).extensions == {
        "retryAfterMs": 1000, "code": "OVERLOADED"}


def test_document_errors_are_the_clients():
    err = coded_error(GraphQLError("Cannot query field 'nope' on type 'Query'."))
    assert err.extensions == {"code": "BAD_USER_INPUT"} and "nope" in err.message


def test_unexpected_exceptions_are_masked_and_logged(caplog):
    secret = RuntimeError("connection to /var/lib/secret.db failed in app/jobs/store.py")
    with caplog.at_level(logging.ERROR, logger="inferql.api"):
        err = coded_error(wrap(secret))
        log_errors([wrap(secret)])  # what the schema's process_errors does with every error
    assert err.message == INTERNAL_MESSAGE and err.extensions == {"code": "INTERNAL"}
    assert err.original_error is None  # nothing of the exception travels with the error
    assert "secret.db" not in str(err.formatted)
    assert any(r.exc_info and r.exc_info[1] is secret for r in caplog.records)  # but the log has it all
