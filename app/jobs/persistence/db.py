"""The database: SQLite (WAL) by default, PostgreSQL through asyncpg at scale.

Queries are written once, as plain synchronous SQLModel code on a `Session`, and
`Database` runs them the cheapest way for each backend:

- SQLite: a read runs right on the event loop, and a group of writes runs in one hop to
  a single writer thread. aiosqlite would instead hop to its thread and back for every
  statement, commit and rollback; on a machine whose cores are busy decoding tokens
  each hop waits for a core, and those waits, not SQLite, were most of a request's
  time. A WAL reader never waits for the writer, and the queries on the loop are point
  lookups and short pages; `offload=True` sends a longer one to a thread.
- PostgreSQL: the same functions run through asyncpg (`AsyncSession.run_sync`), which
  needs no threads at all.

The async engine stays for what is not on a request's path: migrations, /readyz.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlmodel import Session
from sqlmodel.ext.asyncio.session import AsyncSession

T = TypeVar("T")


def async_url(url: str) -> str:
    """Accept plain sqlite:/postgresql: URLs and pick the async driver."""
    if url.startswith("sqlite:///") or url.startswith("sqlite://"):
        return url.replace("sqlite:", "sqlite+aiosqlite:", 1)
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    return url


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # WAL: readers never block the writer
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def private_dir(path: Path) -> Path:
    """Creates path (and missing parents) readable by this user only; an existing folder
    is left as it is, since it may be shared (e.g. /tmp)."""
    if not path.exists():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def private_file(path: Path) -> None:
    """Creates path empty with mode 0600, or tightens a file of ours to 0600. SQLite gives
    its -wal and -shm files the mode of the database file."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        if os.fstat(fd).st_uid == os.geteuid():
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def make_engine(url: str) -> AsyncEngine:
    url = async_url(url)
    if url.startswith("sqlite+aiosqlite:///"):
        db_path = url.removeprefix("sqlite+aiosqlite:///")
        if db_path and db_path != ":memory:":
            private_dir(Path(db_path).parent)
            private_file(Path(db_path))
        engine = create_async_engine(url, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(url, pool_pre_ping=True)


class Database:
    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.dialect = self.engine.dialect.name
        self._sync: Engine | None = None
        self._writer_thread: ThreadPoolExecutor | None = None
        if self.dialect == "sqlite":
            if self.engine.url.database in (None, "", ":memory:"):
                raise ValueError("an in-memory SQLite database is not supported: give a file path")
            self._sync = create_engine(self.engine.url.set(drivername="sqlite"), connect_args={"timeout": 30})
            event.listen(self._sync, "connect", _sqlite_pragmas)
            self._writer_thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")

    async def read(self, query: Callable[[Session], T], *, offload: bool = False) -> T:
        """Runs query(session) in a read-only transaction."""
        if self._sync is None:
            async with AsyncSession(self.engine) as session:
                return await session.run_sync(query)
        if offload:
            return await asyncio.to_thread(self._run_sync, query)
        return self._run_sync(query)

    async def transaction(self, work: Callable[[Session], T]) -> T:
        """Runs work(session) and commits; rolls back if it raises."""

        def commit(session: Session) -> T:
            result = work(session)
            session.commit()
            return result

        if self._sync is None:
            async with AsyncSession(self.engine, expire_on_commit=False) as session:
                return await session.run_sync(commit)
        return await asyncio.get_running_loop().run_in_executor(self._writer_thread, self._run_sync, commit)

    def _run_sync(self, fn: Callable[[Session], T]) -> T:
        with Session(self._sync, expire_on_commit=False) as session:
            return fn(session)

    async def ping(self) -> bool:
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self._sync is not None:
            self._sync.dispose()
        if self._writer_thread is not None:
            self._writer_thread.shutdown(wait=True)
