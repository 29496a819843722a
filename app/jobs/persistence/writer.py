"""Group commit: every database write of this process goes through one Writer.

SQLite takes one writer at a time, and a writer that finds the lock taken sleeps in
growing steps (its busy handler), so concurrent commits turn into 100 ms tails. So writes
queue here, and all the writes that arrived while one transaction was being committed go
together into the next one: ten concurrent submissions share one commit (and one hop to
the writer thread) instead of waiting for ten in a row. PostgreSQL needs no queue, but
fewer round trips and commits help it as well.

A write is a plain function `op(session)` that adds or updates rows and does not commit;
it may run on another thread. If a grouped transaction fails, each of its ops runs again
alone, so a bad one (a duplicate idempotency key, say) fails only its own caller. Ops must
therefore only touch the database: running one twice after a rollback must be harmless.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from sqlmodel import Session

from app.futures import settle

from .db import Database

log = logging.getLogger(__name__)

T = TypeVar("T")
Op = Callable[[Session], T]

MAX_GROUP = 200  # ops per transaction: bounds how long one commit holds the write lock


class Writer:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._pending: list[tuple[Op[Any], asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None
        self.transactions = 0  # committed or not: fewer than writes when writes group

    async def write(self, op: Op[T]) -> T:
        """Runs op in a transaction (shared with others queued meanwhile) and commits it.

        If the caller is cancelled, its write still happens: it may already be committed."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="db-writer")
        return await future

    async def _flush(self) -> None:
        group: list[tuple[Op[Any], asyncio.Future]] = []
        try:
            while self._pending:
                group, self._pending = self._pending[:MAX_GROUP], self._pending[MAX_GROUP:]
                try:
                    results = await self._commit([op for op, _ in group])
                except Exception as exc:
                    if len(group) == 1:
                        settle(group[0][1], error=exc)
                        continue
                    log.debug("a group of %d writes failed (%s); running each alone", len(group), exc)
                    for op, future in group:
                        try:
                            settle(future, (await self._commit([op]))[0])
                        except Exception as one_exc:
                            settle(future, error=one_exc)
                    continue
                for (_, future), result in zip(group, results):
                    settle(future, result)
        except BaseException as exc:  # cancelled at shutdown: nobody is left to run these
            for _, future in group + self._pending:
                settle(future, error=exc if isinstance(exc, Exception) else RuntimeError("writer stopped"))
            self._pending = []
            raise

    async def _commit(self, ops: list[Op[Any]]) -> list[Any]:
        self.transactions += 1
        return await self._db.transaction(lambda session: [op(session) for op in ops])
