"""Logging: plain text or one JSON object a line (INFERQL_LOG_FORMAT), and the ids that
tie a line to its request and its job.

The ids live in context variables, so every line logged while a request or a job is
being handled carries them without being passed around: the API sets the request id (an
HTTP request or a websocket connection), the job layer sets the job id where it works on
one job. Any layer may import this module; it imports nothing of the app.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import sys
import uuid
from datetime import UTC, datetime

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("inferql_request_id", default=None)
JOB_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("inferql_job_id", default=None)

_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def new_request_id(offered: str | None = None) -> str:
    """The client's X-Request-ID when it is a short plain token, otherwise a fresh one."""
    if offered and _CLIENT_ID.fullmatch(offered):
        return offered
    return uuid.uuid4().hex


def bind_job(job_id: str) -> None:
    """Lines logged from here on in this task (and tasks it starts) carry this job id."""
    JOB_ID.set(job_id)


class ContextIds(logging.Filter):
    """Puts the current request id and job id on every record (unless the call set them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        if getattr(record, "job_id", None) is None:
            record.job_id = JOB_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, job_id, and the
    traceback (`exc_info`) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "job_id": getattr(record, "job_id", None),
        }
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(ids)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        ids = [f"{k}={v}" for k in ("request_id", "job_id") if (v := getattr(record, k, None))]
        record.ids = f" [{' '.join(ids)}]" if ids else ""
        return super().format(record)


def configure(level: str = "info", fmt: str = "text", stream=None) -> logging.Handler:
    """Sends every logger (uvicorn's too, when it is started with log_config=None) through
    one handler on stderr in the chosen format. Returns the handler."""
    if fmt == "json":
        # Progress bars (the model's weights loading) are not log lines: keep stderr JSON only.
        os.environ.setdefault("TQDM_DISABLE", "1")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextIds())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    return handler
