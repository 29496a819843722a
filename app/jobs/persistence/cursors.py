"""Page cursors: opaque to clients, (created_at, id) inside; a batch's jobs in input order: its index."""

from __future__ import annotations

import base64
from datetime import datetime

from .rows import utc


class BadCursor(ValueError):
    """A cursor this API did not hand out."""


def encode_cursor(at: datetime, item_id: str) -> str:
    return base64.urlsafe_b64encode(f"{at.isoformat()}|{item_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        at, item_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        return utc(datetime.fromisoformat(at)), item_id
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadCursor(cursor) from exc


_INDEX = "#"


def encode_index_cursor(index: int) -> str:
    return base64.urlsafe_b64encode(f"{_INDEX}{index}".encode()).decode()


def decode_index_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor.encode()).decode()
        if not text.startswith(_INDEX):
            raise ValueError(cursor)
        return int(text[len(_INDEX):])
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadCursor(cursor) from exc
