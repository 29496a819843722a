"""A helper both the engine thread and the database writer use to answer an awaiting caller."""

from __future__ import annotations

import asyncio
from typing import Any


def settle(fut: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    """Resolves fut unless it is already done (its awaiter may have been cancelled)."""
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
